"""``histommnet.load``, ``histommnet-export`` and ``histommnet-predict`` on one trained run.

One 2-fold run of the tiny config is trained per module; its folds are exported, put in a
Hugging Face cache layout and loaded back from every kind of source. Predictions are checked
against the run's own evaluation outputs (``predictions_{image,patient}.csv``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

import histommnet
from histommnet.breakhis import ALL_MAGNIFICATIONS, scan_breakhis
from histommnet.cli import export, predict, train
from medcore.data.splits import load_splits
from medcore.errors import DataError, UserError
from medcore.testing import call_main, error_line, hub_snapshot_of
from medcore.weights.checkpoint import export_safetensors
from medcore.weights.export import ModelExport, write_export
from medcore.weights.sources import ModelSourceError

REPO = "histo-org/mmnet-demo"


@pytest.fixture(scope="module")
def run(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-fold run of the tiny config (1 epoch of 2 steps per fold)."""
    out = tmp_path_factory.mktemp("api") / "run"
    argv = ["--data-dir", str(tiny_tree), "--output-dir", str(out)]
    for item in ["num_threads=1", "model.backbone=test_efficientnet", "model.embed_dim=32",
                 "model.attention_scales=[1,3]", "data.image_size=32", "data.eval_max_draws=2",
                 "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=4",
                 "trainer.num_workers=0", "cv.folds=2"]:  # fmt: skip
        argv += ["--set", item]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(argv) == 0
    return out


@pytest.fixture(scope="module")
def folders(tiny_tree: Path) -> dict[str, Path]:
    """Patient folder name -> its folder in the BreakHis tree."""
    patients = scan_breakhis(tiny_tree, verbose=False).patients
    return {p.key: Path(p.images["40X"][0]).parent.parent for p in patients}


def _selection(run: Path, fold: int) -> float:
    """The best ``val/selection`` of a fold's epochs, as its metrics.jsonl logged them."""
    rows = [json.loads(line) for line in (run / f"fold_{fold}" / "metrics.jsonl").open()]
    return max(r["val/selection"] for r in rows if "val/selection" in r)


@pytest.fixture(scope="module")
def best_fold(run: Path) -> int:
    scores = [_selection(run, k) for k in (0, 1)]
    return int(np.argmax(scores))  # argmax: the first of equal scores, as the rule says


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "mmnet"
    assert export([str(run), "--output", str(out)]) == 0
    return out


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _test_folders(run: Path, fold: int, folders: dict[str, Path]) -> list[Path]:
    ids = json.loads((run / "splits.json").read_text())["ids"][fold]["test"]
    return [folders[key] for key in ids]


def _result(run: Path, fold: int) -> dict:
    return json.loads((run / f"fold_{fold}" / "result.json").read_text())


