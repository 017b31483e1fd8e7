"""``binensemble.load`` and ``binensemble-export``: one smoke run (both models and the vote),
exported, read back from every kind of source, against the training pipeline's predictions and
the ``binensemble-predict`` / ``binensemble-vote`` commands; the refusals."""

from __future__ import annotations

import json
import os
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
from safetensors import safe_open

import binensemble
from binensemble.cli import export, predict, train, vote
from medcore.errors import CheckpointError, DataError, UserError
from medcore.testing import call_main, error_line, hub_snapshot_of
from medcore.weights.export import ModelExport, write_export
from medcore.weights.sources import ModelSourceError

REPO = "lab/binensemble-tiny"
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, tiny_args) -> Path:
    """One smoke run of both models on the tiny data set (trained once for the module)."""
    out = tmp_path_factory.mktemp("api") / "run"
    argv = tiny_args()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(out.parent / "cache"))
        assert (
            train([*argv, "--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "1"])
            == 0
        )
    return out


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    folder = run.parent / "export"
    assert export([str(run), "--output", str(folder)]) == 0
    return folder


def _probs_csv(path: Path) -> np.ndarray:
    frame = pd.read_csv(path, dtype={"image_id": str})
    return frame[["prob_normal", "prob_disease"]].to_numpy()


def test_export_holds_every_model_the_gallery_and_the_vote(run: Path, exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((exported / "config.json").read_text())
    assert config["kind"] == "binensemble.Ensemble"
    assert config["extras"]["members"] == ["metric", "baseline"]
    assert config["extras"]["vote_weights"] == [0.5, 0.5]
    assert config["labels"] == ["normal", "disease"]
    assert config["extra_tensors"] == ["metric.gallery.embeddings", "metric.gallery.labels"]
    bundle = torch.load(run / "metric" / "model.pt", weights_only=True)
    knn = config["extras"]["knn"]["metric"]
    assert knn["k"] == bundle["knn"]["k"] and knn["views"] == [
        "identity",
        "hflip",
        "vflip",
        "rot90",
    ]
    # The gallery travels as tensors, not JSON; the training data path does not travel at all.
    text = (exported / "config.json").read_text()
    assert 'embeddings":' not in text and str(run.parent) not in text
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        emb = f.get_tensor("extras/metric.gallery.embeddings")
        labels = f.get_tensor("extras/metric.gallery.labels")
    assert torch.equal(emb, bundle["gallery"]["embeddings"].float())
    assert torch.equal(labels, bundle["gallery"]["labels"].long())
    assert emb.shape == (20, 16) and labels.dtype == torch.int64
    baseline = torch.load(run / "baseline" / "model.pt", weights_only=True)["model"]
    assert {f"metric.{k}" for k in bundle["model"]} | {f"baseline.{k}" for k in baseline} | {
        "extras/metric.gallery.embeddings",
        "extras/metric.gallery.labels",
    } == names
    card = (exported / "README.md").read_text()
    accuracy = json.loads((run / "analysis" / "test" / "analysis.json").read_text())["models"]
    vote_row = next(r for r in accuracy if r["model"] == "vote")
    assert re.search(
        rf"\| test\.vote\.accuracy \| {vote_row['accuracy']:.4f} \| "
        rf"\[{vote_row['accuracy_ci_low']:.4f}, {vote_row['accuracy_ci_high']:.4f}\] \|",
        card,
    ), card
    assert "| train | 20 |" in card and 'binensemble.load("hf-hub:ORG/NAME")' in card


def test_every_source_predicts_as_the_pipeline_and_the_commands(
    run: Path, exported: Path, tiny_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_snapshot_of(home, REPO, exported)
    test_dir = tiny_data / "TestSet"
    models = {
        "run": binensemble.load(run),
        "hub": binensemble.load(f"hf-hub:{REPO}", device="cpu"),
    }
    preds = {name: m.predict(test_dir) for name, m in models.items()}
    ref = preds["run"]
    assert ref.ids == [str(i) for i in range(1, 7)]
    assert list(ref.probs) == ["metric", "baseline", "vote"] and ref.final == "vote"
    for key in ref.probs:
        np.testing.assert_allclose(preds["hub"].probs[key], ref.probs[key], atol=TOL, err_msg=key)
    # The training pipeline's evaluation of the same test images.
    for key in ("metric", "baseline", "vote"):
        expected = _probs_csv(run / "predictions" / f"{key}_probs.csv")
        np.testing.assert_allclose(ref.probs[key], expected, atol=TOL, err_msg=key)
    assert ref.labels() == [
        ["normal", "disease"][int(label)]
        for label in pd.read_csv(run / "predictions" / "vote.csv")["label"]
    ]
    # A checkpoint is its one model.
    alone = binensemble.load(run / "metric" / "model.pt").predict(test_dir)
    assert list(alone.probs) == ["metric"] and alone.final == "metric"
    np.testing.assert_allclose(alone.probs["metric"], ref.probs["metric"], atol=TOL)
    # The same images as arrays, decoded as the files are.
    arrays = [np.asarray(Image.open(test_dir / f"{i}.png").convert("RGB")) for i in range(1, 4)]
    from_arrays = models["hub"].predict(arrays)
    assert from_arrays.ids == ["array0", "array1", "array2"]
    np.testing.assert_allclose(from_arrays.probs["vote"], ref.probs["vote"][:3], atol=TOL)

    # binensemble-predict on the exported folder, then binensemble-vote on its per-model files.
    out = tmp_path / "pred"
    code, stdout, err = call_main(
        predict, [str(exported), "--data-dir", str(tiny_data), "--output-dir", str(out)], capsys
    )
    assert code == 0, err
    assert "vote" in stdout and "accuracy" in stdout
    for key in ("metric", "baseline", "vote"):
        np.testing.assert_allclose(_probs_csv(out / f"{key}_probs.csv"), ref.probs[key], atol=TOL)
    code, _, err = call_main(
        vote,
        [str(out / "metric_probs.csv"), str(out / "baseline_probs.csv"), "--output",
         str(tmp_path / "voted.csv")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    np.testing.assert_allclose(
        _probs_csv(tmp_path / "voted_probs.csv"), ref.probs["vote"], atol=TOL
    )
    frame = ref.frame()
    assert list(frame.columns) == [
        "image_id", "metric_label", "metric_prob_disease", "baseline_label",
        "baseline_prob_disease", "vote_label", "vote_prob_disease",
    ]  # fmt: skip
    np.testing.assert_array_equal(frame["vote_prob_disease"], ref.probs["vote"][:, 1])


def test_a_broken_image_among_good_ones_is_named_and_skipped(
    run: Path, exported: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in (1, 2, 3):
        shutil.copy(tiny_data / "TestSet" / f"{i}.png", folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = binensemble.load(exported)
    result = model.predict(folder)
    err = capsys.readouterr().err
    assert result.ids == ["1", "3"] and result.skipped == [str(folder / "2.png")]
    assert f"skipped {folder / '2.png'}" in err
    assert "skipped 1 of 3 image(s) that could not be read" in err
    whole = _probs_csv(run / "predictions" / "vote_probs.csv")  # the training pipeline's
    np.testing.assert_allclose(result.probs["vote"], whole[[0, 2]], atol=TOL)
    # The command: the others are predicted, the broken one named; exit 0.
    out = tmp_path / "pred"
    code, _, err = call_main(
        predict, [str(exported), "--images", str(folder), "--output-dir", str(out)], capsys
    )
    assert code == 0, err
    assert f"skipped {folder / '2.png'}" in err
    assert pd.read_csv(out / "vote.csv", dtype={"image_id": str})["image_id"].tolist() == ["1", "3"]
    with pytest.raises(DataError, match="no readable image"):
        model.predict(folder / "2.png")
    with pytest.raises(DataError, match=r"images\[0\]: an array must be uint8"):
        model.predict(np.zeros((8, 8, 3), dtype=np.float32))


def test_sources_that_are_not_a_binensemble_model_are_refused(
    run: Path, exported: Path, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    other = write_export(
        ModelExport(
            kind="cxrlandmarks.ResNetLandmarkRegressor",
            package="cxrlandmarks",
            model_config={"arch": "resnet18"},
            tensors={"fc.weight": torch.zeros(30, 4)},
        ),
        tmp_path / "other",
    )
    with pytest.raises(ModelSourceError, match=re.escape(
        "this is a cxrlandmarks.ResNetLandmarkRegressor export, not binensemble.Ensemble"
    )):  # fmt: skip
        binensemble.load(other)
    code, _, err = call_main(predict, [str(other), "--images", str(tiny_data)], capsys)
    assert code == 2
    assert error_line(err) == (
        f"error: {other}: this is a cxrlandmarks.ResNetLandmarkRegressor export, "
        "not binensemble.Ensemble"
    )
    # The bare weights file a model directory holds: no config to rebuild the model from.
    bare = run / "metric" / "model.safetensors"
    with pytest.raises(ModelSourceError, match=re.escape("a weights file without its config.json")):
        binensemble.load(bare)
    # A metric training checkpoint has no gallery.
    with pytest.raises(ModelSourceError, match="has no KNN gallery"):
        binensemble.load(run / "metric" / "checkpoints" / "final.pt")
    # A run whose second model did not finish is not silently a one-model ensemble.
    partial = tmp_path / "partial"
    (partial / "baseline").mkdir(parents=True)
    shutil.copytree(run / "metric", partial / "metric")
    with pytest.raises(
        CheckpointError, match=re.escape("has no model.pt: this model did not finish")
    ):
        binensemble.load(partial)
    # An export is not exported again; a metric model predicts only with its gallery's views.
    code, _, err = call_main(export, [str(exported), "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "already an exported model" in error_line(err)
    with pytest.raises(UserError, match="queries must use the same views, not identity"):
        binensemble.load(exported).predict(tiny_data / "TestSet" / "1.png", views=["identity"])
    code, _, err = call_main(predict, [str(exported)], capsys)
    assert code == 2 and error_line(err).startswith("error: --data-dir: an exported model")
    argv = [str(exported), "--images", str(tiny_data / "TestSet"), "--data-dir", str(tiny_data)]
    code, _, err = call_main(predict, argv, capsys)
    assert code == 2 and error_line(err) == (
        "error: --images: predicts the images given; leave out --data-dir"
    )


def test_import_stays_light_and_load_leaves_the_trainer_out() -> None:
    probe = (
        "import sys, binensemble\n"
        "heavy = ('torch', 'lightning_fabric', 'medcore.engine.trainer', 'binensemble.api')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "load = binensemble.load\n"
        "assert 'binensemble.api' in sys.modules\n"
        "print(sorted(m for m in ('lightning_fabric', 'medcore.engine.trainer') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
        env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_readme_python_snippet_runs(
    run: Path, tiny_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The README's own code block, on this module's run and test images laid out where the
    README puts the demo's (``runs/demo``, the demo cache)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run)
    demo = tmp_path / "home" / ".cache" / "medcore" / "binensemble" / "demo-v2"
    demo.mkdir(parents=True)
    (demo / "TestSet").symlink_to(tiny_data / "TestSet")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "EnsembleModel(metric" in out and "vote_prob_disease" in out
