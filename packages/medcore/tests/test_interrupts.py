"""SIGTERM, SIGINT and SIGUSR1 stop training at a step boundary (medcore.runtime.interrupts), in one
process and in two (``--devices 2``), and ``--resume latest`` continues bit-identically."""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medcore.config import TrainerConfig
from medcore.engine.trainer import Trainer
from medcore.runtime.distributed import make_fabric
from medcore.runtime.interrupts import Interrupted
from medcore.testing import checkpoint_differences
from medcore.weights.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults
TESTS = Path(__file__).parent
X = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).float()
INTERRUPTED_LINE = "interrupted; finished work is saved (resume with --resume latest)"


def _step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)


def _evaluate(model: nn.Module, ctx: Any) -> dict[str, float]:
    return {"val/loss": float(_step(model, (X, Y)))}


class Noisy(TensorDataset):
    """Augments in ``__getitem__`` from the global RNG (seeded per batch by the Trainer)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.randn(6), y


def make(run_dir: Path, *, step=_step, evaluate=_evaluate, **overrides: Any) -> Trainer:
    torch.manual_seed(1)
    # BatchNorm (buffers a forward pass changes) and dropout (the global RNG) make a state saved
    # anywhere but at a step boundary differ from the uninterrupted run.
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
    )
    cfg = TrainerConfig(
        **{
            "epochs": 3,
            "batch_size": 8,
            "num_workers": 0,
            "lr": 1e-2,
            "grad_accum_steps": 2,
            "log_every_steps": 1,
            "save_interval_s": 3600.0,  # latest.pt only when the run ends or is stopped
            **overrides,
        }
    )
    return Trainer(
        model,
        cfg,
        fabric=make_fabric(torch.device("cpu"), cfg),
        train_data=Noisy(X, Y),
        step_fn=step,
        run_dir=run_dir,
        kind="test.MLP",
        evaluate_fn=evaluate,
        seed=5,
        show_progress=False,
    )


def _differences(full: Path, resumed: Path) -> list[str]:
    """Weights, buffers, optimizer, scheduler, metrics of two finished runs' latest.pt."""
    a = load_checkpoint(full / "checkpoints/latest.pt")
    b = load_checkpoint(resumed / "checkpoints/latest.pt")
    for state in (a, b):  # the best file's path names the run directory
        state["best"].pop("path")
    keys = ("model", "optimizer", "scheduler", "history", "best", "global_step", "epoch")
    return [d for k in keys for d in checkpoint_differences(a[k], b[k], k)]


def _signal_at(kind: str, n: int, signum: int, also_workers: bool = False):
    """A step or evaluate function that sends ``signum`` to this process in its ``n``-th call
    (and to the DataLoader workers, as SLURM signals every process of a job step)."""
    calls = {"n": 0}
    inner = _step if kind == "step" else _evaluate

    def fn(model: nn.Module, arg: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            if also_workers:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signum)
            os.kill(os.getpid(), signum)
        return inner(model, arg)

    return fn


# (signal, where, nth call, position of latest.pt: (global_step, epoch, batch_in_epoch),
# evaluations the victim ran, trainer settings); 6 batches an epoch, 2 per optimizer step:
# 3 steps an epoch, 9 in all.
CASES = [
    ("SIGTERM", "step", 8, (4, 1, 2), 1, {}),  # mid-epoch, in a step's last micro-batch
    ("SIGINT", "step", 7, (4, 1, 2), 1, {}),  # mid-epoch, in a step's first micro-batch
    ("SIGUSR1", "step", 3, (2, 0, 4), 0, {}),  # SLURM's --signal, ahead of the time limit
    # in an epoch's last step, saved there already: no evaluation, no second save
    ("SIGTERM", "step", 6, (3, 0, 6), 0, {"save_every_steps": 1}),
    ("SIGTERM", "eval", 2, (6, 2, 0), 2, {}),  # during the evaluation that ends epoch 2
    ("SIGTERM", "eval", 3, (9, 3, 0), 3, {}),  # during the last evaluation: no final.pt yet
]


