"""Fault injection and broken inputs through cxrlandmarks' own commands (issue 9).

Covered: kill -9 mid-epoch inside a phase of ``cxrlandmarks-train`` then ``--resume latest``
(finished phases kept, same weights as an uninterrupted run); a second job into a running job's
directory (refused by the lock); a failing checkpoint write; checkpoints that would run code or
belong to another package, given to predict / eval / train ``--resume`` / ``--init-from`` /
``--pretrained-weights``; a table of broken landmark CSVs, images and folders for train, eval and
predict; NaN batches. Not here: preprocessing (cxrlandmarks has no preprocess command) and DDP
rank failure (medcore's own fault tests cover it at Trainer level; cxrlandmarks has no
distributed code of its own beyond the Trainer's, and a 2-process run of it costs far more than
the suite's CPU budget).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cxrlandmarks.train  # noqa: F401  (imported now: the lock check must not wait on it)
from cxrlandmarks.anatomy import CATEGORIES
from cxrlandmarks.cli import evaluate, predict, train
from cxrlandmarks.data import HEADED_COLUMNS, LandmarkDataset
from cxrlandmarks.synthetic import render_case
from medcore.testing import (
    all_finite,
    assert_refused_while_running,
    call_main,
    disk_full_on,
    error_line,
    png_header_only,
    wait_until,
    write_unsafe_checkpoint,
)
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("ignore:cannot stratify:UserWarning")]

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
KIND = "cxrlandmarks.ResNetLandmarkRegressor"
CSV = "coordenadas/coordenadas_maestro.csv"
SIZE = 64  # side of the tiny test radiographs, px
# Phase 2 has two steps (so that it can be killed mid-epoch), the other phases one.
TINY = [
    "num_threads=1",
    "data.image_size=32",
    "data.eval_batch_size=32",
    "eval.grid_images=2",
    "trainer.num_workers=0",
    *(f"phases.phase{p}.epochs=1" for p in range(1, 5)),
    *(f"phases.phase{p}.batch_size=4" for p in range(1, 5)),
    *(f"phases.phase{p}.max_steps_per_epoch={2 if p == 2 else 1}" for p in range(1, 5)),
]
SAVE_EVERY = "trainer.save_every_steps=1"  # latest.pt after every step, not only per epoch


def _sets(*items: str) -> list[str]:
    return [arg for item in [*TINY, *items] for arg in ("--set", item)]


def _train_argv(data: Path, out: Path, *items: str, phase: str = "all") -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--config",
        "default",
        "--device",
        "cpu",
        "--phase",
        phase,
        *_sets(*items),
    ]


def _model(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path, kind=KIND)["model"]


@pytest.fixture(autouse=True)
def _isolated(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set num_threads=1; leave other tests as they were


def _case(rng: np.random.Generator, category: str) -> tuple[Image.Image, np.ndarray]:
    """A synthetic radiograph shrunk to SIZE px and its landmarks (int pixels, inside)."""
    img, landmarks = render_case(rng, category)
    small = Image.fromarray(img, mode="L").resize((SIZE, SIZE), Image.BILINEAR)
    coords = np.clip(np.floor(landmarks * SIZE / img.shape[1]), 0, SIZE - 1).astype(int)
    return small, coords


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images (6 per category, 64 x 64) in the original layout: headerless CSV + folders."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for category in CATEGORIES:
        for i in range(6):
            img, coords = _case(rng, category)
            name = f"{category}-{i + 1}"
            (root / "dataset" / category).mkdir(parents=True, exist_ok=True)
            img.save(root / "dataset" / category / f"{name}.png")
            lines.append(",".join(map(str, [len(lines), *coords.ravel().tolist(), name])))
    (root / CSV).parent.mkdir(parents=True)
    (root / CSV).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-phase run (also the checkpoints the predict / eval cases use)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(_train_argv(data_dir, run)) == 0
    torch.set_num_threads(threads)
    return run


# -- 1 + 3: kill -9 mid-epoch inside a phase, a second job refused, --resume latest -------------


def test_kill_9_mid_phase_second_job_refused_then_resume_latest(
    data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "runs" / "cxrlandmarks" / "killed"
    marker, log = tmp_path / "paused", tmp_path / "victim.err"
    latest = run / "phase2" / "checkpoints" / "latest.pt"
    # Step 1 is phase 1's only step; the victim pauses inside phase 2's second step, when
    # phase 1 is finished and phase 2's first step is saved. (The reference run saves only at
    # epoch ends: the extra saves must not change a number either.)
    with log.open("w") as err_file:
        victim = subprocess.Popen(
            [sys.executable, RUNNER, str(marker), "3", *_train_argv(data_dir, run, SAVE_EVERY)],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        wait_until(marker.exists, victim, log)
        # 3: a second job into the running job's directory is refused and changes nothing
        config = (run / "config.yaml").read_bytes()
        argv = _train_argv(data_dir, run, SAVE_EVERY, "phases.phase2.head_lr=0.5")
        code, _, err = call_main(train, argv, capsys)
        assert_refused_while_running(code, err, run, victim.pid)
        assert (run / "config.yaml").read_bytes() == config
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    state = load_checkpoint(latest, kind=KIND)  # a whole checkpoint, killed mid-epoch
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, 1, 1)
    assert (run / "phase1" / "checkpoints" / "final.pt").is_file()
    assert (run / "checkpoints" / "phase1_best.pt").is_file()
    assert not (run / "phase2" / "checkpoints" / "final.pt").exists()
    assert not (run / "checkpoints" / "phase2_best.pt").exists()
    assert (run / ".lock").is_file()  # left by the killed job; the resumed run takes it over

    # `--resume latest` alone (cwd is tmp_path): the newest run under runs/cxrlandmarks/, with
    # its own saved config, finished phases skipped.
    code, out, err = call_main(train, ["--resume", "latest"], capsys)
    assert code == 0, err
    assert "[phase1] already finished in this run" in out and "final (phase4)" in out
    assert "[phase2] already finished" not in out
    assert not (run / ".lock").exists()
    for phase in ("phase2", "phase3", "phase4"):
        a = load_checkpoint(reference / phase / "checkpoints" / "final.pt", kind=KIND)
        b = load_checkpoint(run / phase / "checkpoints" / "final.pt", kind=KIND)
        assert a["global_step"] == b["global_step"], phase
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), phase
    a = _model(reference / "checkpoints" / "geometric_complete.pt")
    b = _model(run / "checkpoints" / "geometric_complete.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- 4: a checkpoint write that fails -----------------------------------------------------------


def test_failed_checkpoint_write_keeps_previous(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    with disk_full_on("latest.pt", nth=2):  # the second step's save: the disk is full
        argv = _train_argv(
            data_dir, run, SAVE_EVERY, "phases.phase1.max_steps_per_epoch=2", phase="1"
        )
        code, _, err = call_main(train, argv, capsys)
    assert code == 2
    ckpts = run / "phase1" / "checkpoints"
    line = error_line(err)
    assert "No space left on device" in line and str(ckpts / "latest.pt") in line
    state = load_checkpoint(ckpts / "latest.pt", kind=KIND)
    assert state["global_step"] == 1 and all_finite(state["model"])  # step 1's, intact
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt"]  # no temp file left
    assert not (run / "checkpoints").exists()  # the phase did not finish: no best copied
    assert not (run / ".lock").exists()


# -- 5: checkpoints that would run code, checkpoints of another package -------------------------


@pytest.mark.parametrize(
    ("command", "content"),
    [
        ("predict", "pickle"),
        ("predict", "foreign"),
        ("eval", "pickle"),
        ("eval", "foreign"),
        ("train --resume", "pickle"),
        ("train --resume", "foreign"),
        ("train --init-from", "pickle"),
        ("train --init-from", "foreign"),
        ("train --pretrained-weights", "pickle"),
    ],
)
def test_unsafe_or_foreign_checkpoint_is_refused(
    command: str, content: str, data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "code_ran"
    run, out = tmp_path / "run", tmp_path / "out"
    path = (
        run / "phase1" / "checkpoints" / "latest.pt"
        if command == "train --resume"
        else tmp_path / "model.pt"
    )
    if content == "pickle":
        write_unsafe_checkpoint(path, marker, kind=KIND)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {"model": {"w": torch.zeros(2)}, "model_config": {}}
        save_checkpoint(weights, path, kind="ctclip.CTCLIP")
    if command == "predict":
        image = data_dir / "dataset" / "COVID" / "COVID-1.png"
        main = predict
        argv = [str(image), "--checkpoint", str(path), "--output-dir", str(out), "--device", "cpu"]
    elif command == "eval":
        main = evaluate
        argv = ["--checkpoint", str(path), "--data-dir", str(data_dir), "--output-dir", str(out)]
    elif command == "train --resume":
        shutil.copy(reference / "config.yaml", run / "config.yaml")
        main, argv = train, ["--resume", str(path)]
    elif command == "train --init-from":
        main, argv = train, [*_train_argv(data_dir, run, phase="2"), "--init-from", str(path)]
    else:
        main = train
        argv = [*_train_argv(data_dir, run, phase="1"), "--pretrained-weights", str(path)]
    code, _, err = call_main(main, argv, capsys)
    assert code == 2
    line = error_line(err)
    assert str(path) in line
    assert not out.exists() and not (run / "checkpoints").exists()  # nothing written
    if content == "foreign":
        assert f"this is a ctclip.CTCLIP checkpoint, not {KIND}" in line
        return
    assert "refused: contains pickled objects that could run code" in line
    assert not marker.exists()  # the code never ran
    torch.load(path, weights_only=False)  # and it is real: an unsafe load runs it
    assert marker.exists()


# -- 6: broken inputs ---------------------------------------------------------------------------


def _png_bytes(mode: str = "L") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).convert(mode).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _sixteen_bit(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img, dtype=np.uint16) * 257)


# Rows of one headed CSV (image_name, category, 30 coordinates and an extra `notes` column,
# which is ignored) over a copy of the tiny data; one training run over all of them. Each row
# is (image name, category, file to write or None, change to the coordinates or to the row).
# "skip" rows must be named with their reason and the job must go on; "used" rows are odd but
# valid images that must be indexed.
Cell = Callable[[list[str]], list[str]]


def _set_cell(column: str, value: str) -> Cell:
    def change(row: list[str]) -> list[str]:
        row = list(row)
        row[SHARED_HEADER.index(column)] = value
        return row

    return change


SHARED_HEADER = ["image_name", "category", *HEADED_COLUMNS, "notes"]
SHARED_ROWS: dict[str, tuple[str, str | None, object, Cell | None, str, str]] = {
    # row: (name, folder, file content, row change, outcome, reason)
    "zero_byte_png": ("COVID-90", "COVID", b"", None, "skip", "empty file (0 bytes)"),
    "truncated_png": (
        "COVID-91",
        "COVID",
        _png_bytes()[:300],
        None,
        "skip",
        "cannot decode image",
    ),
    "truncated_jpeg": (
        "COVID-92",
        "COVID",
        ("jpg", _jpeg_bytes()[:400]),
        None,
        "skip",
        "cannot decode image",
    ),
    "text_file_named_png": (
        "COVID-93",
        "COVID",
        b"not an image\n",
        None,
        "skip",
        "cannot decode image",
    ),
    "decompression_bomb_header": (
        "COVID-94",
        "COVID",
        png_header_only(50_000, 50_000),
        None,
        "skip",
        "decompression bomb",
    ),
    "image_listed_but_missing": ("Normal-90", "Normal", None, None, "skip", "no image Normal-90"),
    "name_climbs_out_with_dotdot": (
        "../../../outside",
        "COVID",
        None,
        None,
        "skip",
        "path leaves the data directory",
    ),
    "coordinate_nan": (
        "Normal-91",
        "Normal",
        "copy",
        _set_cell("L3_x", "nan"),
        "skip",
        "missing or non-numeric coordinates",
    ),
    "coordinate_inf": (
        "Normal-92",
        "Normal",
        "copy",
        _set_cell("L4_y", "inf"),
        "skip",
        "missing or non-numeric coordinates",
    ),
    "coordinate_missing": (
        "Normal-93",
        "Normal",
        "copy",
        _set_cell("L5_x", ""),
        "skip",
        "missing or non-numeric coordinates",
    ),
    "coordinate_not_a_number": (
        "Normal-94",
        "Normal",
        "copy",
        _set_cell("L6_y", "12px"),
        "skip",
        "missing or non-numeric coordinates",
    ),
    "row_with_too_few_coordinates": (
        "Normal-95",
        "Normal",
        "copy",
        lambda row: row[:20],
        "skip",
        "missing or non-numeric coordinates",
    ),
    "coordinate_outside_the_image": (
        "Viral Pneumonia-90",
        "Viral Pneumonia",
        "copy",
        _set_cell("L1_x", str(SIZE)),
        "skip",
        f"coordinates outside the {SIZE}x{SIZE} image",
    ),
    "negative_coordinate": (
        "Viral Pneumonia-91",
        "Viral Pneumonia",
        "copy",
        _set_cell("L2_y", "-3"),
        "skip",
        f"coordinates outside the {SIZE}x{SIZE} image",
    ),
    "duplicated_image_name": (
        "COVID-1",
        "COVID",
        None,
        _set_cell("L1_x", "5"),
        "skip",
        "duplicated image name (first row kept)",
    ),
    "empty_image_name": ("", "COVID", None, None, "skip", "empty image name"),
    "sixteen_bit_png": ("COVID-95", "COVID", _sixteen_bit, None, "used", ""),
    "palette_png": ("Normal-96", "Normal", lambda im: im.convert("P"), None, "used", ""),
    "rgba_png": ("Normal-97", "Normal", lambda im: im.convert("RGBA"), None, "used", ""),
    "jpeg": ("Viral Pneumonia-92", "Viral Pneumonia", ("jpg", "copy"), None, "used", ""),
}


def _good_rows(data: Path) -> list[list[str]]:
    """The tiny data's rows in the headed layout (name, category, 30 coordinates, notes)."""
    rows = []
    for line in (data / CSV).read_text(encoding="utf-8").splitlines():
        fields = line.split(",")
        name = fields[-1]
        rows.append([name, name.rsplit("-", 1)[0], *fields[1:-1], "ok"])
    return rows


