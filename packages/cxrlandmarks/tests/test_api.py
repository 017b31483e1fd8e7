"""cxrlandmarks.load and cxrlandmarks-export on one smoke run: every source kind agrees, the
predictions equal cxrlandmarks-eval's and cxrlandmarks-predict's, and bad sources, inputs and
landmark names are refused; the README's Python API snippet runs as written."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cxrlandmarks
from cxrlandmarks.anatomy import LANDMARK_NAMES
from cxrlandmarks.api import LandmarkNameError
from cxrlandmarks.cli import evaluate, export, predict, train
from cxrlandmarks.data import HEADED_COLUMNS
from cxrlandmarks.model import KIND
from medcore.errors import CheckpointError, DataError
from medcore.testing import call_main, error_line, hub_snapshot_of
from medcore.weights.checkpoint import load_checkpoint
from medcore.weights.export import ModelExport, write_export

REPO = "cxr-org/landmarks-demo"
README = Path(__file__).parents[1] / "README.md"
TINY = ["--smoke", "--set", "data.image_size=32", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_original_checkpoint) -> dict:
    """A smoke run of the chain's last phase (from an original-code checkpoint), its export,
    and a Hugging Face cache holding that export as a hub download leaves it."""
    root = tmp_path_factory.mktemp("api")
    write_original_checkpoint(root / "original.pt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(root / "cache"))
        argv = [*TINY, "--phase", "4", "--init-from", str(root / "original.pt")]
        assert train([*argv, "--output-dir", str(root / "run")]) == 0
    assert export([str(root / "run"), "--output", str(root / "export")]) == 0
    hub_snapshot_of(root / "hf", REPO, root / "export")
    run = root / "run"
    test_paths = pd.read_csv(run / "eval" / "per_image.csv")["image_path"].tolist()
    return {"root": root, "run": run, "export": root / "export", "images": test_paths}


@pytest.fixture
def offline_hub(trained, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(trained["root"] / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _coords(frame: pd.DataFrame) -> np.ndarray:
    cols = [f"{n}_{a}" for n in LANDMARK_NAMES for a in "xy"]
    return frame[cols].to_numpy(float).reshape(len(frame), 15, 2)


def test_import_is_light():
    code = (
        "import sys, cxrlandmarks; assert 'torch' not in sys.modules and cxrlandmarks.__version__"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_source_kind_gives_the_same_predictions(trained, offline_hub):
    run, folder = trained["run"], trained["export"]
    checkpoint = run / "checkpoints" / "geometric_complete.pt"
    sources = [run, checkpoint, folder, folder / "model.safetensors", f"hf-hub:{REPO}"]
    images = trained["images"][:4]
    frames = [cxrlandmarks.load(s, device="cpu").predict(images) for s in sources]
    for frame in frames[1:]:
        pd.testing.assert_frame_equal(frame, frames[0])
    assert list(frames[0]["image_path"]) == images
    assert list(frames[0]["image_name"]) == [Path(p).stem for p in images]
    assert (frames[0][["width", "height"]] == 299).all().all()  # the demo's originals
    # The model of a run is the checkpoint of its last phase, tensor for tensor.
    model = cxrlandmarks.load(run, device="cpu")
    saved = load_checkpoint(checkpoint)
    assert saved["phase"] == "phase4"
    for key, value in model.module.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert model.image_size == 32 and model.tta_flip is False
    assert model.input_norm["mean"] == saved["input_norm"]["mean"]


@pytest.mark.parametrize("tta", [False, True])
def test_predictions_equal_the_evaluation_path(trained, tmp_path, capsys, tta):
    """cxrlandmarks-eval on the test split (image store, LandmarkDataset) and load().predict on
    the same files agree to 1e-5 px, with and without flip TTA."""
    run = trained["run"]
    out = tmp_path / "eval"
    argv = ["--run-dir", str(run), "--output-dir", str(out), "--device", "cpu"]
    code, _, err = call_main(evaluate, [*argv, "--tta-flip" if tta else "--no-tta-flip"], capsys)
    assert code == 0, err
    reference = pd.read_csv(out / "geometric_complete" / "predictions.csv")
    model = cxrlandmarks.load(run, device="cpu")
    frame = model.predict(reference["image_path"].tolist(), tta_flip=tta)
    assert list(frame["image_name"]) == list(reference["image_name"])
    expected = reference[HEADED_COLUMNS].to_numpy(float).reshape(-1, 15, 2)
    np.testing.assert_allclose(_coords(frame), expected, atol=1e-5, rtol=0)
    if tta:  # and the flip changed something: the test compares two different paths
        plain = _coords(model.predict(reference["image_path"].tolist(), tta_flip=False))
        assert np.abs(plain - expected).max() > 1e-3


def test_predict_command_equals_load(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in trained["images"][:3]:
        shutil.copy(path, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    code, _, err = call_main(
        predict,
        [str(folder), "--checkpoint", f"{trained['export']}", "--tta-flip", "--no-overlays",
         "--device", "cpu", "--output-dir", str(tmp_path / "out")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert f"skipped {folder / 'broken.png'}: cannot decode image" in err
    assert "skipped 1 unreadable image(s) of 4" in err
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    frame = cxrlandmarks.load(trained["run"], device="cpu").predict(folder, tta_flip=True)
    assert list(frame["image_path"]) == list(written["image_path"])
    assert frame.attrs["skipped"] == {str(folder / "broken.png"): "cannot decode image "
                                      "(cannot identify image file "
                                      f"'{folder / 'broken.png'}')"}  # fmt: skip
    expected = written[HEADED_COLUMNS].to_numpy(float).reshape(-1, 15, 2)
    np.testing.assert_allclose(_coords(frame), expected, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["tta_flip"] is True


def test_arrays_are_read_like_files(trained, tmp_path):
    model = cxrlandmarks.load(trained["export"], device="cpu")
    path = Path(trained["images"][0])
    gray = np.asarray(Image.open(path).convert("L"))
    # A 16-bit file and its array are both rescaled from their own min-max range.
    deep = (gray.astype(np.uint16) * 200 + 7).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    frame = model.predict([path, gray, np.stack([gray] * 3, -1), deep, tmp_path / "deep.png"])
    coords = _coords(frame)
    assert list(frame["image_name"]) == [path.stem, "array_1", "array_2", "array_3", "deep"]
    for i in (1, 2):
        np.testing.assert_array_equal(coords[i], coords[0])
    np.testing.assert_array_equal(coords[3], coords[4])
    with pytest.raises(DataError, match=r"<array 0>: expected an image"):
        model.predict([np.zeros((2, 3, 4, 5))])


def test_landmark_selection_and_unknown_names(trained):
    model = cxrlandmarks.load(trained["export"], device="cpu")
    images = trained["images"][:2]
    full = model.predict(images)
    some = model.predict(images, landmarks=["costophrenic_right", "apex_left"])
    assert list(some.columns) == [
        "image_name", "image_path", "width", "height",
        "costophrenic_right_x", "costophrenic_right_y", "apex_left_x", "apex_left_y",
    ]  # fmt: skip
    pd.testing.assert_frame_equal(some, full[some.columns])
    with pytest.raises(LandmarkNameError, match=r"unknown landmark name\(s\) 'apex'; the names"):
        model.predict(images, landmarks=["apex_left", "apex"])
    with pytest.raises(ValueError, match="left_apex"):
        model.predict(images, landmarks="left_apex")


def test_export_folder_config_and_card(trained):
    folder, run = trained["export"], trained["run"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    state = load_checkpoint(run / "checkpoints" / "geometric_complete.pt")
    assert config["kind"] == KIND and config["labels"] == list(LANDMARK_NAMES)
    assert config["model_config"] == {
        k: state["model_config"][k] for k in ("num_landmarks", "head_dropout", "coord_attention")
    }
    pre = config["preprocessing"]
    assert pre["image_size"] == 32 and pre["input_norm"] == state["input_norm"]
    assert pre["tta_flip"] is False and pre["precision"] == state["precision"]
    assert config["extras"]["phase"] == "phase4"
    assert str(run) not in (folder / "config.json").read_text()  # no local paths published
    card = (folder / "README.md").read_text()
    report = json.loads((run / "eval" / "metrics.json").read_text())
    per_image = np.asarray(report["per_image_px224"])
    row = next(line for line in card.splitlines() if "test mean error (px at 224)" in line)
    value, low, high = (float(x) for x in re.findall(r"\d+\.\d+", row))
    assert value == pytest.approx(per_image.mean(), abs=1e-4)
    # An independent percentile bootstrap of the mean lands near the card's interval.
    rng = np.random.default_rng(1)
    means = per_image[rng.integers(0, len(per_image), (4000, len(per_image)))].mean(1)
    ref_low, ref_high = np.percentile(means, [2.5, 97.5])
    spread = ref_high - ref_low
    assert abs(low - ref_low) < 0.15 * spread and abs(high - ref_high) < 0.15 * spread
    assert "| test | " in card and 'cxrlandmarks.load("hf-hub:ORG/NAME")' in card


def test_run_without_phase_4_gives_its_last_phase_with_a_note(trained, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained["run"] / "config.yaml", run)
    for name in ("phase1_best.pt", "geometric_symmetry.pt"):
        shutil.copy(
            trained["run"] / "checkpoints" / "geometric_complete.pt", run / "checkpoints" / name
        )
    cxrlandmarks.load(run, device="cpu")
    err = capsys.readouterr().err
    assert f"note: {run} has no geometric_complete.pt (phase 4): its model is " in err
    assert "geometric_symmetry.pt, the last phase it finished" in err


def test_original_code_checkpoint_loads(trained, write_original_checkpoint, tmp_path):
    original = write_original_checkpoint(tmp_path / "original.pt", seed=3)
    model = cxrlandmarks.load(tmp_path / "original.pt", device="cpu")
    assert model.image_size == 224  # the original code's input size
    image = np.asarray(Image.open(trained["images"][0]).convert("L"))
    frame = model.predict(image)
    x = torch.from_numpy(
        np.array(Image.fromarray(image).resize((224, 224), Image.Resampling.BILINEAR))
    )
    x = ((x.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
         / torch.tensor([0.229, 0.224, 0.225])[:, None, None])  # fmt: skip
    with torch.no_grad():
        expected = original(x[None])[0].reshape(15, 2).numpy() * [image.shape[1], image.shape[0]]
    np.testing.assert_allclose(_coords(frame)[0], expected, atol=1e-3)


@pytest.mark.faults
def test_foreign_and_bare_sources_are_refused(trained, tmp_path, capsys):
    foreign = write_export(
        ModelExport("ctclip.CTCLIP", "ctclip", {"dim": 2}, {"w": torch.zeros(2)}),
        tmp_path / "ctclip-export",
    )
    bare = tmp_path / "geometric_complete.safetensors"
    weights = load_checkpoint(trained["run"] / "checkpoints" / "geometric_complete.pt")["model"]
    save_file(weights, bare)
    image = trained["images"][0]
    cases = [
        (foreign, f"this is a ctclip.CTCLIP export, not {KIND}"),
        (bare, "a weights file without its config.json"),
        (tmp_path, "neither an exported model folder"),
        (tmp_path / "missing.pt", "not found (expected a run directory"),
    ]
    for source, message in cases:
        with pytest.raises(CheckpointError, match=re.escape(message)):
            cxrlandmarks.load(source, device="cpu")
        code, _, err = call_main(
            predict, [image, "--checkpoint", str(source), "--output-dir", str(tmp_path / "o")],
            capsys,
        )  # fmt: skip
        assert code == 2 and message in error_line(err) and str(source) in error_line(err)
        assert not (tmp_path / "o").exists()
    code, _, err = call_main(
        export, [str(trained["export"]), "--output", str(tmp_path / "again")], capsys
    )
    assert code == 2 and "already an exported model" in error_line(err)


def _readme_python_api() -> tuple[list[str], str]:
    """The README's "Python API" section: its shell commands and its Python snippet."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in bash.splitlines()]
    return [c for c in commands if c], python


def test_readme_python_api_snippet_runs(trained, tmp_path):
    """The snippet as the README has it (with nothing of the trainer imported), on the run its command makes (the fixture's smoke
    run stands in for it: same command and flags but the input size) and images it writes."""
    commands, snippet = _readme_python_api()
    assert commands == ["cxrlandmarks-train --smoke --output-dir runs/demo"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(trained["run"])
    (tmp_path / "snippet.py").write_text(snippet, encoding="utf-8")
    # The snippet as it is; then: load and predict imported neither the trainer nor Lightning.
    after = (
        "import runpy, sys; runpy.run_path('snippet.py'); "
        "heavy = [m for m in sys.modules if m.startswith(('lightning', 'medcore.engine.trainer'))]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run(
        [sys.executable, "-c", after], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "LandmarkModel('runs/demo', 15 landmarks" in proc.stdout
    assert proc.stdout.count("COVID-") == 2 and "apex_left_x" in proc.stdout
