"""Fault injection on medcore's own parts: failing checkpoint writes, a dying DDP rank. (kill -9
and resume, a full disk during a run and the rest of the run contract: medcore.testing.run_contract,
run by every package on its own command.)"""

import os
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
