"""Fault injection and broken inputs through histommnet's own commands, beyond the run contract
every package keeps (test_run_contract.py: kill -9 and resume, a second job, a full disk, unsafe
and foreign checkpoints also given to gradcam, broken data directories, nothing to resume, NaN
batches).

Covered here: a table of broken BreakHis trees, tiles and resumed runs' splits, each named while
training goes on or refused in one line; a tile that fails only at load time. Not here:
preprocessing (histommnet has no preprocess command) and DDP rank failure (medcore's own fault
tests cover it at Trainer level; histommnet adds nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histommnet.breakhis import scan_breakhis
from histommnet.cli import train
from histommnet.config import DataConfig
from histommnet.data import MultiMagDataset, Normalize, WorkingImages
from medcore.data.splits import save_splits
from medcore.io import load_image
from medcore.testing import call_main, error_line, png_header_only, random_image

pytestmark = pytest.mark.faults
NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}

TINY = [
    "num_threads=1",
    "model.backbone=test_efficientnet",
    "model.embed_dim=32",
    "model.attention_scales=[1,3]",
    "data.image_size=32",
    "data.eval_max_draws=2",
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=2",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "cv.folds=2",
]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*TINY, *items] for arg in ("--set", item)]


def _train_argv(data: Path, out: Path, *items: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--fold", "0", *_sets(*items)]


@pytest.fixture(scope="module")
def breast(tiny_tree: Path) -> Path:
    return tiny_tree / "BreaKHis_v1" / "histology_slides" / "breast"


def _write_run_config(run_dir: Path, data_dir: Path, extra: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"num_threads: 1\ndata:\n  data_dir: {data_dir}\n  image_size: 32\n  aspect_ratio: 1.0\n"
        "model:\n  backbone: test_efficientnet\n  pretrained: false\n  embed_dim: 32\n"
        "  attention_scales: [1, 3]\n"
        f"cv:\n  folds: 2\n  fold: 0\ntrainer:\n  num_workers: 0\n{extra}",
        encoding="utf-8",
    )


# -- 6: broken BreakHis inputs ----------------------------------------------------------------

# (class folder, tumour folder, patient folder)
BENIGN = ("benign", "fibroadenoma", "SOB_B_F_14-1003")
MALIGNANT = ("malignant", "ductal_carcinoma", "SOB_M_DC_14-1009")


def _tile(root: Path, seq: int, mag: str = "40X", patient=BENIGN, name: str | None = None) -> Path:
    cls, folder, key = patient
    _, letter, code, slide = key.split("_")
    name = name or f"SOB_{letter}_{code}-{slide}-{mag[:-1]}-{seq:03d}.png"
    path = root / cls / "SOB" / folder / key / mag / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image((32, 32), seed=3)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _image(path: Path, img: Image.Image) -> Path:
    img.save(path, format="PNG")
    return path


def _missing_magnification(root: Path) -> str:
    cls, folder, key = MALIGNANT
    shutil.rmtree(root / cls / "SOB" / folder / key / "400X")
    return f"note: patient {key}: missing magnification filled (400X from 200X)"


def _sixteen_bit(root: Path) -> Path:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    return _image(_tile(root, 94), Image.fromarray(ramp))


# Rows applied together to one copy of the tiny tree, trained on once: each bad item must be a
# named skip (or a note) and the job must go on; "used" rows are odd but valid PNGs.
SHARED_ROWS: dict[str, tuple[Callable[[Path], Path | str], str, str]] = {
    "zero_byte_png": (lambda r: _write(_tile(r, 81), b""), "skip", "empty file (0 bytes)"),
    "truncated_png": (
        lambda r: _write(_tile(r, 82), _png_bytes()[:200]),
        "skip",
        "cannot decode image",
    ),
    "text_named_png": (
        lambda r: _write(_tile(r, 83), b"not an image\n"),
        "skip",
        "cannot decode image",
    ),
    "decompression_bomb_header": (
        lambda r: _write(_tile(r, 84), png_header_only(50_000, 50_000)),
        "skip",
        "decompression bomb",
    ),
    "name_does_not_parse": (
        lambda r: _write(_tile(r, 0, name="IMG_0001.png"), _png_bytes()),
        "skip",
        "file name does not match",
    ),
    "unknown_tumour_code": (
        lambda r: _write(_tile(r, 0, name="SOB_B_XX-14-1003-40-086.png"), _png_bytes()),
        "skip",
        "unknown tumour type 'XX'",
    ),
    "name_disagrees_with_class_folder": (
        lambda r: _write(_tile(r, 0, name="SOB_M_DC-14-1003-40-087.png"), _png_bytes()),
        "skip",
        "name says malignant, folder says benign",
    ),
    "name_disagrees_with_magnification": (
        lambda r: _write(_tile(r, 0, name="SOB_B_F-14-1003-400-088.png"), _png_bytes()),
        "skip",
        "name says 400X, folder says 40X",
    ),
    "label_folder_outside_benign_malignant": (
        lambda r: _write(
            _tile(r, 89, patient=("borderline", "fibroadenoma", "SOB_B_F_14-1003")), _png_bytes()
        ),
        "skip",
        "not inside a BreakHis tree",
    ),
    "png_outside_the_tree_layout": (
        lambda r: _write(r / "SOB_B_F-14-1003-40-090.png", _png_bytes()),
        "skip",
        "not inside a BreakHis tree",
    ),
    "patient_missing_a_magnification": (_missing_magnification, "note", ""),
    "sixteen_bit_png": (_sixteen_bit, "used", ""),
    "palette_png": (
        lambda r: _image(
            _tile(r, 95), Image.fromarray(random_image((32, 32), seed=4)).convert("P")
        ),
        "used",
        "",
    ),
    "rgba_png": (
        lambda r: _image(_tile(r, 96), Image.fromarray(random_image((32, 32), 4, seed=5))),
        "used",
        "",
    ),
}


@pytest.fixture(scope="module")
def shared_run(breast: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training run over a tree holding every SHARED_ROWS defect at once."""
    base = tmp_path_factory.mktemp("broken")
    root = base / "breast"
    shutil.copytree(breast, root)
    made = {name: make(root) for name, (make, _, _) in SHARED_ROWS.items()}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train(_train_argv(root, base / "run"))
    indexed = {r.path for r in scan_breakhis(root, verbose=False).images}
    return {
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "run": base / "run",
        "made": made,
        "indexed": indexed,
    }


