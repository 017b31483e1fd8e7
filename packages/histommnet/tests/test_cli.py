from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histommnet.breakhis import scan_breakhis
from histommnet.cli import analyze, gradcam, train
from histommnet.config import HistoConfig
from histommnet.folds import make_folds
from medcore.cli import stages
from medcore.config import load_config, packaged_config_path
from medcore.data.splits import load_splits
from medcore.runtime.interrupts import Interrupted
from medcore.testing import call_main, skip_if_no_cuda
from medcore.weights.checkpoint import load_checkpoint


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("kind", ["mmnet", "single", "concat"])
def test_train_one_fold_each_model(
    kind: str, tiny_args, tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    code, stdout, err = call_main(
        train,
        [
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(out),
            "--model",
            kind,
            "--fold",
            "0",
            *tiny_args(),
        ],
        capsys,
    )
    assert code == 0, err
    assert "mean ± std" in stdout and "patient" in stdout
    best = out / "fold_0" / "checkpoints" / "fold_0_best.pth"
    state = load_checkpoint(
        best,
        kind={
            "mmnet": "histommnet.MMNet",
            "single": "histommnet.SingleMagNet",
            "concat": "histommnet.ConcatNet",
        }[kind],
    )
    assert state["model_config"]["name"] == kind and state["magnifications"] == [
        "40X",
        "100X",
        "200X",
        "400X",
    ]
    # one weights-only file per set of weights: the selected (best.pth) and the last (final.pt)
    assert sorted(p.name for p in best.parent.iterdir()) == ["final.pt", "fold_0_best.pth"]
    # the objective's terms are logged beside the loss, and add up to it (one micro-batch per
    # step: no gradient accumulation in these runs, so each logged window is whole steps)
    logged = [
        json.loads(line)
        for line in (out / "fold_0" / "metrics.jsonl").read_text().splitlines()
        if '"train/loss"' in line
    ]
    assert logged
    for row in logged:
        assert row["train/loss"] == pytest.approx(
            row["train/focal"] + 0.3 * row["train/subtype_ce"], rel=1e-4
        )
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0]
    fold = metrics["folds"][0]
    for level in ("image", "patient"):
        for m in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "sensitivity", "specificity"):
            assert m in fold["test"][level]
    # the patient-level numbers follow from the saved per-patient predictions and threshold
    patients = pd.read_csv(out / "fold_0" / "predictions_patient.csv")
    pred = (patients["prob_malignant"] >= fold["thresholds"]["patient"]).astype(int)
    assert fold["test"]["patient"]["accuracy"] == pytest.approx(
        float((pred == patients["label"]).mean())
    )
    for name in ("cv_folds.csv", "cv_folds.md", "cv_summary.csv", "cv_summary.md"):
        assert (out / "tables" / name).is_file()
    for name in (
        "roc_image.png",
        "roc_patient.png",
        "confusion_fold0_image.png",
        "confusion_fold0_patient.png",
        "curves_fold0_loss.png",
    ):
        assert (out / "plots" / name).stat().st_size > 0
    # folds on disk: patient-disjoint, every patient tested once
    splits = load_splits(out / "splits.json")
    index = scan_breakhis(tiny_tree, verbose=False)
    groups = np.array([p.patient_id for p in index.patients])
    for split in splits:
        assert not set(groups[split["train"]]) & set(groups[split["test"]])
        assert not set(groups[split["val"]]) & set(groups[split["train"]])
    assert sorted(np.concatenate([s["test"] for s in splits]).tolist()) == list(
        range(len(index.patients))
    )


def test_folds_never_share_a_patient(tiny_tree: Path) -> None:
    cfg = load_config(
        HistoConfig, packaged_config_path("histommnet", "default"), overrides=["cv.folds=4"]
    )
    patients = scan_breakhis(tiny_tree, verbose=False).patients
    plan = make_folds(patients, cfg)
    assert plan.stratify == "class" and plan.fallback is None  # the demo preset asks for class
    folds = plan.folds
    groups = np.array([p.patient_id for p in patients])
    tested = []
    for fold in folds:
        parts = [set(groups[fold[name]]) for name in ("train", "val", "test")]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert sum(len(fold[n]) for n in ("train", "val", "test")) == len(patients)
        tested += fold["test"].tolist()
        n_val, n_train = len(set(groups[fold["val"]])), len(set(groups[fold["train"]]))
        assert 0.2 <= n_val / (n_val + n_train) <= 0.4  # ~30% of the training patients
    assert sorted(tested) == list(range(len(patients)))
    # two adenosis folders (slides AB and CD) are one patient: the split checks above cover them
    pair = [p for p in patients if p.key.endswith(("AB", "CD"))]
    assert len(pair) == 2 and pair[0].patient_id == pair[1].patient_id


