"""ctclip.load, ctclip-export and ctclip-predict on a smoke run: every source kind, raw NIfTI and
DICOM volumes, the evaluation path as reference, refusals, and the README's Python snippet."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import ctclip
from ctclip import cli
from ctclip.api import FindingError
from ctclip.evaluate import labelled_volumes, load_model
from ctclip.export import find_in_run
from ctclip.findings import FINDINGS
from ctclip.predict import predict
from ctclip.synthetic import DEMO_FINDINGS, Case, render
from ctclip.text import Tokenizer
from medcore.engine.inference import checkpoint_precision
from medcore.errors import DataError
from medcore.testing import error_line, hub_snapshot_of
from medcore.volumes.nifti import read_nifti
from medcore.weights.export import ModelExport, write_export
from medcore.weights.sources import ModelSourceError

REPO = "ctclip-test/smoke"
ATOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_sets):
    """A smoke run (the demo, tiny model), its export, the export in an offline hub cache."""
    tmp = tmp_path_factory.mktemp("api")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDCORE_CACHE_DIR", str(tmp / "cache"))
    mp.setenv("HF_HOME", str(tmp / "hf"))
    mp.delenv("HF_HUB_CACHE", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    run = tmp / "runs" / "ctclip" / "20260101-000000"
    try:
        argv = ["--smoke", "--output-dir", str(run), "--device", "cpu", *tiny_sets]
        assert cli.train(argv) == 0
        exported = tmp / "export"
        assert cli.export([str(run), "--output", str(exported)]) == 0
        hub_snapshot_of(tmp / "hf", REPO, exported)
        demo = next((tmp / "cache" / "ctclip").glob("demo-*/"))
        yield SimpleNamespace(
            tmp=tmp,
            run=run,
            exported=exported,
            demo=demo,
            store=next(demo.glob("*.h5")),
            metadata=sorted(demo.glob("ct_rate/*_metadata.csv")),
            valid=sorted(demo.glob("ct_volumes/valid/**/*.nii.gz")),
            model=ctclip.load(exported, device="cpu"),
        )
    finally:
        mp.undo()


def _eval_path(env) -> pd.DataFrame:
    """ctclip-eval's functions on the preprocessed store of the demo's validation volumes."""
    device = torch.device("cpu")
    model, state = load_model(find_in_run(env.run), device)
    labels = env.demo / "ct_rate" / "valid_predicted_labels.csv"
    dataset = labelled_volumes(model, env.store, labels, allow_missing=False)
    probs, _ = predict(
        model, dataset, Tokenizer(model.context_length), device, checkpoint_precision(state, device)
    )
    names = [n.removesuffix(".nii.gz") for n in dataset.names]
    return pd.DataFrame(probs.numpy(), index=names, columns=list(FINDINGS))


def test_every_source_equals_the_evaluation_path(env) -> None:
    reference = _eval_path(env)
    best = find_in_run(env.run)
    assert best.name.startswith("model_") and best.parent.name == "checkpoints"
    sources = [env.run, best, env.exported, f"hf-hub:{REPO}"]
    for source in sources:
        table = ctclip.load(source, device="cpu").zero_shot(
            env.valid, metadata=env.metadata, num_workers=0, progress=False
        )
        assert list(table.columns) == list(FINDINGS), source
        assert sorted(table.index) == sorted(reference.index), source
        np.testing.assert_allclose(
            table.loc[reference.index].to_numpy(), reference.to_numpy(), atol=ATOL, err_msg=source
        )


def test_export_folder_carries_what_load_needs(env) -> None:
    files = sorted(p.name for p in env.exported.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]  # no vocabulary copied
    config = json.loads((env.exported / "config.json").read_text())
    assert config["kind"] == "ctclip.CTCLIP" and config["package"] == "ctclip"
    assert config["labels"] == list(FINDINGS)
    assert config["exported_from"] == find_in_run(env.run).name  # the best checkpoint
    pre = config["preprocessing"]
    assert pre["target_shape"] == [8, 28, 28] and pre["slide_b2u"] is True
    assert pre["hu_range"] == [-1000.0, 1000.0] and pre["orientation"] == "SPL"
    assert pre["slice_normalization"]["mean"] == config["model_config"]["mean"]
    extras = config["extras"]
    assert extras["prompt_templates"] == {
        "positive": "{finding} is present.",
        "negative": "{finding} is not present.",
    }
    assert extras["tokenizer"]["vocabulary"] == "bpe_simple_vocab_16e6.txt.gz"
    assert extras["tokenizer"]["context_length"] == config["model_config"]["context_length"] == 32
    assert extras["precision"] == "32-true"
    metrics = json.loads((env.run / "metrics.json").read_text())
    card = (env.exported / "README.md").read_text()
    assert "zero_shot.auc" in card and f"{metrics['zero_shot']['auc_ci_low']:.4f}" in card
    assert "library_name: ctclip" in card and "ctclip-predict" in card


def test_nifti_and_dicom_of_one_study_give_the_same_probabilities(env, tmp_path) -> None:
    labels = dict.fromkeys(FINDINGS, 0) | dict.fromkeys(DEMO_FINDINGS[:2], 1)
    hu, affine = render(Case(labels=labels, seed=11), "LPS", {0: 5.0, 1: 5.0, 2: 3.0}, 11, 0.0)
    stored = (np.round(hu) + 1024).astype(np.int16)
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "study.nii.gz")
    write_dicom_series(tmp_path / "study_dicom", stored, affine, intercept=-1024.0)
    model = env.model
    from_nifti = model.preprocess(tmp_path / "study.nii.gz")
    np.testing.assert_array_equal(model.preprocess(tmp_path / "study_dicom"), from_nifti)
    canonical = read_nifti(tmp_path / "study.nii.gz")
    inputs = {
        "nifti": tmp_path / "study.nii.gz",
        "dicom": tmp_path / "study_dicom",
        "array": (canonical.voxels, canonical.spacing),
        "volume": canonical,
    }
    table = model.zero_shot(inputs, num_workers=0, progress=False)
    assert list(table.index) == list(inputs)
    for name in ("dicom", "array", "volume"):
        np.testing.assert_allclose(table.loc[name], table.loc["nifti"], atol=1e-6, err_msg=name)


def test_any_finding_follows_the_softmax_over_its_prompt_pair(env) -> None:
    model = env.model
    scans = env.valid[:3]
    asked = ["Aortic aneurysm", "Pleural effusion"]
    table = model.zero_shot(scans, asked, metadata=env.metadata, num_workers=0, progress=False)
    assert list(table.columns) == asked and list(table.index) == [
        p.name.removesuffix(".nii.gz") for p in scans
    ]
    volumes = model.encode_volumes(scans, metadata=env.metadata, num_workers=0, progress=False)
    assert volumes.shape == (3, 16)
    np.testing.assert_allclose(volumes.norm(dim=1), 1.0, atol=1e-6)
    scale = float(model.model.scale().detach())
    for finding in asked:
        text = model.encode_text([f"{finding} is present.", f"{finding} is not present."])
        logits = scale * volumes.double() @ text.double().T
        expected = torch.softmax(logits, dim=1)[:, 0].numpy()
        np.testing.assert_allclose(table[finding].to_numpy(), expected, atol=1e-5)
    default = model.zero_shot(scans, metadata=env.metadata, num_workers=0, progress=False)
    np.testing.assert_allclose(default["Pleural effusion"], table["Pleural effusion"], atol=1e-6)


@pytest.mark.parametrize(
    "findings, message",
    [
        ([""], "'' is not a finding name (empty or not text)"),
        (["Lung nodule", "   "], "'   ' is not a finding name"),
        ([None], "None is not a finding name"),
        ([], "no finding named"),
        (["Emphysema", "Emphysema"], "'Emphysema' is named twice"),
        (["very " * 40 + "large heart"], "tokens; the model's text context holds 32"),
    ],
)
def test_bad_finding_names_are_refused(env, findings, message) -> None:
    with pytest.raises(FindingError, match=re.escape(message)):
        env.model.zero_shot(env.valid[:1], findings, num_workers=0, progress=False)


def test_predict_command_names_skips_and_counts_a_broken_volume(env, tmp_path, capsys) -> None:
    good = env.valid[:3]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good[0].read_bytes()[:300])  # a download cut short
    listing = tmp_path / "volumes.csv"
    pd.DataFrame(
        {"path": [os.path.relpath(p, tmp_path) for p in good[1:]] + ["broken.nii.gz"]}
    ).to_csv(listing, index=False)
    out, emb = tmp_path / "findings.csv", tmp_path / "emb.safetensors"
    argv = [str(good[0]), str(listing), "--model", f"hf-hub:{REPO}", "--output", str(out)]
    argv += ["--embeddings", str(emb), "--findings", "Lung nodule", "Aortic aneurysm"]
    argv += ["--device", "cpu", "--num-workers", "0"]
    code = cli.predict(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"^skipped broken: .+", captured.err, re.M), captured.err
    assert "3 predicted, 1 skipped" in captured.out
    table = pd.read_csv(out)
    names = [p.name.removesuffix(".nii.gz") for p in good]
    assert list(table.columns) == ["volume", "source", "Lung nodule", "Aortic aneurysm"]
    assert list(table["volume"]) == names
    expected = env.model.zero_shot(good, ["Lung nodule", "Aortic aneurysm"], num_workers=0)
    np.testing.assert_allclose(table.iloc[:, 2:].to_numpy(), expected.to_numpy(), atol=1e-6)
    from safetensors.torch import load_file

    embeddings = load_file(str(emb))
    assert sorted(embeddings) == sorted(names)
    direct = env.model.encode_volumes(good, num_workers=0, progress=False)
    for i, name in enumerate(names):
        torch.testing.assert_close(embeddings[name], direct[i], atol=1e-6, rtol=0)


def _weights_alone(env, tmp_path: Path) -> Path:
    """The export's weights file copied without the config.json beside it."""
    return Path(shutil.copy(env.exported / "model.safetensors", tmp_path / "weights.safetensors"))


