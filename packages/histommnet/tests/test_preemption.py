"""A cluster stops a histommnet cross-validation (issue 28): SIGTERM mid-epoch, SIGINT during an
evaluation, in one process and in two (``--devices 2``); ``--resume latest`` then ends with the
weights, optimizer state and metrics of an uninterrupted run. ``kill -9`` of the command that
started two ranks leaves none running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcore.testing import checkpoint_differences, signalled_command
from medcore.weights.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults
ENTRY = "histommnet.cli:train"
LINE = "histommnet-train: interrupted; finished work is saved (resume with --resume latest)"
# Two folds of 2 epochs x 3 steps; latest.pt only when a fold ends or the run is stopped.
ITEMS = [
    "num_threads=1",
    "model.backbone=test_efficientnet",
    "model.embed_dim=32",
    "model.attention_scales=[1,3]",
    "data.image_size=32",
    "data.eval_max_draws=2",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=3",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "trainer.save_interval_s=3600",
    "cv.folds=2",
]


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for item in ITEMS for arg in ("--set", item)]
    return ["--data-dir", str(data), "--output-dir", str(out), *sets, *extra]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MEDCORE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}


def _run(command: list[str], cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, env=_env(cache), timeout=900, check=False
    )


def _command(argv: list[str]) -> list[str]:
    """``histommnet-train ARGV`` (the console script's function, in this interpreter)."""
    return [sys.executable, "-c", "import sys; from histommnet.cli import train; "
            "sys.exit(train(sys.argv[1:]))", *argv]  # fmt: skip


def _train(argv: list[str], cache: Path) -> subprocess.CompletedProcess:
    return _run(_command(argv), cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture(scope="module")
def uninterrupted(tiny_tree: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``uninterrupted(devices)``: the run directory of an uninterrupted run (made once)."""
    runs: dict[int, Path] = {}

    def get(devices: int) -> Path:
        if devices not in runs:
            out = tmp_path_factory.mktemp("full") / f"devices{devices}"
            done = _train(_argv(tiny_tree, out, "--devices", str(devices)), cache)
            assert done.returncode == 0, done.stderr
            runs[devices] = out
        return runs[devices]

    return get


def _differences(full: Path, run: Path, epoch_loss: bool) -> list[str]:
    """Weights, buffers, loop state and metrics of both folds of two finished runs.

    A finished fold keeps ``final.pt`` (weights and loop state) and no ``latest.pt``, so the
    optimizer and scheduler are compared through what they did: every step after the resume
    moves the weights by them, and the weights must be bit-identical. ``epoch_loss=False``
    leaves out ``train/epoch_loss``: histommnet's running mean of the epoch's training loss is
    not checkpointed, so after a resume inside an epoch it covers the resumed part of that epoch
    only (every other number is exact)."""
    found: list[str] = []
    for fold in ("fold_0", "fold_1"):
        ckpts = (full / fold / "checkpoints", run / fold / "checkpoints")
        a, b = (load_checkpoint(c / "final.pt") for c in ckpts)
        for state in (a, b):
            state["best"].pop("path", None)  # names the run directory
            if not epoch_loss:
                for record in state["history"]:
                    record.pop("train/epoch_loss")
        for key in ("model", "history", "best", "global_step", "epoch"):
            found += checkpoint_differences(a[key], b[key], f"{fold}/final/{key}")
        assert not any((c / "latest.pt").exists() for c in ckpts)  # finished: weights only
        results = [json.loads((d / fold / "result.json").read_text()) for d in (full, run)]
        for result in results:
            result.pop("checkpoint")  # a path in the run directory
        found += checkpoint_differences(*results, f"{fold}/result")
    return found


@pytest.mark.parametrize(
    ("devices", "signal_name", "where", "n", "stopped"),
    [
        # the 5th step is the 2nd of fold 0's second epoch: stopped inside the first stage
        (1, "SIGTERM", "step", 5, ("fold_0", 5, 1, 2)),
        # the 3rd evaluation ends fold 1's first epoch: fold 0 finished, fold 1 stopped after it
        (1, "SIGINT", "eval", 3, ("fold_1", 3, 1, 0)),
        (2, "SIGTERM", "step", 4, ("fold_0", 4, 1, 1)),
    ],
)
def test_signal_then_resume_latest_equals_uninterrupted(
    tiny_tree: Path,
    cache: Path,
    tmp_path: Path,
    uninterrupted,
    devices: int,
    signal_name: str,
    where: str,
    n: int,
    stopped: tuple[str, int, int, int],
) -> None:
    run = tmp_path / "run"
    argv = _argv(tiny_tree, run, "--devices", str(devices))
    victim = _run(signalled_command(ENTRY, signal_name, where, n, argv), cache)
    assert victim.returncode == 130, victim.stderr
    assert victim.stderr.count(LINE) == 1, victim.stderr
    assert "Traceback" not in victim.stderr, victim.stderr
    fold, step, epoch, batch = stopped
    state = load_checkpoint(run / fold / "checkpoints" / "latest.pt")
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (step, epoch, batch)
    assert len(state["rng_ranks"]) == devices
    assert not (run / fold / "stage.json").exists()  # the stopped fold is unfinished
    assert not (run / fold / "checkpoints" / "final.pt").exists()
    if fold == "fold_0":
        assert not (run / "fold_1").exists()  # the next stage did not start

    resumed = _train(["--resume", "latest", "--output-dir", str(run)], cache)
    assert resumed.returncode == 0, resumed.stderr
    assert _differences(uninterrupted(devices), run, epoch_loss=where == "eval") == []


def _pids_of(run: Path) -> list[int]:
    """The started ranks (``python -m medcore.cli.launch``) of the run in ``run``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"medcore.cli.launch" in cmdline and str(run).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_kill_9_of_the_command_leaves_no_rank(tiny_tree: Path, cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = _argv(tiny_tree, run, "--devices", "2", "--set", "trainer.epochs=50")
    victim = subprocess.Popen(_command(argv), env=_env(cache), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (run / "fold_0" / "metrics.jsonl").is_file():
        assert victim.poll() is None, victim.stderr.read() if victim.stderr else ""
        time.sleep(0.2)
    ranks = _pids_of(run)
    assert len(ranks) == 1  # rank 1, training fold 0 with rank 0
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    while _alive(ranks[0]) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not _alive(ranks[0]), "rank 1 outlived the command that started it"
    err = victim.stderr.read() if victim.stderr else ""
    assert "Traceback" not in err, err