@pytest.fixture(scope="module")
def shared_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``--phase 1`` training run over the tiny data with every SHARED_ROWS defect in it."""
    base = tmp_path_factory.mktemp("broken")
    root = base / "data"
    shutil.copytree(data_dir, root)
    # A real image where `../../../outside` would lead: it must not be read.
    Image.open(data_dir / "dataset" / "COVID" / "COVID-2.png").save(base / "outside.png")
    good = _good_rows(data_dir)
    source = Image.open(data_dir / "dataset" / "COVID" / "COVID-2.png")
    template = next(r for r in good if r[0] == "COVID-2")
    rows = list(good)
    for name, folder, content, change, _, _ in SHARED_ROWS.values():
        ext, data = content if isinstance(content, tuple) else ("png", content)
        path = root / "dataset" / str(folder) / f"{name}.{ext}"
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif data == "copy":
            source.save(path)
        elif callable(data):
            data(source).save(path)
        row = [name, str(folder), *template[2:]]
        rows.append(change(row) if change else row)
    text = "\n".join(",".join(f'"{c}"' if " " in c else c for c in r) for r in rows)
    (root / "labels.csv").write_text(",".join(SHARED_HEADER) + "\n" + text + "\n")
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        # One row of the ~47 lacks its image (over the 2% bar): accepted with allow_missing.
        sets = ("data.csv=labels.csv", "data.allow_missing=true")
        code = train(_train_argv(root, base / "run", *sets, phase="1"))
    torch.set_num_threads(threads)
    splits = json.loads((base / "run" / "splits.json").read_text())
    indexed = {name for names in splits["ids"].values() for name in names}
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "indexed": indexed}


@pytest.mark.parametrize("row", list(SHARED_ROWS))
def test_broken_row_is_named_and_the_job_goes_on(row: str, shared_run: dict) -> None:
    name, _, _, _, outcome, reason = SHARED_ROWS[row]
    err = shared_run["err"]
    assert shared_run["code"] == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert "final (phase1)" in shared_run["out"]
    skipped = sum(1 for *_, outcome_, _ in SHARED_ROWS.values() if outcome_ == "skip")
    assert f"skipped {skipped} of {18 + len(SHARED_ROWS)} rows" in err
    if outcome == "used":
        assert name in shared_run["indexed"] and f"skipped {name}:" not in err
        return
    named = f"skipped {name}: " if name else "skipped row "
    lines = [x for x in err.splitlines() if x.startswith(named) and reason in x]
    assert len(lines) == 1, err
    if row != "duplicated_image_name":  # the first COVID-1 row is kept
        assert name not in shared_run["indexed"]


def _copy(data: Path, root: Path) -> Path:
    shutil.copytree(data, root)
    return root


def _write_csv(content: Callable[[str], str | bytes]) -> Callable[[Path, Path], Path]:
    """Rows: a copy of the tiny data whose CSV is ``content(original CSV text)``."""

    def make(root: Path, data: Path) -> Path:
        _copy(data, root)
        text = content((data / CSV).read_text(encoding="utf-8"))
        (root / CSV).write_bytes(text if isinstance(text, bytes) else text.encode())
        return root

    return make


def _headed(columns: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    def content(text: str) -> str:
        frame = pd.DataFrame(
            [[*(line.split(",")[-1:]), *line.split(",")[1:-1]] for line in text.splitlines()],
            columns=["image_name", *HEADED_COLUMNS],
        )
        return frame[columns(["image_name", *HEADED_COLUMNS])].to_csv(index=False)

    return content


def _each_line(change: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    return lambda text: "\n".join(",".join(change(x.split(","))) for x in text.splitlines())


def _no_images(root: Path, data: Path) -> Path:
    _copy(data, root)
    shutil.rmtree(root / "dataset")
    (root / "dataset").mkdir()
    return root


def _no_csv(root: Path, data: Path) -> Path:
    _copy(data, root)
    (root / CSV).unlink()
    return root


def _data_file(root: Path, data: Path) -> Path:
    root.mkdir()
    (root / "data.png").write_bytes(_png_bytes())
    return root / "data.png"


# Inputs that stop `cxrlandmarks-train`: exit 2, exactly one `error:` line, no traceback.
ERROR_ROWS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty_data_dir": (lambda r, d: r.mkdir() or r, "image directory not found"),
    "data_dir_missing": (lambda r, d: r / "nowhere", "data directory not found"),
    "data_dir_is_a_file": (_data_file, "data directory not found"),
    "csv_missing": (_no_csv, "file not found"),
    "zero_byte_csv": (_write_csv(lambda t: ""), "the CSV is empty"),
    "non_utf8_csv": (
        _write_csv(lambda t: t.replace("Normal-1\n", "Normal-1\xe9\n").encode("latin-1")),
        "not UTF-8",
    ),
    "headerless_wrong_number_of_coordinates": (
        _write_csv(_each_line(lambda f: [*f[:-2], f[-1]])),
        "expected 32 columns (id, 15 x/y pairs, image name), found 31",
    ),
    "headerless_extra_column": (
        _write_csv(_each_line(lambda f: [*f, "extra"])),
        "expected 32 columns (id, 15 x/y pairs, image name), found 33",
    ),
    "headerless_row_with_extra_fields": (
        _write_csv(lambda t: t.replace("Normal-1\n", "Normal-1,7\n")),
        "cannot parse CSV",
    ),
    "headed_missing_column": (
        _write_csv(_headed(lambda cols: [c for c in cols if c != "L15_y"])),
        "missing column(s) L15_y",
    ),
    "headed_duplicated_column": (
        _write_csv(_headed(lambda cols: [*cols, "L7_x"])),
        "duplicated column(s): L7_x.1",
    ),
    "header_only": (
        _write_csv(lambda t: "image_name," + ",".join(HEADED_COLUMNS) + "\n"),
        "no usable rows",
    ),
    "every_row_broken": (
        _write_csv(_each_line(lambda f: [f[0], "nan", *f[2:]])),
        "no usable rows",
    ),
    # Every annotated row without its image: far over the 2% bar, counted per category.
    "image_folder_empty": (_no_images, "18 of 18 annotated rows (100.0%) have no image file"),
    "too_few_images_to_split": (
        _write_csv(lambda t: "\n".join(t.splitlines()[:2]) + "\n"),
        "data.split_ratios: cannot split 2 samples into train, val, test",
    ),
}


@pytest.mark.parametrize("row", list(ERROR_ROWS))
def test_broken_training_data_is_one_line_error(
    row: str, data_dir: Path, tmp_path: Path, capsys
) -> None:
    make, expected = ERROR_ROWS[row]
    root = make(tmp_path / "data", data_dir)
    run = tmp_path / "run"
    code, _, err = call_main(train, _train_argv(root, run, phase="1"), capsys)
    assert code == 2, err
    assert expected in error_line(err)
    assert not (run / "checkpoints").exists() and not (run / ".lock").exists()
    if row.startswith("data_dir"):
        assert not run.exists()  # refused before the run directory is made


@pytest.mark.parametrize("row", ["non_utf8_csv", "headed_missing_column", "empty_data_dir"])
def test_broken_eval_data_is_one_line_error(
    row: str, data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    make, expected = ERROR_ROWS[row]
    root = make(tmp_path / "data", data_dir)
    ckpt = reference / "checkpoints" / "geometric_complete.pt"
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(root), "--device", "cpu"]
    code, _, err = call_main(evaluate, [*argv, "--output-dir", str(tmp_path / "eval")], capsys)
    assert code == 2, err
    assert expected in error_line(err)
    assert not (tmp_path / "eval").exists()


# Files in a folder given to `cxrlandmarks-predict`: (file name, content, outcome, reason).
PREDICT_FILES: dict[str, tuple[str, bytes | str, str, str]] = {
    "zero_byte_png": ("empty.png", b"", "skip", "empty file (0 bytes)"),
    "truncated_png": ("cut.png", _png_bytes()[:300], "skip", "cannot decode image"),
    "truncated_jpeg": ("cut.jpg", _jpeg_bytes()[:400], "skip", "cannot decode image"),
    "decompression_bomb_header": (
        "bomb.png",
        png_header_only(50_000, 50_000),
        "skip",
        "decompression bomb",
    ),
    "sixteen_bit_png": ("sixteen.png", "I;16", "used", ""),
    "palette_png": ("palette.png", "P", "used", ""),
}


@pytest.fixture(scope="module")
def predict_run(reference: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One predict run (flip TTA) over a folder holding every PREDICT_FILES row."""
    base = tmp_path_factory.mktemp("predict")
    folder = base / "in" / "nested"
    folder.mkdir(parents=True)
    good = Image.open(data_dir / "dataset" / "Normal" / "Normal-2.png")
    good.save(folder / "good.png")
    for name, content, _, _ in PREDICT_FILES.values():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (_sixteen_bit(good) if content == "I;16" else good.convert(content)).save(folder / name)
    ckpts = reference / "checkpoints"
    argv = [
        str(base / "in"),
        *("--checkpoint", str(ckpts / "geometric_complete.pt")),
        *("--tta-flip", "--no-overlays", "--device", "cpu"),
        *("--output-dir", str(base / "out")),
    ]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        code = predict(argv)
    return {"code": code, "err": err.getvalue(), "folder": folder, "out": base / "out"}