def test_every_source_predicts_what_evaluation_did(
    run, exported, folders, best_fold, offline_home, tmp_path
) -> None:
    snapshot = hub_snapshot_of(offline_home, REPO, exported)
    checkpoint = run / f"fold_{best_fold}" / "checkpoints" / f"fold_{best_fold}_best.pth"
    sources = {
        "run": run,
        "checkpoint": checkpoint,
        "folder": exported,
        "hub": f"hf-hub:{REPO}",
    }
    patients = _test_folders(run, best_fold, folders)
    evaluated = {
        level: pd.read_csv(run / f"fold_{best_fold}" / f"predictions_{level}.csv")
        for level in ("image", "patient")
    }
    thresholds = _result(run, best_fold)["thresholds"]
    results = {}
    for name, source in sources.items():
        model = histommnet.load(source, device="cpu")
        assert model.fold == best_fold and model.thresholds == pytest.approx(thresholds), name
        assert not model.model.training
        results[name] = result = model.predict(patients, progress=False)
        draws, table = result.images, result.patients
        # per draw: the evaluation's rows, in its order (patients, then draws)
        assert draws["patient"].tolist() == evaluated["image"]["patient"].tolist(), name
        np.testing.assert_allclose(
            draws["prob_malignant"], evaluated["image"]["prob_malignant"], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            draws[["logit_benign", "logit_malignant"]],
            evaluated["image"][["logit_benign", "logit_malignant"]],
            atol=1e-5,
            rtol=0,
        )
        assert table["patient"].tolist() == evaluated["patient"]["patient"].tolist()
        np.testing.assert_allclose(
            table["prob_malignant"], evaluated["patient"]["prob_malignant"], atol=1e-5, rtol=0
        )
        assert (table["draws"] == evaluated["patient"]["draws"]).all()
        expected = np.where(table["prob_malignant"] >= thresholds["patient"], "malignant", "benign")
        assert table["predicted"].tolist() == expected.tolist()
        expected = np.where(draws["prob_malignant"] >= thresholds["image"], "malignant", "benign")
        assert draws["predicted"].tolist() == expected.tolist()
        # the images of each draw: one per magnification, from the patient's own folder
        for _, row in draws.iterrows():
            for mag in ALL_MAGNIFICATIONS:
                path = Path(row[f"image_{mag}"])
                assert path.parent.name == mag and path.parent.parent.name == row["patient"]
    for name, result in results.items():  # every source is the same model
        pd.testing.assert_frame_equal(result.images, results["run"].images, obj=name)
        pd.testing.assert_frame_equal(result.patients, results["run"].patients, obj=name)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in exported.iterdir())


def test_the_run_model_is_the_best_fold_and_fold_picks_another(
    run, best_fold, tmp_path, capsys
) -> None:
    other = 1 - best_fold
    assert histommnet.load(run, device="cpu").fold == best_fold
    model = histommnet.load(run, device="cpu", fold=other)
    assert model.fold == other
    assert model.thresholds == pytest.approx(_result(run, other)["thresholds"])
    out = tmp_path / f"fold{other}"
    code, stdout, _ = call_main(
        export, [str(run), "--output", str(out), "--fold", str(other)], capsys
    )
    assert code == 0
    assert f"fold_{other}/checkpoints/fold_{other}_best.pth" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["extras"]["fold"] == other
    assert config["thresholds"] == pytest.approx(_result(run, other)["thresholds"])
    selection = config["extras"]["selection"]
    assert selection["name"] == "val/selection"
    assert selection["value"] == pytest.approx(_selection(run, other))


def test_export_folder_config_weights_and_card(run, exported, best_fold) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    best = torch.load(
        run / f"fold_{best_fold}" / "checkpoints" / f"fold_{best_fold}_best.pth",
        weights_only=True,
    )
    config = json.loads((exported / "config.json").read_text())
    assert config["kind"] == "histommnet.MMNet" and config["package"] == "histommnet"
    assert config["labels"] == ["benign", "malignant"]
    assert config["thresholds"] == pytest.approx(best["thresholds"])
    pre = config["preprocessing"]
    assert pre["magnifications"] == best["magnifications"] == list(ALL_MAGNIFICATIONS)
    assert pre["input_size"] == [32, 32] and pre["eval_max_draws"] == 2 and pre["draw_seed"] == 42
    assert (pre["mean"], pre["std"]) == (
        best["normalization"]["mean"],
        best["normalization"]["std"],
    )
    assert config["model_config"]["pretrained_weights"] is None
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # a safetensors handle is not iterable
        assert names == set(best["model"])
        for key in names:
            assert torch.equal(f.get_tensor(key), best["model"][key]), key
    card = (exported / "README.md").read_text()
    patients = pd.read_csv(run / f"fold_{best_fold}" / "predictions_patient.csv")
    auc = roc_auc_score(patients["label"], patients["prob_malignant"])
    row = re.search(rf"\| fold_{best_fold}_test\.patient\.auc \| ([0-9.]+) \| \[", card)
    assert row is not None, card
    assert float(row.group(1)) == round(auc, 4)
    splits = load_splits(run / "splits.json")
    assert f"| 0 | {len(splits[0]['train'])} | {len(splits[0]['val'])} |" in card
    assert 'model = histommnet.load("hf-hub:ORG/NAME")' in card


