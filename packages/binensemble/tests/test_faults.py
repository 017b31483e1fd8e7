"""Fault injection and broken inputs through binensemble's own commands, beyond the run contract
every package keeps (test_run_contract.py: kill -9 of ``--model metric`` and resume, a second
job, a full disk, unsafe and foreign checkpoints also given to predict, broken data directories,
nothing to resume, NaN batches).

Covered here: ``--resume latest`` of a run of the other model; broken images named while training
goes on; too few images to split; an empty test folder; broken inputs of predict, vote and
analyze. Not here: preprocessing (binensemble has no preprocess command) and DDP rank failure
(medcore's own fault tests cover it at Trainer level; a package-level torchrun case would cost
two extra interpreters importing torch and timm, far over the CPU budget).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from binensemble.cli import analyze, predict, train, vote
from binensemble.config import BinEnsembleConfig
from medcore.config import load_config, packaged_config_path, save_config
from medcore.testing import call_main, error_line, png_header_only, random_image

pytestmark = pytest.mark.faults

TINY = [
    "num_threads=1",
    "device=cpu",
    "data.img_size=32",
    "data.eval_batch_size=16",
    "model.convnext_name=test_convnext",
    "model.vit_name=test_vit",
    "model.hidden_dim=32",
    "model.embed_dim=16",
    "trainer.batch_size=8",
    "trainer.num_workers=0",
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=2",
    "knn.ks=[1,3,5]",
]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*TINY, *items] for arg in ("--set", item)]


def _train_argv(data: Path, out: Path, *items: str, model: str = "metric") -> list[str]:
    return ["--model", model, "--data-dir", str(data), "--output-dir", str(out), *_sets(*items)]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set num_threads=1; leave other tests as they were


def _run_config(run: Path, data: Path, kind: str = "metric") -> None:
    """A run directory as train leaves it once started (config.yaml of the tiny config)."""
    cfg = load_config(
        BinEnsembleConfig,
        packaged_config_path("binensemble", "default"),
        overrides=[*TINY, f"data.data_dir={data}", f"output_dir={run}", f"model.kind={kind}"],
    )
    save_config(cfg, run / "config.yaml")


def test_resume_latest_of_a_run_of_the_other_model_is_one_line_error(
    tiny_data: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    _run_config(run, tiny_data)
    (run / "checkpoints").mkdir()
    argv = ["--resume", "latest", "--output-dir", str(run), "--model", "baseline"]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2, err
    assert "holds a --model metric run" in error_line(err)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


# -- 6: broken inputs ----------------------------------------------------------------------------


def _png(seed: int = 3, size: int = 40) -> Image.Image:
    return Image.fromarray(random_image((size, size), seed=seed))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Image.Image):
        data.save(path)
    else:
        path.write_bytes(data)
    return path


def _float_tiff_with_nan() -> Image.Image:
    pixels = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    pixels[3, 3], pixels[5, 5] = np.nan, np.inf
    return Image.fromarray(pixels, mode="F")


def _sixteen_bit() -> Image.Image:
    return Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)


# Defects applied together to one copy of the tiny data set, trained on once: a broken file is a
# named skip and the job goes on; an odd but valid file is used. (relative path, content,
# outcome, what the skip line says)
SHARED_ROWS: dict[str, tuple[str, Callable[[], bytes | Image.Image], str, str]] = {
    "zero_byte_png": ("TrainSet/normal/zero.png", lambda: b"", "skip", "empty file (0 bytes)"),
    "truncated_png": (
        "TrainSet/disease/cut.png",
        lambda: _encoded(_png(), "PNG")[:200],
        "skip",
        "cannot decode image",
    ),
    "truncated_jpeg": (
        "TrainSet/normal/cut.jpg",
        lambda: _encoded(_png(), "JPEG")[:400],
        "skip",
        "cannot decode image",
    ),
    "text_named_png": (
        "TrainSet/disease/notes.png",
        lambda: b"not an image\n",
        "skip",
        "cannot decode image",
    ),
    "decompression_bomb_header": (
        "TrainSet/normal/bomb.png",
        lambda: png_header_only(50_000, 50_000),
        "skip",
        "decompression bomb",
    ),
    "float_tiff_nan_inf_pixels": (
        "TrainSet/disease/float.tif",
        _float_tiff_with_nan,
        "skip",
        "NaN or infinite pixel values",
    ),
    "zero_byte_test_image": ("TestSet/7.png", lambda: b"", "skip", "empty file (0 bytes)"),
    "sixteen_bit_png": ("TrainSet/normal/deep.png", _sixteen_bit, "used", ""),
    "palette_png": ("TrainSet/disease/pal.png", lambda: _png(4).convert("P"), "used", ""),
    "rgba_png": (
        "TrainSet/normal/alpha.png",
        lambda: Image.fromarray(random_image((40, 40), 4, seed=5)),
        "used",
        "",
    ),
    "palette_test_image": ("TestSet/8.png", lambda: _png(6).convert("P"), "used", ""),
    "sixteen_bit_test_image": ("TestSet/9.png", _sixteen_bit, "used", ""),
}


@pytest.fixture(scope="module")
def shared_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One baseline run (1 step, no TTA) over a data set holding every SHARED_ROWS defect."""
    base = tmp_path_factory.mktemp("broken")
    root = base / "data"
    shutil.copytree(tiny_data, root)
    made = {name: _write(root / rel, make()) for name, (rel, make, _, _) in SHARED_ROWS.items()}
    labels = pd.read_csv(root / "TestSet_labels.csv", dtype={"image_id": str})
    extra = pd.DataFrame({"image_id": ["7", "8", "9"], "label": [0, 1, 0]})
    pd.concat([labels, extra]).to_csv(root / "TestSet_labels.csv", index=False)
    run = base / "run"
    argv = _train_argv(root, run, "trainer.max_steps_per_epoch=1", "predict.tta=false")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(base / "cache"))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train(["--model", "baseline", *argv[2:]])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "run": run, "made": made}