@pytest.mark.parametrize(("name", "where", "n", "position", "evaluations", "settings"), CASES)
def test_signal_stops_at_a_step_boundary_and_resume_is_bit_identical(
    tmp_path: Path,
    name: str,
    where: str,
    n: int,
    position: tuple[int, int, int],
    evaluations: int,
    settings: dict[str, Any],
) -> None:
    signum = getattr(signal, name)
    full = make(tmp_path / "full")
    full.fit()
    hook = {"step" if where == "step" else "evaluate": _signal_at(where, n, signum)}
    victim = make(tmp_path / "victim", **hook, **settings)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(Interrupted, match=name):
        victim.fit()
    # the fit's handlers are gone again
    assert {s: signal.getsignal(s) for s in before} == before
    ckpts = tmp_path / "victim/checkpoints"
    saved = load_checkpoint(ckpts / "latest.pt", kind="test.MLP")
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == position
    assert len(victim.state.history) == evaluations
    assert not (ckpts / "final.pt").exists()
    make(tmp_path / "victim").fit(resume=ckpts / "latest.pt")
    assert _differences(tmp_path / "full", tmp_path / "victim") == []
    final = load_checkpoint(ckpts / "final.pt")["model"]
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in final.items())


def test_sigterm_to_the_loader_workers_too_stops_cleanly(tmp_path: Path) -> None:
    """SLURM signals every process of the job step, DataLoader workers included: they leave
    the stop to the training process, which ends them after its save."""
    workers = {"num_workers": 2, "persistent_workers": True}
    make(tmp_path / "full", **workers).fit()
    victim = make(tmp_path / "victim", step=_signal_at("step", 5, signal.SIGTERM, True), **workers)
    with pytest.raises(Interrupted):
        victim.fit()
    latest = tmp_path / "victim/checkpoints/latest.pt"
    assert load_checkpoint(latest)["global_step"] == 3
    assert not multiprocessing.active_children()  # the workers were stopped
    make(tmp_path / "victim", **workers).fit(resume=latest)
    assert _differences(tmp_path / "full", tmp_path / "victim") == []