def _copy_patients(folders: dict[str, Path], keys: list[str], into: Path) -> list[Path]:
    into.mkdir(parents=True)
    return [Path(shutil.copytree(folders[k], into / k)) for k in keys]


def test_predict_command_skips_a_broken_image_and_predicts_the_rest(
    run, folders, tmp_path, capsys
) -> None:
    keys = sorted(folders)[:3]
    copies = _copy_patients(folders, keys, tmp_path / "patients")
    broken = sorted((copies[1] / "200X").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    out = tmp_path / "out" / "pred.csv"  # its folder is made
    code, stdout, err = call_main(
        predict,
        ["--model", str(run), str(tmp_path / "patients"), "--output", str(out), "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert f"skip {broken}: cannot decode image" in err
    assert "skipped 1 item(s); predicted 3 patient(s)" in err
    assert "skipped 1 item(s)" in stdout
    table = pd.read_csv(out)
    assert table["patient"].tolist() == keys
    assert list(table.columns[:4]) == ["patient", "prob_malignant", "predicted", "threshold"]
    counts = [sum(1 for m in ALL_MAGNIFICATIONS for _ in (c / m).iterdir()) for c in copies]
    assert table["images"].tolist() == [counts[0], counts[1] - 1, counts[2]]
    draws = pd.read_csv(tmp_path / "out" / "pred_images.csv")
    assert str(broken) not in set(draws["image_200X"])
    assert draws.groupby("patient").size().tolist() == table["draws"].tolist()
    # the patient's probability is its draws' mean
    means = draws.groupby("patient")["prob_malignant"].mean()
    np.testing.assert_allclose(means[keys], table["prob_malignant"], atol=1e-6)


def test_predict_reads_a_breakhis_tree_and_fills_a_missing_magnification(
    run, folders, tiny_tree, tmp_path, capsys
) -> None:
    model = histommnet.load(run, device="cpu")
    whole = model.predict(tiny_tree, progress=False)
    assert whole.patients["patient"].tolist() == sorted(folders)
    (copy,) = _copy_patients(folders, [sorted(folders)[0]], tmp_path / "p")
    shutil.rmtree(copy / "400X")
    filled = model.predict(copy, progress=False)
    assert "missing magnification filled (400X from 200X)" in capsys.readouterr().err
    assert filled.patients["filled"].tolist() == ["400X from 200X"]
    assert (filled.images["image_400X"].map(lambda p: Path(p).parent.name) == "200X").all()


def test_gradcam_maps_for_each_draw(run, folders) -> None:
    model = histommnet.load(run, device="cpu")
    key = sorted(folders)[-1]
    result = model.predict(folders[key], gradcam=True, progress=False)
    cams = result.cams[key]
    assert cams.shape == (len(result.images), 4, 32, 32)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0


def _arrays_of(folder: Path) -> dict[str, list[np.ndarray]]:
    """A patient folder's images as uint8 RGB arrays, read by PIL, in file-name order."""
    return {
        m: [np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder / m).iterdir())]
        for m in ALL_MAGNIFICATIONS
    }


def test_images_in_memory_predict_as_their_folder(
    run, folders, tmp_path, monkeypatch, capsys
) -> None:
    model = histommnet.load(run, device="cpu")
    plain = folders[sorted(folders)[0]]
    (resized,) = _copy_patients(folders, [sorted(folders)[-1]], tmp_path / "p")
    for png in resized.rglob("*.png"):  # not the input size: the store resizes and crops them
        with Image.open(png) as img:
            img.resize((45, 38), Image.Resampling.BILINEAR).save(png)
    by_folder = model.predict([plain, resized], progress=False)
    given = {plain.name: _arrays_of(plain), resized.name: _arrays_of(resized)}
    paths_100x = sorted(str(p) for p in (resized / "100X").iterdir())
    given[resized.name]["100x"] = paths_100x  # file paths beside arrays, any case of the key
    del given[resized.name]["100X"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stores = tmp_path / "cache" / "imagestore"
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    in_memory = model.predict(given, progress=False)
    assert not list((tmp_path / "tmp").iterdir())  # PNGs and their stores are removed
    assert not stores.exists()  # and never enter the shared cache
    for level in ("images", "patients"):
        got, want = getattr(in_memory, level), getattr(by_folder, level)
        assert got["patient"].tolist() == want["patient"].tolist()
        np.testing.assert_allclose(got["prob_malignant"], want["prob_malignant"], atol=1e-6, rtol=0)
    assert in_memory.patients["images"].tolist() == by_folder.patients["images"].tolist()
    assert in_memory.patients["folder"].tolist() == ["", ""]
    # the same draws: an array is named by its magnification and position in the list given
    mine = by_folder.images["patient"] == plain.name
    for mag in ALL_MAGNIFICATIONS:
        order = sorted(str(p) for p in (plain / mag).iterdir())
        named = [f"{mag}[{order.index(p)}]" for p in by_folder.images.loc[mine, f"image_{mag}"]]
        assert in_memory.images.loc[mine, f"image_{mag}"].tolist() == named
    assert in_memory.images.loc[~mine, "image_100X"].tolist() == (
        by_folder.images.loc[~mine, "image_100X"].tolist()
    )

    # the missing-magnification rule of folders
    (copy,) = _copy_patients(folders, [plain.name], tmp_path / "q")
    shutil.rmtree(copy / "400X")
    arrays = _arrays_of(plain)
    del arrays["400X"]
    capsys.readouterr()
    filled = model.predict({plain.name: arrays}, progress=False)
    assert f"patient {plain.name}: missing magnification filled (400X from 200X)" in (
        capsys.readouterr().err
    )
    want = model.predict(copy, progress=False)
    assert filled.patients["filled"].tolist() == ["400X from 200X"]
    np.testing.assert_allclose(
        filled.images["prob_malignant"], want.images["prob_malignant"], atol=1e-6, rtol=0
    )
    # one patient as one mapping is named "patient"
    one = model.predict(arrays, progress=False)
    assert one.patients["patient"].tolist() == ["patient"]
    assert one.images["image_40X"].str.fullmatch(r"40X\[\d\]").all()


def test_images_in_memory_refused(run, folders, tmp_path) -> None:
    model = histommnet.load(run, device="cpu")
    rgb = _arrays_of(folders[sorted(folders)[0]])["40X"][0]
    cases = {
        "patient: unknown magnification '50X' (known: 40X, 100X, 200X, 400X)": {"50X": rgb},
        "patient P1: unknown magnification 40": {"P1": {40: rgb}},
        "patient 40X[1]: an image array must be uint8 RGB [H, W, 3], not float32 [32, 32, 3]": {
            "40X": [rgb, rgb.astype(np.float32)]
        },
        "patient P1 100X[0]: an image array must be uint8 RGB [H, W, 3], not uint8 [32, 32]": {
            "P1": {"100X": rgb[..., 0]}
        },
        "not uint8 [2, 32, 32, 3]": {"40X": np.stack([rgb, rgb])},
        "patient 40X[0]: expected an image file path or a uint8 [H, W, 3] array, not int": {
            "40X": 7
        },
        "patients['40X']: mixes named patients": {"P1": {"40X": rgb}, "40X": rgb},
        "patients: no patient given": {},
    }
    for why, given in cases.items():
        with pytest.raises(DataError, match=re.escape(why)):
            model.predict(given, progress=False)
    # a path that names no file is skipped and named, like an unreadable image in a folder
    gone = str(tmp_path / "gone.png")
    result = model.predict({"40X": [rgb, gone], "100X": [rgb, str(tmp_path)]}, progress=False)
    assert result.skipped[:2] == [(gone, "no such file"), (str(tmp_path), "not a file")]
    assert result.patients["images"].tolist() == [2]


def _other_package_export(tmp_path: Path) -> Path:
    net = torch.nn.Linear(4, 2)
    other = ModelExport("ctclip.CTCLIP", "ctclip", {"dim": 4}, net.state_dict())
    return write_export(other, tmp_path / "ctclip-export")


def test_refused_sources_and_inputs(run, exported, folders, best_fold, tmp_path, capsys) -> None:
    ckpt_dir = run / f"fold_{best_fold}" / "checkpoints"
    lone = tmp_path / "lone.pt"  # a fold's checkpoint away from its run: no thresholds known
    state = torch.load(ckpt_dir / f"fold_{best_fold}_best.pth", weights_only=True)
    bare = export_safetensors(state["model"], tmp_path / "weights.safetensors")
    state.pop("thresholds")
    torch.save(state, lone)
    cases = {
        _other_package_export(tmp_path): "this is a ctclip.CTCLIP export, not histommnet",
        bare: "a weights file without its config.json",
        lone: "records no decision thresholds: its fold was not tested",
    }
    patients = str(folders[sorted(folders)[0]])
    for source, why in cases.items():
        with pytest.raises(ModelSourceError, match=re.escape(why)):
            histommnet.load(source)
        code, _, err = call_main(predict, ["--model", str(source), patients], capsys)
        assert code == 2 and error_line(err).startswith(f"error: {source}: "), err
        assert why in error_line(err)
    with pytest.raises(
        ModelSourceError, match=r"fold 5 has no tested fold_5_best\.pth \(tested folds: 0, 1\)"
    ):
        histommnet.load(run, fold=5)
    with pytest.raises(UserError, match="applies to a run directory"):
        histommnet.load(exported, fold=0)
    code, _, err = call_main(
        export, [str(ckpt_dir / f"fold_{best_fold}_best.pth"), "--output", str(tmp_path / "x"),
                 "--fold", "0"], capsys)  # fmt: skip
    assert code == 2 and error_line(err).startswith("error: --fold: applies to a run directory")

    # inputs: no patient folder, every image broken, a file
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    broken = _copy_patients(folders, [sorted(folders)[0]], tmp_path / "broken")[0]
    for png in broken.rglob("*.png"):
        png.write_bytes(png.read_bytes()[:60])
    model = histommnet.load(exported)
    for where, why in {
        empty: "no patient folder found",
        tmp_path / "broken": "no patient with readable images",
        exported / "config.json": "not a folder",
    }.items():
        code, _, err = call_main(predict, ["--model", str(exported), str(where)], capsys)
        assert code == 2 and why in error_line(err), err
        with pytest.raises(UserError, match=why):
            model.predict(where, progress=False)
    assert not (Path.cwd() / "predictions.csv").exists()


def test_import_and_load_stay_off_the_trainer(exported, folders) -> None:
    probe = (
        "import sys, histommnet\n"
        "assert 'torch' not in sys.modules\n"
        f"model = histommnet.load({str(exported)!r}, device='cpu')\n"
        f"model.predict({str(folders[sorted(folders)[0]])!r}, progress=False)\n"
        "heavy = [m for m in ('lightning_fabric', 'lightning', 'medcore.engine.trainer') "
        "if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_readme_python_snippet_runs(run, folders, tmp_path, monkeypatch, capsys) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "runs" / "histommnet").mkdir(parents=True)
    (tmp_path / "runs" / "histommnet" / "demo").symlink_to(run)
    keys = [k for k in sorted(folders) if "_B_" in k][:1] + [
        k for k in sorted(folders) if "_M_" in k
    ][:1]
    _copy_patients(folders, keys, tmp_path / "patients")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "HistoModel(histommnet.MMNet, fold" in printed
    for key in keys:
        assert key in printed
