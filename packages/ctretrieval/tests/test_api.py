"""``ctretrieval.load``, ``ctretrieval-export`` and search with raw studies, on one small run.

The run is trained once for the module on studies written as NIfTI files (nibabel) and DICOM
series (pydicom), preprocessed by ``ctretrieval-preprocess``. The loaded model's embeddings of
the raw files must equal what ``ctretrieval-index`` computes from the preprocessed store, and
a raw query must rank the archive as the same study queried by its id does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import ctretrieval
from ctretrieval.api import RESULT_COLUMNS
from ctretrieval.cli import export, index, preprocess, search, train
from ctretrieval.data import CTVolumeDataset, open_volumes, volume_ids
from ctretrieval.index import Index
from ctretrieval.metrics import embed
from ctretrieval.predict import load_model, named_items, prepare
from ctretrieval.synthetic import FINDINGS, phantom, write_dicom_series
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import DataError
from medcore.testing import call_main, error_line, hub_snapshot_of
from medcore.volumes.store import read_settings
from medcore.weights.export import ModelExport, write_export
from medcore.weights.sources import ModelSourceError

REPO = "ct-lab/ctretrieval-tiny"
TINY = [
    "preprocess.target_shape=[6,24,24]",
    "preprocess.min_slices=4",
    "model.num_slices=6",
    "model.image_size=[24,24]",
    "model.embedding_size=16",
    "model.reduce_channels=[8,8,4]",
    "model.fc_hidden=32",
    "trainer.batch_size=8",
    "trainer.num_workers=0",
    "trainer.log_every_steps=100",
    "data.train_eval_frac=0.5",
    "eval.ks=[1,5]",
    "eval.batch_size=4",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _write_raw(root: Path) -> list[Path]:
    """16 phantom studies: even ones as int16 NIfTI files, odd ones as DICOM series."""
    rng = np.random.default_rng(0)
    rows, paths = [], []
    for i in range(16):
        found = tuple(int(v) for v in rng.random(3) < 0.4)
        hu = phantom(found, int(rng.integers(8, 13)), 32, rng)
        study = f"ct_{i:02d}"
        if i % 2:
            write_dicom_series(root / "raw" / study, hu, rng, patient_id=study)
            paths.append(root / "raw" / study)
        else:
            # nibabel's axes are (x, y, z) in RAS; the reader brings them back to [S, P, L].
            data = hu.transpose(2, 1, 0)[::-1, ::-1].astype(np.int16)
            image = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]))
            (root / "raw").mkdir(parents=True, exist_ok=True)
            nib.save(image, root / "raw" / f"{study}.nii.gz")
            paths.append(root / "raw" / f"{study}.nii.gz")
        rows.append({"CT": study, **dict(zip(FINDINGS, found, strict=True))})
    (root / "data").mkdir()
    pd.DataFrame(rows).to_csv(root / "data" / "labels.csv", index=False)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Raw studies, their store, a trained run, its export and its index (once per module)."""
    root = tmp_path_factory.mktemp("api")
    raw = _write_raw(root)
    h5 = root / "data" / "volumes.h5"
    argv = ["--input", str(root / "raw"), "--output", str(h5), "--shape", "6", "24", "24"]
    assert preprocess([*argv, "--min-slices", "4", "--workers", "1"]) == 0
    run = root / "run"
    argv = ["--data-dir", str(root / "data"), "--output-dir", str(run), "--device", "cpu"]
    assert train([*argv, "--epochs", "2", "--seed", "1", *_sets(TINY)]) == 0
    best = Path(json.loads((run / "metrics.json").read_text())["checkpoint"])
    folder = root / "export"
    assert export([str(run), "--output", str(folder)]) == 0
    idx = root / "archive.npz"
    argv = ["--checkpoint", str(best), "--data-dir", str(root / "data"), "--output", str(idx)]
    assert index([*argv, "--device", "cpu"]) == 0
    return {
        "root": root,
        "raw": raw,
        "h5": h5,
        "run": run,
        "best": best,
        "export": folder,
        "index": idx,
    }


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_the_run_model_is_the_best_checkpoint_and_its_export(setup) -> None:
    best, folder = setup["best"], setup["export"]
    assert re.fullmatch(r"microf1_\d{8}_epoch=\d{3}_metric=[\d.]+\.pt", best.name)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    state = torch.load(best, weights_only=True)
    assert config["kind"] == "ctretrieval.Proximity100x100" and config["package"] == "ctretrieval"
    assert config["exported_from"] == best.name
    assert config["model_config"] == json.loads(json.dumps(state["model_config"]))
    assert config["labels"] == [*FINDINGS, "sin_hallazgos"]
    assert config["thresholds"] == {n: 0.5 for n in config["labels"]}
    settings = read_settings(setup["h5"])
    for key in ("target_shape", "hu_window", "target_spacing", "orientation"):
        assert config["preprocessing"][key] == settings[key], key
    assert config["preprocessing"]["min_slices"] == 4
    assert config["extras"]["mode"] == "microf1" and config["extras"]["precision"] == "32-true"
    assert config["extras"]["eval_config"]["knn_k"] == state["eval_config"]["knn_k"]
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == state["model"].keys()
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    card = (folder / "README.md").read_text()
    report = json.loads((setup["run"] / "metrics.json").read_text())
    test = report["test"]
    for name in ("map@1", "ndcg@5", "micro_f1"):
        # The value and its bootstrap interval from metrics.json, in the card's 95% CI column.
        row = re.search(rf"\| test\.{name} \| ([\d.]+) \| \[([\d.]+), ([\d.]+)\] \|", card)
        assert row, name
        value, low, high = (float(v) for v in row.groups())
        assert value == pytest.approx(test[name], abs=1e-4)
        assert (low, high) == pytest.approx(
            (test[f"{name}_ci_low"], test[f"{name}_ci_high"]), abs=1e-4
        )
        assert low <= value <= high
    assert "| metric | value | 95% CI |" in card and "No intervals recorded" not in card
    assert f"bootstrap intervals over the test queries ({report['n_boot']} resamples)" in card
    assert "test.map@1_ci_low" not in card and "no confidence intervals" not in card
    assert 'model = ctretrieval.load("hf-hub:ORG/NAME")' in card and "Measured with" not in card