SECOND_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_interrupts import make, _step
    from medcore.cli.command import run_cli

    calls = {{"n": 0}}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: the second one ends it at once
            raise AssertionError("still running after the second signal")
        return _step(model, batch)

    trainer = make(__import__("pathlib").Path({run!r}), step=step, save_every_steps=1)
    sys.exit(run_cli(lambda: trainer.fit() and 0, "second-signal"))
    """
)


def test_a_second_signal_ends_the_process_at_once(tmp_path: Path) -> None:
    code = SECOND_SIGNAL.format(tests=str(TESTS), run=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 130, proc.stderr
    assert "SIGTERM again: stopped at once" in proc.stderr
    assert "Traceback" not in proc.stderr and "still running" not in proc.stderr
    assert load_checkpoint(tmp_path / "checkpoints/latest.pt")["global_step"] == 2


# -- two processes: --devices 2 (medcore.cli.launch), gloo on CPU ---------------------------------

CONFIG = """seed: 4
device: cpu
num_threads: 1
trainer:
  epochs: 2
  batch_size: 4
  num_workers: 0
  lr: 0.01
  save_every_steps: 0
  save_interval_s: 3600
  log_every_steps: 2
  amp: false
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def _devices(config: Path, run: Path, *extra: str, env: dict[str, str] | None = None):
    argv = ["--config", str(config), "--devices", "2", "--output-dir", str(run), *extra]
    return subprocess.run(
        [sys.executable, "-m", "medcore.cli.launch", "devices_cmd:main", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


@pytest.fixture
def full_run(tmp_path: Path, config: Path) -> Path:
    run = tmp_path / "full"
    done = _devices(config, run)
    assert done.returncode == 0, done.stderr
    return run


# 64 samples, 4 per rank and step: 8 steps an epoch, 16 in all; one evaluation per epoch.
@pytest.mark.parametrize(
    ("signal_spec", "position"),
    [
        ("0:5:SIGTERM", (5, 0, 5)),  # to the command (rank 0), mid-epoch
        ("1:11:SIGTERM", (11, 1, 3)),  # to rank 1 alone (torchrun, SLURM signal every rank)
        ("0:3:SIGINT", (3, 0, 3)),  # Ctrl-C
        ("1:1:SIGTERM:eval", (8, 1, 0)),  # during the first evaluation, on rank 1
    ],
)
def test_two_ranks_stop_together_and_resume_bit_identically(
    tmp_path: Path, config: Path, full_run: Path, signal_spec: str, position: tuple[int, int, int]
) -> None:
    run = tmp_path / "victim"
    stopped = _devices(config, run, env={"DEVICES_CMD_SIGNAL": signal_spec})
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.count(INTERRUPTED_LINE) == 1, stopped.stderr
    assert "Traceback" not in stopped.stderr and "error" not in stopped.stderr, stopped.stderr
    saved = load_checkpoint(run / "checkpoints/latest.pt", kind="devicescmd.MLP")
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == position
    assert len(saved["rng_ranks"]) == 2  # each rank's own streams, through the usual path
    assert not (run / "checkpoints/final.pt").exists()
    resumed = _devices(config, run, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert _differences(full_run, run) == []
    a = torch.load(full_run / "weights.pt", weights_only=True)
    b = torch.load(run / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_signals_every_rank_and_they_stop_together(
    tmp_path: Path, config: Path, full_run: Path
) -> None:
    """torchrun passes a SIGTERM on to every rank, as SLURM does at its time limit."""
    from medcore.testing import free_port

    def torchrun(run: Path, *extra: str, slow: bool = False) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "medcore.cli.launch", "devices_cmd:main",
            "--config", str(config), "--output-dir", str(run), *extra,
        ]  # fmt: skip
        env = {**os.environ, "DEVICES_CMD_SLOW": "1" if slow else "0"}
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    run = tmp_path / "victim"
    agent = torchrun(run, slow=True)
    deadline = time.monotonic() + 240
    log = run / "metrics.jsonl"
    while time.monotonic() < deadline and not (log.is_file() and "train/loss" in log.read_text()):
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        time.sleep(0.1)
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=120)
    assert err.count(INTERRUPTED_LINE) == 1, err
    # torchrun reports the signal it got with a traceback of its own; the ranks print none (no
    # frame of medcore's or the command's files: the venv's own path may hold the word medcore)
    assert not re.search(r'File "[^"]*(/medcore/|devices_cmd\.py)', err), err
    saved = load_checkpoint(run / "checkpoints/latest.pt", kind="devicescmd.MLP")
    assert 0 < saved["global_step"] < 16 and len(saved["rng_ranks"]) == 2
    resumed = torchrun(run, "--resume", "latest")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _differences(full_run, run) == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its exit status is left


def test_kill_9_of_the_command_ends_every_rank(tmp_path: Path, config: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    argv = ["--config", str(config), "--devices", "2", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcore.cli.launch", "devices_cmd:main", *argv],
        env={**os.environ, "DEVICES_CMD_SLOW": "1", "DEVICES_CMD_PIDS": str(pids)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(pids.iterdir())) < 2:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    time.sleep(1.0)  # training
    rank1 = int((pids / "rank1.pid").read_text())
    assert _alive(rank1)
    os.kill(proc.pid, signal.SIGKILL)  # the command only; rank 1 runs in its own session
    proc.wait()
    killed = time.monotonic()
    while _alive(rank1) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not _alive(rank1), "rank 1 outlived the command that started it"
    err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err, err