def test_demo_smoke_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code, stdout, err = call_main(
        train, ["--smoke", "--output-dir", str(out), "--set", "trainer.num_workers=0"], capsys
    )
    assert code == 0, err
    assert (tmp_path / "cache" / "histommnet" / "demo-v2" / ".complete").is_file()
    assert (out / "fold_0" / "checkpoints" / "fold_0_best.pth").is_file()
    assert "fold" in stdout
    # resuming a finished run reuses the finished fold instead of training again
    code, stdout2, err2 = call_main(train, ["--resume", "latest", "--output-dir", str(out)], capsys)
    assert code == 0, err2
    assert "fold_0: finished before the interruption; skipped" in err2 and "mean ± std" in stdout2


def test_analyze_report(tiny_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    code, stdout, err = call_main(
        analyze, ["--data-dir", str(tiny_tree), "--output-dir", str(out), "--folds", "2"], capsys
    )
    assert code == 0, err
    report = json.loads((out / "analysis.json").read_text())
    index = scan_breakhis(tiny_tree, verbose=False)
    assert report["patients"] == len(index.patients) and report["images"] == len(index.images)
    by_class = {r["class"]: r for r in report["class_counts"]}
    assert by_class["benign"]["patients"] == 8 and by_class["malignant"]["patients"] == 8
    assert sum(r["images"] for r in report["subtype_counts"]) == len(index.images)
    folds = pd.read_csv(out / "tables" / "folds.csv")
    assert set(folds["fold"]) == {0, 1}
    assert folds[folds["split"] == "test"]["patients"].sum() == len(index.patients)
    assert (out / "tables" / "subtype_counts.md").is_file()
    assert "images per patient" in stdout


def test_gradcam_overlays(tiny_args, tiny_tree: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = call_main(
        train,
        [
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(run),
            "--fold",
            "1",
            *tiny_args("model.shared_backbone=true"),
        ],
        capsys,
    )
    assert code == 0, err
    out = tmp_path / "cams"
    ckpt = run / "fold_1" / "checkpoints" / "fold_1_best.pth"
    code, stdout, err = call_main(
        gradcam,
        [
            "--checkpoint",
            str(ckpt),
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(out),
            "--num-patients",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.count("P(malignant)=") == 2
    record = json.loads((out / "gradcam.json").read_text())
    assert len(record["patients"]) == 2
    tested = set(load_splits(run / "splits.json", with_meta=False)[1]["test"].tolist())
    keys = [p.key for p in scan_breakhis(tiny_tree, verbose=False).patients]
    for rec in record["patients"]:
        assert keys.index(rec["patient"]) in tested  # default: the fold's test patients
        for mag in ("40X", "100X", "200X", "400X"):
            overlay = np.asarray(Image.open(out / rec["patient"] / f"{mag}.png"))
            assert overlay.shape == (32, 32, 3)
        assert (out / f"{rec['patient']}_montage.png").is_file()
    code, _, err = call_main(
        gradcam,
        [
            "--checkpoint",
            str(ckpt),
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(out),
            "--patients",
            "NOPE",
        ],
        capsys,
    )
    assert code == 2 and "NOPE" in _error_line(err)
    # the BreakHis spellings of a patient: slide id, file-name prefix (any case)
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(tiny_tree), "--output-dir"]
    code, stdout, err = call_main(
        gradcam,
        [*argv, str(tmp_path / "named"), "--patients", "14-1001AB", "sob_b_a-14-1001cd"],
        capsys,
    )
    assert code == 0, err
    named = json.loads((tmp_path / "named" / "gradcam.json").read_text())["patients"]
    assert [r["patient"] for r in named] == ["SOB_B_A_14-1001AB", "SOB_B_A_14-1001CD"]
    code, _, err = call_main(
        gradcam, [*argv, str(tmp_path / "unknown"), "--patients", "14-1001EF"], capsys
    )
    line = _error_line(err)
    assert code == 2 and line.startswith("error: --patients 14-1001EF: no such patient")
    assert "close: SOB_B_A_14-1001AB, SOB_B_A_14-1001CD" in line


@pytest.mark.faults
def test_bad_inputs_are_one_line_errors(tiny_args, tiny_tree: Path, tmp_path: Path, capsys) -> None:
    only_benign = tmp_path / "benign_only"
    shutil.copytree(
        tiny_tree / "BreaKHis_v1" / "histology_slides" / "breast" / "benign", only_benign / "benign"
    )
    cases = [
        (["--data-dir", str(tmp_path / "missing")], "data directory not found"),
        (["--data-dir", str(only_benign)], "no malignant patient"),
        (["--data-dir", str(tiny_tree), "--set", "model.backbone=no_such_net"], "model.backbone"),
        (["--data-dir", str(tiny_tree), "--fold", "7"], "--fold"),
        (["--data-dir", str(tiny_tree), "--set", "model.pretrained=true"], "--pretrained-weights"),
        (
            ["--data-dir", str(tiny_tree), "--pretrained-weights", str(tmp_path / "none.pth")],
            "checkpoint not found",
        ),
        (["--data-dir", str(tiny_tree), "--set", "data.nope=1"], "data.nope"),
        (["--data-dir", str(tiny_tree), "--folds", "40"], "cv.folds"),
    ]
    for i, (argv, expected) in enumerate(cases):
        code, _, err = call_main(
            train, [*tiny_args(), *argv, "--output-dir", str(tmp_path / f"r{i}")], capsys
        )
        assert code == 2, (argv, err)
        assert expected in _error_line(err), (argv, err)
    code, _, err = call_main(
        gradcam,
        ["--checkpoint", str(tmp_path / "none.pt"), "--output-dir", str(tmp_path / "g")],
        capsys,
    )
    assert code == 2 and "checkpoint not found" in _error_line(err)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["--fold", "7"], "--fold"),
        (["--set", "model.backbone=no_such_net"], "model.backbone"),
        (["--set", "model.pretrained=true"], "--pretrained-weights"),
        (["--model", "single", "--set", "model.single_magnification=1000X"], "1000X"),
    ],
)
def test_refused_config_leaves_no_run_dir(
    items: list[str], expected: str, tiny_args, tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = [*tiny_args(), "--data-dir", str(tiny_tree), "--output-dir", str(out), *items]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2 and expected in _error_line(err)
    assert not out.exists()  # refused by its checks, before the run directory


@pytest.mark.gpu
@skip_if_no_cuda
def test_cuda_amp_training_step(tiny_args, tiny_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cuda"
    code, _, err = call_main(
        train,
        [
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(out),
            "--device",
            "cuda",
            "--fold",
            "0",
            *tiny_args("trainer.amp=true"),
        ],
        capsys,
    )
    assert code == 0, err
    events = [
        json.loads(line) for line in (out / "fold_0" / "metrics.jsonl").read_text().splitlines()
    ]
    start = next(e for e in events if e["event"] == "start")
    assert start["amp"] in ("bf16", "fp16")
    assert np.isfinite(
        json.loads((out / "metrics.json").read_text())["folds"][0]["test"]["image"]["accuracy"]
    )


def test_resume_interrupted_fold(
    tiny_args, tiny_tree: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    argv = [
        "--data-dir",
        str(tiny_tree),
        "--output-dir",
        str(out),
        "--fold",
        "0",
        *tiny_args("trainer.epochs=2"),
    ]
    with monkeypatch.context() as patch:
        # Killed as the fold's stage record is written (a finished fold's latest.pt is
        # deleted after it): the fold stays unfinished, its latest.pt is there.
        def killed(*args, **kwargs):
            raise Interrupted("SIGKILL")

        patch.setattr(stages, "atomic_write_json", killed)
        code, _, err = call_main(train, argv, capsys)
    assert code == 130, err
    ckpts = out / "fold_0" / "checkpoints"
    best_before = load_checkpoint(ckpts / "fold_0_best.pth")
    # As if killed after the last epoch's latest.pt: no final checkpoint, no fold result.
    (ckpts / "final.pt").unlink()
    (out / "fold_0" / "result.json").unlink()
    assert not (out / "fold_0" / "stage.json").exists()
    assert load_checkpoint(ckpts / "latest.pt")["epoch"] == 2
    code, stdout, err = call_main(train, ["--resume", str(out)], capsys)
    assert "mean ± std" in stdout
    assert code == 0, err
    assert (out / "fold_0" / "result.json").is_file() and (ckpts / "final.pt").is_file()
    best_after = load_checkpoint(ckpts / "fold_0_best.pth")  # no epoch was trained again:
    assert (
        best_after["epoch"] == best_before["epoch"]
        and best_after["model"].keys() == best_before["model"].keys()
    )
    assert all(torch.equal(best_after["model"][k], v) for k, v in best_before["model"].items())
    assert best_after["thresholds"] == best_before["thresholds"]
    events = [
        json.loads(line) for line in (out / "fold_0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(e["event"] == "eval" for e in events) == 2
    code, _, err = call_main(train, ["--resume", str(tmp_path / "nowhere")], capsys)
    line = _error_line(err)
    assert code == 2 and "nowhere: no such run directory or checkpoint" in line


def test_packaged_config_by_name(tiny_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    code, _, err = call_main(
        analyze,
        [
            "--config",
            "breakhis.yaml",
            "--data-dir",
            str(tiny_tree),
            "--output-dir",
            str(out),
            "--folds",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    cfg = load_config(HistoConfig, out / "config.yaml")
    assert (
        cfg.model.backbone == "efficientnet_b1"
        and cfg.data.image_size == 224
        and cfg.cv.stratify_subtype
    )
    code, _, err = call_main(analyze, ["--config", "nope.yaml", "--output-dir", str(out)], capsys)
    assert code == 2 and "nope.yaml" in _error_line(err)