def _empty_class(root: Path, breast: Path) -> list[str]:
    shutil.copytree(breast / "benign", root / "benign")
    (root / "malignant" / "SOB" / "ductal_carcinoma").mkdir(parents=True)
    return ["--data-dir", str(root)]


def _all_images_broken(root: Path, breast: Path) -> list[str]:
    for patient in (BENIGN, MALIGNANT):
        _write(_tile(root, 1, patient=patient), b"")
    return ["--data-dir", str(root)]


def _two_patients(root: Path, breast: Path) -> list[str]:
    for cls, folder, key in (BENIGN, MALIGNANT):
        shutil.copytree(breast / cls / "SOB" / folder / key, root / cls / "SOB" / folder / key)
    return ["--data-dir", str(root)]


def _resume_with(splits: str | bytes | None = None, config_extra: str = "", config: str = ""):
    def make(root: Path, breast: Path) -> list[str]:
        _write_run_config(root, breast, config_extra)
        if config:
            (root / "config.yaml").write_text(config, encoding="utf-8")
        if splits is not None:
            path = root / "splits.json"
            path.write_bytes(splits if isinstance(splits, bytes) else splits.encode())
        return ["--resume", str(root)]

    return make


def _splits_of_other_data(root: Path, breast: Path) -> list[str]:
    argv = _resume_with()(root, breast)
    folds = [{name: np.array([i]) for i, name in enumerate(("train", "val", "test"))}]
    save_splits(root / "splits.json", folds, ids=["x", "y", "z"])
    return argv


# Rows that stop the command: exit 2, exactly one `error:` line, no traceback.
ERROR_ROWS: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "empty_class": (_empty_class, "no malignant patient found"),
    "every_image_broken": (_all_images_broken, "no usable BreakHis images"),
    "too_few_patients_for_folds": (_two_patients, "cv.folds: n_splits=2"),
    "resume_truncated_splits_json": (_resume_with(splits='{"format": "medc'), "splits.json"),
    "resume_non_utf8_splits_json": (_resume_with(splits=b"\xff\xfe{}"), "splits.json"),
    "resume_splits_of_other_data": (_splits_of_other_data, "splits.json"),
    "resume_config_unknown_key": (_resume_with(config="data:\n  nope: 1\n"), "data.nope"),
}


@pytest.mark.parametrize("row", list(SHARED_ROWS))
def test_broken_input_is_named_and_the_job_goes_on(row: str, shared_run: dict) -> None:
    _, outcome, reason = SHARED_ROWS[row]
    run, err, made = shared_run["run"], shared_run["err"], shared_run["made"][row]
    assert shared_run["code"] == 0, err
    assert "Traceback" not in err and "mean ± std" in shared_run["out"]
    skipped = {path: why for path, why in json.loads((run / "dataset.json").read_text())["skipped"]}
    if outcome == "skip":
        assert f"skip {made}: " in err and reason in skipped[str(made)]
        assert str(made) not in shared_run["indexed"]
    elif outcome == "note":
        assert made in err
    else:  # an odd but valid PNG: indexed, decoded to RGB, normalised to finite values
        assert str(made) in shared_run["indexed"] and str(made) not in skipped
        pixels = load_image(made)
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
        assert pixels.max() > pixels.min()  # 16-bit: rescaled from its range, not clipped
        cfg = DataConfig(image_size=32, aspect_ratio=1.0, **NORM)
        image = WorkingImages([str(made)], cfg, progress=False).get(str(made))
        assert torch.isfinite(Normalize(cfg)(image)).all()
    assert f"skipped {len(skipped)} item(s)" in err


@pytest.mark.parametrize("row", list(ERROR_ROWS))
def test_broken_input_is_one_line_error(row: str, breast: Path, tmp_path: Path, capsys) -> None:
    make, expected = ERROR_ROWS[row]
    root = tmp_path / "data"
    root.mkdir()
    argv = make(root, breast)
    if "--resume" not in argv:
        argv += ["--output-dir", str(tmp_path / "run"), *_sets()]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2, err
    assert expected in error_line(err)


def test_image_failing_at_load_time_is_replaced(breast: Path, tmp_path: Path, capsys) -> None:
    """With ``data.check_images=false`` a corrupt tile surfaces in the loader: named once, replaced."""
    root = tmp_path / "breast"
    _two_patients(root, breast)
    bad = _write(_tile(root, 1), _png_bytes()[:100])  # overwrite the first 40X tile
    index = scan_breakhis(root, ("40X",), check_images=False, verbose=False)
    patient = next(p for p in index.patients if p.key == BENIGN[2])
    ds = MultiMagDataset(
        [patient], DataConfig(image_size=32, magnifications=["40X"], **NORM), train=False
    )
    images = torch.stack([ds[i]["images"] for i in range(len(ds))])
    assert torch.isfinite(images).all()
    err = capsys.readouterr().err
    assert err.count(f"skip {bad}: cannot decode image") == 1