def _store_embeddings(setup) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What evaluation and ctretrieval-index compute: the preprocessed store through the
    checkpoint's model, in the evaluation's loop."""
    model, state = load_model(setup["best"], torch.device("cpu"))
    keys = volume_ids(setup["h5"])
    n = len(keys)
    data = CTVolumeDataset(setup["h5"], keys, np.zeros((n, 4)), np.zeros(n, dtype=np.int64))
    options = PredictOptions(
        torch.device("cpu"), checkpoint_precision(state, torch.device("cpu")), 4, 0
    )
    out = embed(model, data, options)
    return keys, out.emb, out.probs


def test_every_source_loads_the_same_model_as_evaluation(setup, offline_hub, capsys) -> None:
    keys, emb, probs = _store_embeddings(setup)
    snapshot = hub_snapshot_of(offline_hub, REPO, setup["export"])
    sources = {
        "run": setup["run"],
        "checkpoint": setup["best"],
        "folder": setup["export"],
        "weights beside config": snapshot / "model.safetensors",
        "hub": f"hf-hub:{REPO}",
    }
    for what, source in sources.items():
        model = ctretrieval.load(source, device="cpu")
        assert not model.model.training, what
        out = model.embed(setup["raw"])
        assert out.names == keys, what  # the ids ctretrieval-preprocess gave the studies
        torch.testing.assert_close(out.embeddings, emb, atol=1e-5, rtol=0, msg=what)
        torch.testing.assert_close(out.probs, probs, atol=1e-5, rtol=0, msg=what)
    stored = Index.read(setup["index"])
    np.testing.assert_allclose(stored.embeddings, emb.numpy(), atol=1e-5, rtol=0)
    # The model's input is the very volume ctretrieval-preprocess stored, voxel for voxel.
    store = open_volumes(setup["h5"])
    for name, item in named_items(setup["raw"]):
        assert np.array_equal(prepare(name, item, model.preprocess)[0], store.read(name)), name
    assert "the run's model is " + setup["best"].name in capsys.readouterr().err


def test_hu_arrays_and_volumes_embed_as_their_files(setup) -> None:
    from medcore.volumes.nifti import read_nifti

    model = ctretrieval.load(setup["export"], device="cpu")
    nifti = setup["raw"][0]
    volume = read_nifti(nifti)
    out = model.embed({"array": volume.voxels, "volume": volume, "file": nifti})
    assert out.names == ["array", "volume", "file"]
    torch.testing.assert_close(out.embeddings[0], out.embeddings[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.embeddings[1], out.embeddings[2], atol=1e-6, rtol=0)


def _search(setup, tmp_path, capsys, query: str, k: int) -> tuple[int, str, pd.DataFrame, dict]:
    out = tmp_path / f"{len(list(tmp_path.iterdir()))}.csv"
    argv = [
        "--index",
        str(setup["index"]),
        "--query",
        query,
        "--top-k",
        str(k),
        "--output",
        str(out),
    ]
    code, stdout, err = call_main(search, [*argv, "--device", "cpu"], capsys)
    if code:
        return code, err, pd.DataFrame(), {}
    return (
        code,
        stdout,
        pd.read_csv(out, keep_default_na=False),
        json.loads(out.with_suffix(".json").read_text()),
    )


@pytest.mark.parametrize("position", [0, 1], ids=["nifti", "dicom"])
def test_raw_query_ranks_as_the_stored_study(setup, tmp_path, capsys, position) -> None:
    raw = setup["raw"][position]
    study = f"ct_{position:02d}"
    n = len(Index.read(setup["index"]))
    code, _, by_id, by_id_json = _search(setup, tmp_path, capsys, study, n - 1)
    assert code == 0
    code, out, by_file, by_file_json = _search(setup, tmp_path, capsys, str(raw), n)
    assert code == 0 and f"query {study} " in out
    # The raw study finds itself first; the others at the distances its stored copy finds
    # them (ranks compared through the similarities: a tiny model has near ties).
    assert by_file["id"].iloc[0] == study
    assert by_file["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    raw_sims = dict(zip(by_file["id"][1:], by_file["similarity"][1:], strict=True))
    stored_sims = dict(zip(by_id["id"], by_id["similarity"], strict=True))
    assert raw_sims.keys() == stored_sims.keys()
    for key, value in stored_sims.items():
        assert raw_sims[key] == pytest.approx(value, abs=1e-5), key
    np.testing.assert_allclose(by_file["similarity"][1:], by_id["similarity"], atol=1e-5, rtol=0)
    findings = dict(zip(by_id["id"], by_id["findings"], strict=True))
    assert all(
        findings[i] == f for i, f in zip(by_file["id"][1:], by_file["findings"][1:], strict=True)
    )
    model = ctretrieval.load(setup["run"], device="cpu")
    api = model.search(raw, setup["index"], k=n)
    assert api["id"].tolist() == by_file["id"].tolist()
    np.testing.assert_allclose(api["similarity"], by_file["similarity"], atol=1e-6, rtol=0)
    assert set(api["query_findings"]) == {";".join(by_file_json["query_findings"])}
    by_name = model.search(study, setup["index"], k=n - 1)
    assert by_name[["id", "findings", "shared_findings"]].equals(
        by_id[["id", "findings", "shared_findings"]]
    )
    assert set(by_name["query_findings"]) == {";".join(by_id_json["query_findings"])}


def test_in_memory_index_is_the_saved_index(setup, tmp_path) -> None:
    model = ctretrieval.load(setup["best"], device="cpu")
    labels = pd.read_csv(setup["root"] / "data" / "labels.csv")
    y = labels[list(FINDINGS)].to_numpy()
    y = np.concatenate([y, (y.sum(1) == 0)[:, None]], axis=1).astype(np.uint8)
    memory = model.build_index(setup["raw"], labels=y)
    saved = Index.read(memory.write(tmp_path / "mine.npz"))
    stored = Index.read(setup["index"])
    for built in (memory, saved):
        assert built.ids.tolist() == stored.ids.tolist()
        np.testing.assert_allclose(built.embeddings, stored.embeddings, atol=1e-5, rtol=0)
        assert np.array_equal(built.labels, stored.labels) and built.has_labels.all()
        assert built.meta["weights"] == stored.meta["weights"]
        assert built.meta["store_settings"] == stored.meta["store_settings"]
    queries = [str(setup["raw"][3]), "ct_04"]
    mine = model.search(queries, saved, k=len(saved))
    theirs = model.search(queries, setup["index"], k=len(saved))
    assert mine["query"].tolist() == ["ct_03"] * 16 + ["ct_04"] * 15
    for frame in (mine, theirs):
        frame.sort_values(["query", "id"], inplace=True, ignore_index=True)
    assert mine.drop(columns=["rank", "similarity"]).equals(
        theirs.drop(columns=["rank", "similarity"])
    )
    np.testing.assert_allclose(mine["similarity"], theirs["similarity"], atol=1e-5, rtol=0)
    from_embeddings = model.build_index(model.embed(setup["raw"][:4]))
    assert from_embeddings.ids.tolist() == ["ct_00", "ct_01", "ct_02", "ct_03"]
    assert not from_embeddings.has_labels.any()


def test_an_unreadable_volume_among_good_ones_is_skipped(setup, tmp_path, capsys) -> None:
    model = ctretrieval.load(setup["export"], device="cpu")
    broken = tmp_path / "ct_99.nii.gz"
    broken.write_bytes(setup["raw"][0].read_bytes()[:300])
    out = model.embed([setup["raw"][0], broken, setup["raw"][1]])
    err = capsys.readouterr().err
    assert out.names == ["ct_00", "ct_01"] and len(out.embeddings) == 2
    assert list(out.skipped) == ["ct_99"] and "skipped ct_99: " in err
    assert "1 of 3 volume(s) skipped" in err
    found = model.search([setup["raw"][0], broken, "ct_04"], setup["index"], k=2)
    assert found["query"].tolist() == ["ct_00", "ct_00", "ct_04", "ct_04"]
    assert "skipped ct_99: " in capsys.readouterr().err
    with pytest.raises(DataError, match="none of the 1 volume"):
        model.embed([broken])
    with pytest.raises(DataError, match="none of the 1 volume"):
        model.embed(np.zeros((6, 8, 8), np.uint8))
    assert "skipped volume_0: a uint8 array looks preprocessed" in capsys.readouterr().err
    code, err, _, _ = _search(setup, tmp_path, capsys, str(broken), 3)
    assert code == 2 and "ct_99.nii.gz" in error_line(err)


def test_refused_sources(setup, tmp_path, capsys) -> None:
    other = ModelExport(
        kind="cxrlandmarks.ResNetLandmarkRegressor",
        package="cxrlandmarks",
        model_config={"arch": "resnet18"},
        tensors={"w": torch.zeros(2)},
    )
    folder = write_export(other, tmp_path / "cxr")
    with pytest.raises(
        ModelSourceError,
        match=r"this is a cxrlandmarks\.ResNetLandmarkRegressor export, not ctretrieval",
    ):
        ctretrieval.load(folder)
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(setup["export"] / "model.safetensors", bare)
    with pytest.raises(ModelSourceError, match=r"a weights file without its config\.json"):
        ctretrieval.load(bare)
    with pytest.raises(ModelSourceError, match="neither an exported model folder"):
        ctretrieval.load(tmp_path)
    code, _, err = call_main(export, [str(folder), "--output", str(tmp_path / "x")], capsys)
    assert code == 2 and "not ctretrieval" in error_line(err)
    code, _, err = call_main(
        export, [str(setup["export"]), "--output", str(tmp_path / "y")], capsys
    )
    assert code == 2 and "already an exported model" in error_line(err)
    # An index embedded by another model: refused, not searched.
    index = Index.read(setup["index"])
    index.meta["weights"] = "0" * 16
    model = ctretrieval.load(setup["best"], device="cpu")
    with pytest.raises(DataError, match="embedded by another model"):
        model.search("ct_00", index)


def test_import_and_load_stay_off_the_trainer() -> None:
    code = (
        "import sys, ctretrieval\n"
        "assert 'torch' not in sys.modules\n"
        "ctretrieval.load\n"
        "heavy = [m for m in sys.modules if m.startswith(('lightning', 'medcore.engine.trainer'))]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_python_api_runs(setup, tmp_path, monkeypatch, capsys) -> None:
    """The README's own snippet, on this module's run and studies laid out as it names them."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "demo").mkdir()
    os.symlink(setup["run"], tmp_path / "demo-run")
    os.symlink(setup["root"] / "raw", tmp_path / "demo" / "dicom")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    shown = capsys.readouterr().out
    assert Index.read(tmp_path / "archive.npz").ids.tolist() == [f"ct_{i:02d}" for i in range(14)]
    assert "(2, 16)\n" in shown
    probs = re.search(
        r"^ +condensacion +nodulos +quistes +sin_hallazgos\nct_00 .*\nct_01 ", shown, re.M
    )
    assert probs, shown
    header = next(line for line in shown.splitlines() if "similarity" in line).split()
    assert header == RESULT_COLUMNS
    assert shown.count("ct_14") == 3 and shown.count("ct_15") == 3
