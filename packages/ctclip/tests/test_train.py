"""ctclip-train and ctclip-eval end to end on tiny data, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from ctclip import cli
from ctclip.findings import FINDINGS
from medcore.testing import skip_if_no_cuda
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_sets):
    """The built-in demo path (generation, preprocessing, training, zero-shot) with --smoke."""
    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDCORE_CACHE_DIR", str(tmp / "cache"))
    try:
        code = cli.train(
            ["--smoke", "--output-dir", str(tmp / "run"), "--device", "cpu", *tiny_sets]
        )
    finally:
        mp.undo()
    assert code == 0
    return tmp / "run"


def test_smoke_train_writes_the_run_directory(trained_run):
    for rel in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "splits.json",
        "checkpoints/final.pt",
        "checkpoints/latest.pt",
        "zero_shot_metrics.csv",
        "zero_shot_metrics.json",
        "plots/zero_shot_roc.png",
    ):
        assert (trained_run / rel).is_file(), rel
    assert list((trained_run / "tb").iterdir())
    # One file per distinct set of weights beside latest.pt: the best and the final checkpoint.
    kept = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert len(kept) == 3 and kept[:2] == ["final.pt", "latest.pt"], kept
    assert kept[2].startswith("model_") and kept[2].endswith(".pt"), kept
    final = load_checkpoint(trained_run / "checkpoints/final.pt", kind="ctclip.CTCLIP")
    assert final["model_config"]["image_size"] == 28 and final["findings"] == list(FINDINGS)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["num_evaluated_findings"] >= 1 and 0.0 <= metrics["mean_auc"] <= 1.0
    log = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "train/loss" in r]
    assert steps and all(  # the loss's terms, logged at the logging steps
        r["train/loss"]
        == pytest.approx((r["train/image_to_text"] + r["train/text_to_image"]) / 2, rel=1e-5)
        for r in steps
    )


def test_eval_command_rebuilds_the_model_from_the_checkpoint(trained_run, tmp_path, capsys):
    demo = next((trained_run.parent / "cache" / "ctclip").glob("demo-*/"))
    out = tmp_path / "eval"
    code = cli.evaluate(
        [
            "--model-path",
            str(trained_run / "checkpoints/final.pt"),
            "--test-data",
            str(next(demo.glob("*.h5"))),
            "--test-labels",
            str(demo / "ct_rate/valid_predicted_labels.csv"),
            "--output-dir",
            str(out),
            "--n-boot",
            "20",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "AUC [95% CI]" in printed and "mean" in printed
    rows = pd.read_csv(out / "zero_shot_metrics.csv")
    assert list(rows["finding"]) == [*FINDINGS, "mean"]
    for column in ("auc", "auc_ci_low", "f1_ci_high", "precision", "recall", "accuracy"):
        assert column in rows.columns
    assert (out / "plots/zero_shot_roc.png").is_file()
    preds = pd.read_csv(out / "zero_shot_predictions.csv")
    assert (
        preds.shape[1] == 19
        and ((preds[list(FINDINGS)] >= 0) & (preds[list(FINDINGS)] <= 1)).all().all()
    )


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def test_eval_refuses_a_checkpoint_of_another_model(trained_run, tmp_path, capsys):
    other = tmp_path / "other.pt"
    save_checkpoint({"model": {"w": torch.zeros(1)}}, other, kind="ctretrieval.Model")
    code = cli.evaluate(
        ["--model-path", str(other), "--test-data", "x.h5", "--test-labels", "y.csv"]
    )
    assert code == 2 and "ctretrieval.Model checkpoint, not ctclip.CTCLIP" in _one_error_line(
        capsys
    )


def test_real_data_errors_are_one_line(tiny_demo, tiny_sets, tmp_path, capsys):
    base = [
        "--data-dir",
        str(tiny_demo),
        "--output-dir",
        str(tmp_path / "r"),
        "--smoke",
        *tiny_sets,
    ]
    assert cli.train([*base, "--dinov2-model-name", "dinov2_vitz14"]) == 2
    assert "unknown backbone 'dinov2_vitz14'" in _one_error_line(capsys)

    reports = pd.read_csv(tiny_demo / "ct_rate/train_reports.csv")
    reports.drop(columns=["Findings_EN"]).to_csv(tmp_path / "no_col.csv", index=False)
    assert cli.train([*base, "--txt-filepath", str(tmp_path / "no_col.csv")]) == 2
    assert "missing column(s) Findings_EN" in _one_error_line(capsys)

    extra = pd.concat([reports, reports.iloc[:1].assign(VolumeName="train_999_a_1.nii.gz")])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    assert cli.train([*base, "--txt-filepath", str(tmp_path / "extra.csv")]) == 2
    assert "1 of" in _one_error_line(capsys)

    assert cli.train([*base, "--set", "model.image_size=56"]) == 2
    assert "28x28 slices but model.image_size is 56" in _one_error_line(capsys)

    assert cli.train([*base, "--pretrained-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in _one_error_line(capsys)

    assert cli.train([*base, "--use-ddp"]) == 2
    assert "torchrun" in _one_error_line(capsys)


def test_real_data_training_uses_the_files(tiny_demo, tiny_sets, tmp_path):
    code = cli.train(
        [
            "--data-dir",
            str(tiny_demo),
            "--output-dir",
            str(tmp_path / "r"),
            "--smoke",
            "--text-column",
            "both",
            "--no-do-validate",
            *tiny_sets,
        ]
    )
    assert code == 0
    assert (tmp_path / "r/checkpoints/final.pt").is_file()
    assert not (tmp_path / "r/zero_shot_metrics.csv").exists()
    splits = json.loads((tmp_path / "r/splits.json").read_text())
    assert len(splits["ids"]["train"]) == 8


@pytest.mark.gpu
@skip_if_no_cuda
def test_training_step_on_cuda_with_amp(tiny_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    code = cli.train(
        ["--smoke", "--device", "cuda", "--output-dir", str(tmp_path / "run"), *tiny_sets]
    )
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "start")["amp"] in ("bf16", "fp16")


def _eval_argv(model: Path, data: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model-path", str(model), "--test-data", str(data), "--test-labels", str(labels),
        "--output-dir", str(out), "--n-boot", "0", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_eval_reads_the_run_and_chooses_thresholds_on_validation(trained_run, tmp_path):
    from ctclip.evaluate import choose_thresholds

    demo = next((trained_run.parent / "cache" / "ctclip").glob("demo-*/"))
    h5 = next(demo.glob("*.h5"))
    labels = pd.read_csv(demo / "ct_rate/valid_predicted_labels.csv")
    labels.iloc[::2].to_csv(tmp_path / "val.csv", index=False)
    labels.iloc[1::2].to_csv(tmp_path / "test.csv", index=False)
    ckpt = trained_run / "checkpoints"

    # the run directory is its best checkpoint: the same predictions as that file
    best = next(ckpt.glob("model_*.pt"))
    for source, name in ((trained_run, "run"), (best, "best")):
        argv = _eval_argv(source, h5, tmp_path / "val.csv", tmp_path / name)
        assert cli.evaluate(argv) == 0
    pt, run = (pd.read_csv(tmp_path / n / "zero_shot_predictions.csv") for n in ("best", "run"))
    pd.testing.assert_frame_equal(pt, run)

    out = tmp_path / "tuned"
    argv = _eval_argv(trained_run, h5, tmp_path / "test.csv", out)
    assert cli.evaluate([*argv, "--val-labels", str(tmp_path / "val.csv")]) == 0
    val_labels = labels.iloc[::2][list(FINDINGS)].to_numpy()
    expected, _ = choose_thresholds(pt[list(FINDINGS)].to_numpy(), val_labels)
    report = json.loads((out / "zero_shot_metrics.json").read_text())
    got = [row["threshold"] for row in report["per_finding"]]
    assert got == pytest.approx(expected.tolist())
    assert report["thresholds_from"] == str(tmp_path / "val.csv")

    # validation volumes that are also test volumes are refused
    same = cli.evaluate([*argv, "--val-labels", str(tmp_path / "test.csv")])
    assert same == 2


def test_eval_refuses_a_weights_file_and_a_folder_without_checkpoints(tmp_path, capsys):
    from medcore.weights.checkpoint import export_safetensors

    export_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    code = cli.evaluate(_eval_argv(tmp_path / "w.safetensors", tmp_path, tmp_path, tmp_path / "e"))
    assert code == 2 and "unlabelled checkpoint, not ctclip.CTCLIP" in _one_error_line(capsys)
    (tmp_path / "run").mkdir()
    code = cli.evaluate(_eval_argv(tmp_path / "run", tmp_path, tmp_path, tmp_path / "e"))
    assert code == 2 and "holds no ctclip checkpoint" in _one_error_line(capsys)


def test_checkpoints_record_the_normalisation_eval_uses(trained_run):
    from ctclip.evaluate import load_model

    final = load_checkpoint(trained_run / "checkpoints/final.pt", kind="ctclip.CTCLIP")
    with torch.device("meta"):
        cfg = timm.create_model("vit_small_patch14_dinov2", pretrained=False).pretrained_cfg
    assert final["model_config"]["mean"] == pytest.approx(cfg["mean"])
    assert final["model_config"]["std"] == pytest.approx(cfg["std"])
    for source in (trained_run / "checkpoints" / "final.pt", trained_run):
        model, _ = load_model(source, torch.device("cpu"))
        assert model.visual.normalization()["mean"] == pytest.approx(cfg["mean"])


def test_devices_2_on_cpu_trains_two_ranks_with_use_ddp(tiny_demo, tiny_sets, tmp_path):
    """``--devices 2 --device cpu``: the command starts its second rank itself (gloo); the
    original ``--use-ddp`` flag is satisfied by it."""
    run = tmp_path / "run"
    argv = ["--data-dir", str(tiny_demo), "--output-dir", str(run), "--smoke", "--use-ddp"]
    argv += ["--devices", "2", "--device", "cpu", "--no-do-validate", *tiny_sets]
    argv += ["--set", "num_threads=1", "--set", "trainer.num_workers=0"]
    assert cli.train(argv) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "start")["world_size"] == 2
    assert (run / "checkpoints/final.pt").is_file()
