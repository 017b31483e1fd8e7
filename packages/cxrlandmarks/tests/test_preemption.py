"""A cluster stops a four-phase cxrlandmarks run (issue 28): SIGTERM mid-epoch inside a phase,
SIGINT during an evaluation, in one process and in two (``--devices 2``); ``--resume latest``
then ends with the weights, optimizer state and metrics of an uninterrupted run, and the phases
after the stopped one start only after the resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlandmarks.anatomy import CATEGORIES
from cxrlandmarks.synthetic import render_case
from medcore.testing import checkpoint_differences, signalled_command
from medcore.weights.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults
ENTRY = "cxrlandmarks.cli:train"
LINE = "cxrlandmarks-train: interrupted; finished work is saved (resume with --resume latest)"
PHASES = ("phase1", "phase2", "phase3", "phase4")
SIZE = 64
# Phase 2 runs two epochs of up to three steps, the other phases one epoch of one step;
# latest.pt only when a phase ends or the run is stopped.
ITEMS = [
    "num_threads=1",
    "data.image_size=32",
    "data.eval_batch_size=32",
    "eval.grid_images=2",
    "trainer.num_workers=0",
    "trainer.save_interval_s=3600",
    *(f"phases.phase{p}.epochs={2 if p == 2 else 1}" for p in range(1, 5)),
    *(f"phases.phase{p}.batch_size=2" for p in range(1, 5)),
    *(f"phases.phase{p}.max_steps_per_epoch={3 if p == 2 else 1}" for p in range(1, 5)),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 radiographs (6 per category, 64 x 64) in the original layout: headerless CSV +
    one folder per category."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for category in CATEGORIES:
        for i in range(6):
            img, landmarks = render_case(rng, category)
            small = Image.fromarray(img, mode="L").resize((SIZE, SIZE), Image.BILINEAR)
            coords = np.clip(np.floor(landmarks * SIZE / img.shape[1]), 0, SIZE - 1).astype(int)
            name = f"{category}-{i + 1}"
            (root / "dataset" / category).mkdir(parents=True, exist_ok=True)
            small.save(root / "dataset" / category / f"{name}.png")
            lines.append(",".join(map(str, [len(lines), *coords.ravel().tolist(), name])))
    csv = root / "coordenadas" / "coordenadas_maestro.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "cache"


def _argv(data: Path, out: Path, devices: int) -> list[str]:
    sets = [arg for item in ITEMS for arg in ("--set", item)]
    return [
        "--data-dir", str(data), "--output-dir", str(out), "--config", "default",
        "--device", "cpu", "--phase", "all", "--devices", str(devices), *sets,
    ]  # fmt: skip


def _run(command: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDCORE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=900, check=False
    )


def _command(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from cxrlandmarks.cli import train; "
            "sys.exit(train(sys.argv[1:]))", *argv]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``uninterrupted(devices)``: the run directory of an uninterrupted run (made once)."""
    runs: dict[int, Path] = {}

    def get(devices: int) -> Path:
        if devices not in runs:
            where = tmp_path_factory.mktemp("full")
            done = _run(_command(_argv(data_dir, where / "run", devices)), cache, where)
            assert done.returncode == 0, done.stderr
            runs[devices] = where / "run"
        return runs[devices]

    return get


def _differences(full: Path, run: Path) -> list[str]:
    """Every phase's weights, buffers, loop state and metrics, and the test report.

    A finished phase keeps ``final.pt`` (weights and loop state) and no ``latest.pt``, so the
    optimizer and scheduler are compared through what they did: every step after the resume
    moves the weights by them, and the weights must be bit-identical."""
    found: list[str] = []
    for phase in PHASES:
        ckpts = (full / phase / "checkpoints", run / phase / "checkpoints")
        a, b = (load_checkpoint(c / "final.pt") for c in ckpts)
        for state in (a, b):
            state["best"].pop("path", None)  # names the run directory
        for key in ("model", "history", "best", "global_step", "epoch"):
            found += checkpoint_differences(a[key], b[key], f"{phase}/final/{key}")
        assert not any((c / "latest.pt").exists() for c in ckpts)  # finished: weights only
    reports = [json.loads((d / "metrics.json").read_text()) for d in (full, run)]
    return found + checkpoint_differences(*reports, "metrics.json")


@pytest.mark.parametrize(
    ("devices", "signal_name", "where", "n", "stopped"),
    [
        # step 1 is phase 1's; steps 2-4 phase 2's first epoch: stopped in its middle
        (1, "SIGTERM", "step", 3, ("phase2", 2, 0, 2)),
        # evaluation 2 ends phase 2's first epoch: phase 2 stops after it
        (2, "SIGINT", "eval", 2, ("phase2", 3, 1, 0)),
    ],
)
def test_signal_then_resume_latest_equals_uninterrupted(
    data_dir: Path,
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
    argv = _argv(data_dir, run, devices)
    victim = _run(signalled_command(ENTRY, signal_name, where, n, argv), cache, tmp_path)
    assert victim.returncode == 130, victim.stderr
    assert victim.stderr.count(LINE) == 1, victim.stderr
    assert "Traceback" not in victim.stderr, victim.stderr
    phase, step, epoch, batch = stopped
    state = load_checkpoint(run / phase / "checkpoints" / "latest.pt")
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (step, epoch, batch)
    assert len(state["rng_ranks"]) == devices
    assert (run / "phase1" / "stage.json").is_file()
    assert not (run / phase / "stage.json").exists()  # the stopped phase is unfinished
    assert not (run / "phase3").exists()  # the next phase did not start

    resumed = _run(_command(["--resume", "latest", "--output-dir", str(run)]), cache, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _differences(uninterrupted(devices), run) == []
