"""Fault injection on the Trainer: kill -9 and resume, failing checkpoint writes, a dying DDP rank."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medcore.testing import free_port
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint

SCRIPT = str(Path(__file__).with_name("fault_train_script.py"))
pytestmark = pytest.mark.faults


def _run(run_dir: Path, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, str(run_dir), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    victim_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, str(victim_dir), "--slow"], stderr=subprocess.DEVNULL
    )
    latest = victim_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if latest.exists() and load_checkpoint(latest)["global_step"] >= 6:  # inside epoch 1 of 3
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(latest)  # whatever moment the kill hit, latest.pt is a whole checkpoint
    assert 6 <= state["global_step"] < 48
    resumed = _run(victim_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full/weights.pt", weights_only=True)
    b = torch.load(victim_dir / "weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_checkpoint_write_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(
        {"model": {"w": torch.ones(3)}, "step": 1}, tmp_path / "latest.pt", kind="x.M"
    )

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, path, kind="x.M")
    monkeypatch.undo()
    state = load_checkpoint(path, kind="x.M")
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("disk error mid-write")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="mid-write"):
        save_checkpoint({"step": 3}, path, kind="x.M")
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_ddp_rank_failure_exits_nonzero_without_hanging(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        SCRIPT,
        str(tmp_path),
        "--raise-on-rank",
        "1",
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode != 0
    assert "rank 1 failed" in proc.stderr + proc.stdout
    assert time.monotonic() - start < 240  # bounded: the surviving rank is torn down, no hang