@pytest.mark.parametrize("row", list(PREDICT_FILES))
def test_broken_image_for_predict_is_named_and_the_job_goes_on(row: str, predict_run: dict) -> None:
    name, _, outcome, reason = PREDICT_FILES[row]
    err, path = predict_run["err"], predict_run["folder"] / name
    assert predict_run["code"] == 0, err
    assert "Traceback" not in err and "error:" not in err
    frame = pd.read_csv(predict_run["out"] / "predictions.csv")
    used = [n for n, _, o, _ in PREDICT_FILES.values() if o == "used"]
    assert sorted(Path(p).name for p in frame["image_path"]) == sorted(["good.png", *used])
    assert [Path(p).stem for p in frame["image_path"]] == list(frame["image_name"])
    coords = frame[HEADED_COLUMNS].to_numpy()
    assert np.isfinite(coords).all() and (coords >= 0).all() and (coords <= SIZE).all()
    if outcome == "used":
        assert str(path) in set(frame["image_path"])
    else:
        lines = [x for x in err.splitlines() if x.startswith(f"skipped {path}: ")]
        assert len(lines) == 1 and reason in lines[0], err


def _only_broken(folder: Path) -> None:
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(_jpeg_bytes()[:100])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty folder", "no .png/.jpg images found"),
        ("only broken images", "none of the 2 images could be read"),
        ("missing path", "no such image file or folder"),
    ],
)
def test_predict_with_nothing_readable_is_one_line_error(
    case: str, expected: str, reference: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "in"
    if case != "missing path":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    if case == "only broken images":
        _only_broken(folder)
    ckpt = reference / "checkpoints" / "geometric_complete.pt"
    argv = [str(folder), "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "out")]
    code, _, err = call_main(predict, [*argv, "--device", "cpu"], capsys)
    assert code == 2, err
    assert expected in error_line(err)
    assert not (tmp_path / "out").exists()


# -- 7: NaN batches ---------------------------------------------------------------------------


def _poison(monkeypatch: pytest.MonkeyPatch, when: Callable[[int], bool]) -> None:
    """NaN pixels in the training samples whose (1-based) draw number satisfies ``when``."""
    original = LandmarkDataset.__getitem__
    calls = [0]

    def getitem(self: LandmarkDataset, index: int) -> dict:
        item = original(self, index)
        if self.augment is not None:  # the training set
            calls[0] += 1
            if when(calls[0]):
                item["image"] = torch.full_like(item["image"], float("nan"))
        return item

    monkeypatch.setattr(LandmarkDataset, "__getitem__", getitem)


# _poison finds the training set as the one that augments per sample: the CPU path.
PER_SAMPLE = "augment.batched=false"


def test_nan_batch_is_skipped_with_a_warning(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _poison(monkeypatch, lambda n: n == 1)  # one sample of the first batch
    run = tmp_path / "run"
    argv = _train_argv(data_dir, run, "phases.phase1.max_steps_per_epoch=3", PER_SAMPLE, phase="1")
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 0; step skipped"):
        code, _, err = call_main(train, argv, capsys)
    assert code == 0, err
    events = [json.loads(x) for x in (run / "phase1" / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "nonfinite_loss" for e in events) == 1
    state = load_checkpoint(run / "phase1" / "checkpoints" / "final.pt", kind=KIND)
    assert state["global_step"] == 2 and all_finite(state["model"])  # BatchNorm stats too
    assert all_finite(_model(run / "checkpoints" / "phase1_best.pt"))


def test_nan_every_step_stops_cleanly_keeping_the_last_good_checkpoint(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _poison(monkeypatch, lambda n: n > 8)  # epoch 1 (2 batches of 4) is fine, then NaN only
    run = tmp_path / "run"
    items = (
        "phases.phase1.epochs=3",
        "phases.phase1.max_steps_per_epoch=2",
        "trainer.max_nonfinite_steps=2",
        "trainer.save_interval_s=0",  # every epoch end (the demo config: at most every 30 s)
        PER_SAMPLE,
    )
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        code, _, err = call_main(train, _train_argv(data_dir, run, *items, phase="1"), capsys)
    assert code == 2
    line = error_line(err)
    ckpts = run / "phase1" / "checkpoints"
    assert "NaN/inf for 2 consecutive steps" in line and str(ckpts / "latest.pt") in line
    state = load_checkpoint(ckpts / "latest.pt", kind=KIND)
    assert state["epoch"] == 1 and state["global_step"] == 2 and all_finite(state["model"])
    assert all_finite(_model(ckpts / "phase1_best.pt"))
    assert not (ckpts / "final.pt").exists() and not (run / "checkpoints").exists()
    assert not (run / ".lock").exists()
