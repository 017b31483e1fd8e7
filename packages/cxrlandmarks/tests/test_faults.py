"""Fault injection and broken inputs through cxrlandmarks' own commands, beyond the run contract
every package keeps (test_run_contract.py: kill -9 inside a phase and resume, a second job, a
full disk, unsafe and foreign checkpoints for every command, broken training data, NaN batches).

Covered here: broken rows and images named while training goes on; broken data given to eval; a
table of broken images for predict. Not here: preprocessing (cxrlandmarks has no preprocess
command) and DDP rank failure (medcore's own fault tests cover it at Trainer level; cxrlandmarks
has no distributed code of its own beyond the Trainer's, and a 2-process run of it costs far more
than the suite's CPU budget).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlandmarks.cli import evaluate, predict, train
from cxrlandmarks.data import HEADED_COLUMNS
from medcore.testing import call_main, error_line, png_header_only

pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("ignore:cannot stratify:UserWarning")]

CSV = "coordenadas/coordenadas_maestro.csv"
SIZE = 64  # side of the tiny test radiographs, px
# One step per phase.
TINY = [
    "num_threads=1",
    "data.image_size=32",
    "data.eval_batch_size=32",
    "eval.grid_images=2",
    "trainer.num_workers=0",
    *(f"phases.phase{p}.epochs=1" for p in range(1, 5)),
    *(f"phases.phase{p}.batch_size=4" for p in range(1, 5)),
    *(f"phases.phase{p}.max_steps_per_epoch=1" for p in range(1, 5)),
]


def _train_argv(data: Path, out: Path, *items: str, phase: str = "all") -> list[str]:
    sets = [arg for item in [*TINY, *items] for arg in ("--set", item)]
    return [
        *("--data-dir", str(data), "--output-dir", str(out)),
        *("--config", "default", "--device", "cpu", "--phase", phase, *sets),
    ]


@pytest.fixture(autouse=True)
def _isolated(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set num_threads=1; leave other tests as they were


@pytest.fixture(scope="module")
def data_dir(tiny_radiographs: Path) -> Path:
    return tiny_radiographs


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-phase run: the checkpoints the predict / eval cases use."""
    run = tmp_path_factory.mktemp("runs") / "full"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(_train_argv(data_dir, run)) == 0
    torch.set_num_threads(threads)
    return run


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


def _copy_with_csv(content: Callable[[str], str | bytes]) -> Callable[[Path, Path], Path]:
    """A copy of the tiny data whose CSV is ``content(original CSV text)``."""

    def make(root: Path, data: Path) -> Path:
        shutil.copytree(data, root)
        text = content((data / CSV).read_text(encoding="utf-8"))
        (root / CSV).write_bytes(text if isinstance(text, bytes) else text.encode())
        return root

    return make


def _without(column: str) -> Callable[[str], str]:
    """The CSV with a header and without ``column``."""

    def content(text: str) -> str:
        rows = [[*(line.split(",")[-1:]), *line.split(",")[1:-1]] for line in text.splitlines()]
        frame = pd.DataFrame(rows, columns=["image_name", *HEADED_COLUMNS])
        return frame.drop(columns=column).to_csv(index=False)

    return content


# Data directories `cxrlandmarks-eval` refuses (train's: test_run_contract.py).
EVAL_ERRORS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "empty_data_dir": (lambda r, d: r.mkdir() or r, "image directory not found"),
    "non_utf8_csv": (
        _copy_with_csv(lambda t: t.replace("Normal-1\n", "Normal-1\xe9\n").encode("latin-1")),
        "not UTF-8",
    ),
    "headed_missing_column": (_copy_with_csv(_without("L15_y")), "missing column(s) L15_y"),
}


@pytest.mark.parametrize("row", list(EVAL_ERRORS))
def test_broken_eval_data_is_one_line_error(
    row: str, data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    make, expected = EVAL_ERRORS[row]
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