@pytest.mark.parametrize("row", list(SHARED_ROWS))
def test_broken_image_is_named_and_the_job_goes_on(row: str, shared_run: dict) -> None:
    rel, _, outcome, reason = SHARED_ROWS[row]
    run, err, made = shared_run["run"], shared_run["err"], shared_run["made"][row]
    assert shared_run["code"] == 0, err
    assert "Traceback" not in err and "error:" not in err and "baseline" in shared_run["out"]
    skips = [line for line in err.splitlines() if line.startswith("skipped ")]
    named = [line for line in skips if line.startswith(f"skipped {made}: ")]
    test_ids = pd.read_csv(run / "predictions" / "baseline.csv", dtype={"image_id": str})
    train_ids = (run / "splits.json").read_text()
    image_id = made.stem if rel.startswith("TestSet") else f"{made.parent.name}/{made.stem}"
    used = (
        image_id in set(test_ids["image_id"])
        if rel.startswith("TestSet")
        else (f'"{image_id}"' in train_ids)
    )
    if outcome == "skip":
        assert len(named) == 1 and reason in named[0], err
        assert not used
    else:
        assert not named and used
    assert "TrainSet: skipped 6 unreadable image(s)" in err
    assert "TestSet: skipped 1 unreadable image(s)" in err


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_too_few_images_for_a_train_and_validation_part_is_one_line_error(
    tiny_data: Path, tmp_path: Path, capsys
) -> None:
    # 24 labelled images, 99 % for validation: the train part would be empty.
    run = tmp_path / "run"
    argv = _train_argv(tiny_data, run, "data.val_fraction=0.99")
    code, _, err = call_main(train, argv, capsys)
    assert code == 2, err
    assert "data.val_fraction: cannot take a fraction 0.99 of 24 samples" in error_line(err)
    assert not (run / "metric" / "splits.json").exists()


def test_empty_test_folder_is_named_and_training_goes_on(
    tiny_data: Path, tmp_path: Path, capsys
) -> None:
    data = _copy(tiny_data, tmp_path / "data")
    for f in (data / "TestSet").iterdir():
        f.unlink()
    run = tmp_path / "run"
    argv = _train_argv(data, run, "trainer.max_steps_per_epoch=1", "predict.tta=false")
    code, _out, err = call_main(train, ["--model", "baseline", *argv[2:]], capsys)
    assert code == 0, err
    assert f"warning: {data / 'TestSet'}: no images" in err and "no test predictions" in err
    assert (run / "model.pt").is_file() and (run / "predictions" / "baseline_val.csv").is_file()
    assert not (run / "predictions" / "baseline.csv").exists()