def test_predict_command_refusals_are_one_line(env, tmp_path, capsys) -> None:
    out = tmp_path / "out.csv"
    cases = [
        (["--findings", ""], "error: --findings: '' is not a finding name"),
        (["--model", str(_weights_alone(env, tmp_path))], "without its config.json"),
    ]
    for extra, message in cases:
        argv = [str(env.valid[0]), "--model", str(env.exported), "--output", str(out), *extra]
        assert cli.predict([*argv, "--device", "cpu"]) == 2
        line = error_line(capsys.readouterr().err)
        assert message in line, line
        assert not out.exists()
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    argv = [str(tmp_path / "bad.nii.gz"), "--model", str(env.exported), "--output", str(out)]
    assert cli.predict([*argv, "--device", "cpu", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 volumes could be read" in error_line(err)
    assert "skipped bad:" in err and not out.exists()


def test_sources_of_other_models_are_refused(env, tmp_path) -> None:
    net = torch.nn.Linear(4, 2)
    other = ModelExport(
        "cxrlandmarks.ResNetLandmarkRegressor", "cxrlandmarks", {}, net.state_dict()
    )
    cases = {
        write_export(other, tmp_path / "landmarks"): (
            "this is a cxrlandmarks.ResNetLandmarkRegressor export, not ctclip.CTCLIP"
        ),
        _weights_alone(env, tmp_path): "a weights file without its config.json",
    }
    for source, message in cases.items():
        with pytest.raises(ModelSourceError, match=re.escape(message)):
            ctclip.load(source, device="cpu")


def test_unreadable_volume_raises_in_python(env, tmp_path) -> None:
    with pytest.raises(DataError, match="missing: not found"):
        env.model.zero_shot([env.valid[0], tmp_path / "missing.nii.gz"], num_workers=0)
    with pytest.raises(DataError, match=r"needs its voxel spacing"):
        env.model.zero_shot({"a": np.zeros((4, 8, 8))}, num_workers=0)
    result = env.model.predict(
        [env.valid[0], tmp_path / "missing.nii.gz"], skip_unreadable=True, num_workers=0
    )
    assert result.names == [env.valid[0].name.removesuffix(".nii.gz")]
    assert "missing" in result.skipped


def test_a_volume_that_does_not_look_like_hu_is_named(env, capsys) -> None:
    water = np.zeros((6, 16, 16), dtype=np.float32)  # no air: not a body CT in HU
    env.model.preprocess((water, (2.0, 1.0, 1.0)))
    err = capsys.readouterr().err
    assert "warning: volume_0: read as HU from the stored values as they are, but" in err
    assert "(not a body CT in HU?)" in err


def test_import_stays_light_and_load_pulls_no_trainer() -> None:
    code = (
        "import sys, ctclip\n"
        "assert 'torch' not in sys.modules, 'import ctclip imported torch'\n"
        "ctclip.load\n"
        "bad = [m for m in sys.modules if m.startswith('lightning') or m == 'medcore.engine.trainer']\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_readme_python_snippet_runs_on_the_demo(env, monkeypatch, capsys) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(env.tmp)  # runs/ctclip/<stamp> is the smoke run
    exec(compile(snippet, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Aortic aneurysm" in out and "torch.Size([4, 16])" in out


def write_dicom_series(folder: Path, stored: np.ndarray, affine: np.ndarray, intercept: float):
    """``stored`` (NIfTI voxel order ``[i, j, k]``, ``k`` the slice axis, RAS ``affine``) as a
    signed 16-bit CT series written by pydicom: slice ``k`` one file (shuffled names), rows
    along ``j`` and columns along ``i``, positions and orientation from the affine in LPS."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = [*(lps[:3, 0] / col_mm), *(lps[:3, 1] / row_mm)]
    study, series = generate_uid(), generate_uid()
    names = np.random.default_rng(0).permutation(stored.shape[2])
    for k in range(stored.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "PHANTOM", k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
        ds.PixelSpacing = [float(row_mm), float(col_mm)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        plane = np.ascontiguousarray(stored[:, :, k].T)  # rows j, columns i
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = plane.astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
