"""``--devices N``: the command starts its own ranks (gloo on CPU) through medcore.cli.launch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medcore.weights.checkpoint import load_checkpoint

TESTS = Path(__file__).parent
CONFIG = """seed: 4
device: cpu
num_threads: 1
trainer:
  epochs: 2
  batch_size: 4
  num_workers: 0
  lr: 0.01
  save_every_steps: 1
  log_every_steps: 2
  amp: false
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(TESTS))
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def _cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "medcore.cli.launch", "devices_cmd:main", *argv]


def test_devices_2_from_main_runs_two_ranks_and_leaves_the_process_clean(
    tmp_path: Path, config: Path
) -> None:
    import devices_cmd

    run = tmp_path / "run"
    before = dict(os.environ)
    code = devices_cmd.main(["--config", str(config), "--output-dir", str(run), "--devices", "2"])
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    # 64 samples, 4 per rank and step, 2 ranks: 8 steps an epoch.
    assert result == {"world_size": 2, "global_step": 16}
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 2
    state = load_checkpoint(run / "checkpoints/latest.pt", kind="devicescmd.MLP")
    # Each rank's RNG state is saved; dropout made them differ.
    assert len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    launcher_keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MEDCORE_LAUNCHED")
    # The test process is not left as "rank 0" of a finished job.
    assert {k: os.environ.get(k) for k in launcher_keys} == {
        k: before.get(k) for k in launcher_keys
    }


@pytest.mark.faults
def test_failed_rank_ends_the_job_with_one_line(tmp_path: Path, config: Path) -> None:
    env = {**os.environ, "DEVICES_CMD_FAIL_RANK": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        _cmd("--config", str(config), "--output-dir", str(tmp_path / "run"), "--devices", "2"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "rank 1 failed" in proc.stderr
    assert "error: rank 1: exited with code" in proc.stderr
    assert time.monotonic() - start < 300


@pytest.mark.faults
def test_kill_9_of_two_ranks_then_resume_equals_uninterrupted(tmp_path: Path, config: Path) -> None:
    full = tmp_path / "full"
    argv = ("--config", str(config), "--devices", "2")
    done = subprocess.run(
        _cmd(*argv, "--output-dir", str(full)), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    victim = tmp_path / "victim"
    proc = subprocess.Popen(
        _cmd(*argv, "--output-dir", str(victim)),
        env={**os.environ, "DEVICES_CMD_SLOW": "1"},
        stderr=subprocess.DEVNULL,
    )
    latest = victim / "checkpoints/latest.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and load_checkpoint(latest)["global_step"] >= 3:
            break
        time.sleep(0.05)
    # The launching command only: rank 1 runs in a session of its own and ends with it
    # (test_interrupts.py times that).
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    step = load_checkpoint(latest)["global_step"]
    assert 3 <= step < 16
    resumed = subprocess.run(
        _cmd(*argv, "--output-dir", str(victim), "--resume", "latest"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(full / "weights.pt", weights_only=True)
    b = torch.load(victim / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