# binensemble-predict with the shared run's model: exit 2, one `error:` line, nothing written.
PREDICT_ERRORS: dict[str, tuple[Callable[[Path, Path, Path], list[str]], str]] = {
    "empty_test_folder": (
        lambda data, model, r: [str(model), "--data-dir", str(_emptied(data, r, "*"))],
        "no images (.png",
    ),
    "test_folder_only_broken_images": (
        lambda data, model, r: [str(model), "--data-dir", str(_emptied(data, r, "zero"))],
        "no readable image",
    ),
    "no_test_folder": (
        lambda data, model, r: [str(model), "--data-dir", str(r)],
        "test folder not found",
    ),
    "data_dir_missing": (
        lambda data, model, r: [str(model), "--data-dir", str(r / "nowhere")],
        "data directory not found",
    ),
    "model_zero_byte": (
        lambda data, model, r: [str(_write(r / "model.pt", b"")), "--data-dir", str(data)],
        "empty file (0 bytes)",
    ),
    "model_truncated": (
        lambda data, model, r: [
            str(_write(r / "model.pt", (model / "model.pt").read_bytes()[:20_000])),
            "--data-dir",
            str(data),
        ],
        "truncated or corrupt",
    ),
    "model_dir_without_model": (
        lambda data, model, r: [str(r), "--data-dir", str(data)],
        "checkpoint not found",
    ),
}


def _emptied(data: Path, root: Path, how: str) -> Path:
    """A data dir whose TestSet holds nothing (``*``) or only a zero-byte image (``zero``)."""
    (root / "TestSet").mkdir()
    if how == "zero":
        _write(root / "TestSet" / "1.png", b"")
    return root


@pytest.mark.parametrize("row", list(PREDICT_ERRORS))
def test_broken_predict_input_is_one_line_error(
    row: str, shared_run: dict, tmp_path: Path, capsys
) -> None:
    make, expected = PREDICT_ERRORS[row]
    root = tmp_path / "data"
    root.mkdir()
    argv = make(shared_run["run"].parent / "data", shared_run["run"], root)
    out = tmp_path / "pred"
    code, _, err = call_main(predict, [*argv, "--output-dir", str(out)], capsys)
    assert code == 2, err
    assert expected in error_line(err)
    assert not out.exists()


# binensemble-vote / -analyze on broken probability files (file "a" is good; "b" is edited).
def _probs(ids=("1", "2", "3"), p1=(0.6, 0.1, 0.8), target=(1, 0, 1)) -> pd.DataFrame:
    p1 = np.asarray(p1, dtype=float)
    return pd.DataFrame(
        {"image_id": list(ids), "prob_normal": 1 - p1, "prob_disease": p1, "target": list(target)}
    )


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


VOTE_ERRORS: dict[str, tuple[Callable[[], bytes], list[str], str]] = {
    "missing_prob_column": (lambda: _csv(_probs().drop(columns="prob_normal")), [], "exactly two"),
    "missing_image_id_column": (
        lambda: _csv(_probs().drop(columns="image_id")),
        [],
        "missing column(s) image_id",
    ),
    "extra_prob_column": (
        lambda: _csv(_probs().assign(prob_other=0.0)),
        [],
        "needs exactly two prob_<class> columns",
    ),
    "duplicated_column": (
        lambda: b"image_id,prob_normal,prob_disease,prob_disease\n1,0.4,0.6,0.6\n",
        [],
        "duplicated column(s)",
    ),
    "duplicated_ids": (
        lambda: _csv(_probs(ids=("1", "2", "2"))),
        [],
        "duplicated image_id value(s): 2",
    ),
    "missing_id": (
        lambda: _csv(_probs().iloc[:2]),
        [],
        "1 image(s) of a.csv missing (e.g. '3')",
    ),
    "extra_id": (
        lambda: _csv(pd.concat([_probs(), _probs(ids=("4",), p1=(0.5,), target=(0,))])),
        [],
        "1 image(s) not in a.csv (e.g. '4')",
    ),
    "mismatched_ids": (
        lambda: _csv(_probs(ids=("1", "2", "x"))),
        [],
        "does not match",
    ),
    "empty_image_id": (
        lambda: b"image_id,prob_normal,prob_disease\n1,0.4,0.6\n,0.5,0.5\n3,0.2,0.8\n",
        [],
        "empty image_id on line 3",
    ),
    "probability_above_1": (lambda: _csv(_probs(p1=(1.5, 0.1, 0.8))), [], "in [0, 1]"),
    "probability_negative": (lambda: _csv(_probs(p1=(-0.2, 0.1, 0.8))), [], "in [0, 1]"),
    "probability_nan": (lambda: _csv(_probs(p1=(np.nan, 0.1, 0.8))), [], "in [0, 1]"),
    "probabilities_not_summing_to_1": (
        lambda: b"image_id,prob_normal,prob_disease\n1,0.4,0.4\n2,0.9,0.1\n3,0.2,0.8\n",
        [],
        "of image '1' do not sum to 1",
    ),
    "probability_not_a_number": (
        lambda: b"image_id,prob_normal,prob_disease\n1,0.4,high\n2,0.9,0.1\n3,0.2,0.8\n",
        [],
        "hold non-numbers",
    ),
    "target_outside_0_1": (
        lambda: _csv(_probs(target=(2, 0, 1))),
        [],
        "target of image '1' is 2; targets must be class ids 0..1",
    ),
    "target_not_a_number": (
        lambda: _csv(_probs().assign(target=["yes", "0", "1"])),
        [],
        "targets must be class ids 0..1",
    ),
    "other_class_names": (
        lambda: _csv(_probs().rename(columns={"prob_disease": "prob_sick"})),
        [],
        "classes ['normal', 'sick'] differ",
    ),
    "not_utf8": (
        lambda: _csv(_probs(ids=("1", "2", "3"))).replace(
            b"image_id", "\u00edmage_id".encode("latin-1")
        ),
        [],
        "not UTF-8",
    ),
    "zero_byte": (lambda: b"", [], "the CSV is empty"),
    "header_only": (lambda: b"image_id,prob_normal,prob_disease\n", [], "has no rows"),
    "weights_negative": (lambda: _csv(_probs()), ["--weights", "1", "-1"], "--weights"),
    "weights_zero": (lambda: _csv(_probs()), ["--weights", "0", "0"], "--weights"),
    "weights_nan": (lambda: _csv(_probs()), ["--weights", "nan", "1"], "--weights"),
    "weights_count": (lambda: _csv(_probs()), ["--weights", "1", "1", "1"], "--weights"),
}


@pytest.mark.parametrize("command", ["vote", "analyze"])
@pytest.mark.parametrize("row", list(VOTE_ERRORS))
def test_broken_probability_file_is_one_line_error(
    row: str, command: str, tmp_path: Path, capsys
) -> None:
    make, extra, expected = VOTE_ERRORS[row]
    a = _write(tmp_path / "a.csv", _csv(_probs()))
    b = _write(tmp_path / "b.csv", make())
    out = tmp_path / "out"
    if command == "vote":
        main, argv = vote, [str(a), str(b), *extra, "--output", str(out / "v.csv")]
    else:
        main, argv = analyze, [str(a), str(b), *extra, "--output-dir", str(out)]
    code, _, err = call_main(main, argv, capsys)
    assert code == 2, err
    line = error_line(err)
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("row", "labels", "expected"),
    [
        ("labels_outside_0_1", b"image_id,label\n1,1\n2,0\n3,7\n", "labels must be class ids 0..1"),
        ("labels_missing_id", b"image_id,label\n1,1\n2,0\n", "no label for 1 image(s) (e.g. '3')"),
        ("labels_missing_column", b"image_id,diagnosis\n1,1\n", "missing column(s) label"),
        ("labels_not_utf8", "image_id,label\n1,1\n\u00e9,0\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_broken_analyze_labels_are_one_line_error(
    row: str, labels: bytes, expected: str, tmp_path: Path, capsys
) -> None:
    a = _write(tmp_path / "a.csv", _csv(_probs()))
    path = _write(tmp_path / "labels.csv", labels)
    out = tmp_path / "out"
    argv = [str(a), str(a), "--names", "x", "y", "--labels", str(path), "--output-dir", str(out)]
    code, _, err = call_main(analyze, argv, capsys)
    assert code == 2, err
    assert expected in error_line(err) and not out.exists()


def test_probability_files_in_other_order_with_extra_columns_are_voted(
    tmp_path: Path, capsys
) -> None:
    a = _write(tmp_path / "a.csv", _csv(_probs()))
    b = _write(tmp_path / "b.csv", _csv(_probs(p1=(0.2, 0.3, 0.4)).iloc[::-1].assign(note="x")))
    code, _, err = call_main(vote, [str(a), str(b), "--output", str(tmp_path / "v.csv")], capsys)
    assert code == 0, err
    voted = pd.read_csv(tmp_path / "v_probs.csv", dtype={"image_id": str})
    assert voted["image_id"].tolist() == ["1", "2", "3"]
    np.testing.assert_allclose(voted["prob_disease"], [0.4, 0.2, 0.6])
    assert pd.read_csv(tmp_path / "v.csv")["label"].tolist() == [0, 0, 1]
