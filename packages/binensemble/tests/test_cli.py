from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from binensemble.cli import analyze, predict, train, vote
from medcore.testing import call_main, skip_if_no_cuda
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint


def test_train_both_models_votes_and_scores(
    tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "run"
    code, out, err = call_main(
        train,
        tiny_args("--data-dir", str(tiny_data), "--output-dir", str(run), "--epochs", "1"),
        capsys,
    )
    assert code == 0, err
    for name in ("metric", "baseline", "vote"):
        assert name in out
    for name in ("metric", "baseline"):
        for rel in (
            "model.pt",
            "model.safetensors",
            "config.yaml",
            "metrics.json",
            "metrics.jsonl",
            "splits.json",
            "checkpoints/final.pt",
            "plots/roc_val.png",
            "plots/curves.png",
        ):
            assert (run / name / rel).is_file(), f"{name}/{rel}"
        # model.pt holds the best epoch's weights: its checkpoint is not kept beside them.
        kept = sorted(p.name for p in (run / name / "checkpoints").iterdir())
        assert kept == ["final.pt"], kept
        assert json.loads((run / name / "metrics.json").read_text())["weights"] != "final.pt"
    knn = json.loads((run / "metric" / "knn.json").read_text())
    bundle = load_checkpoint(run / "metric" / "model.pt", kind="binensemble.MetricModel")
    assert bundle["knn"]["k"] == knn["k"] and knn["k"] in (1, 3, 5)
    assert bundle["gallery"]["embeddings"].shape[1] == 16
    final = pd.read_csv(run / "predictions" / "vote.csv", dtype={"image_id": str})
    assert list(final.columns) == ["image_id", "label"] and final["image_id"].tolist() == [
        str(i) for i in range(1, 7)
    ]
    probs = pd.read_csv(run / "predictions" / "metric_probs.csv")
    assert list(probs.columns) == ["image_id", "prob_normal", "prob_disease", "target"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"metric", "baseline", "vote"} and "test/accuracy" in metrics["vote"]
    assert (run / "analysis" / "val" / "analysis.png").is_file()
    assert (run / "analysis" / "test" / "disagreements.csv").is_file()

    # Resuming a finished run retrains nothing and reproduces the predictions.
    before = (run / "predictions" / "vote_probs.csv").read_text()
    code, _, err = call_main(
        train,
        tiny_args("--data-dir", str(tiny_data), "--output-dir", str(run), "--resume", "latest"),
        capsys,
    )
    assert code == 0 and "finished before the interruption; skipped" in err
    assert (run / "predictions" / "vote_probs.csv").read_text() == before

    # The commands on the run's outputs: predict, vote, analyze.
    code, out, err = call_main(
        predict,
        [str(run / "metric"), "--split", "val", "--output-dir", str(tmp_path / "p")],
        capsys,
    )
    assert code == 0, err
    code, out, err = call_main(
        predict,
        [str(run / "baseline"), "--split", "val", "--output-dir", str(tmp_path / "p")],
        capsys,
    )
    assert code == 0, err
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "p" / "metric_val_probs.csv"),
        pd.read_csv(run / "predictions" / "metric_val_probs.csv"),
    )
    files = [str(tmp_path / "p" / f"{n}_val_probs.csv") for n in ("metric", "baseline")]
    code, out, err = call_main(
        vote, [*files, "--weights", "2", "1", "--output", str(tmp_path / "final.csv")], capsys
    )
    assert code == 0, err
    voted = pd.read_csv(tmp_path / "final_probs.csv")
    m, b = (pd.read_csv(f) for f in files)
    pd.testing.assert_series_equal(
        voted["prob_disease"], (2 * m["prob_disease"] + b["prob_disease"]) / 3, check_names=False
    )
    code, out, err = call_main(analyze, [*files, "--output-dir", str(tmp_path / "an")], capsys)
    assert code == 0, err
    assert "agreement" in out and (tmp_path / "an" / "analysis.png").is_file()
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["labelled"] is True


def test_train_one_model_then_predict_the_test_set(
    tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "base"
    code, _out, err = call_main(
        train,
        tiny_args(
            "--model",
            "baseline",
            "--data-dir",
            str(tiny_data),
            "--output-dir",
            str(run),
            "--smoke",
            "--set",
            "predict.tta=false",
        ),
        capsys,
    )
    assert code == 0, err
    # A finished model keeps its weights, not the resumable state (optimizer, RNG) of latest.pt.
    assert (run / "model.pt").is_file() and (run / "checkpoints" / "final.pt").is_file()
    assert not (run / "checkpoints" / "latest.pt").exists()
    assert not (run / "metric").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/accuracy", "test/accuracy", "best_epoch"} <= set(metrics)
    code, _out, err = call_main(predict, [str(run), "--data-dir", str(tiny_data)], capsys)
    assert code == 0, err
    labels = pd.read_csv(run / "predictions" / "baseline.csv")
    assert len(labels) == 6 and set(labels["label"]) <= {0, 1}


def test_smoke_on_the_demo_data(tmp_path: Path, capsys, tiny_args) -> None:
    code, _out, err = call_main(
        train,
        tiny_args("--smoke", "--model", "metric", "--output-dir", str(tmp_path / "r")),
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "cache" / "binensemble" / "demo-small-v2" / "TestSet_labels.csv").is_file()


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_inputs_are_one_line_errors(tiny_data: Path, tmp_path: Path, capsys, tiny_args) -> None:
    empty = tmp_path / "empty"
    shutil.copytree(tiny_data, empty)
    for f in (empty / "TrainSet" / "disease").iterdir():
        f.unlink()
    code, _, err = call_main(
        train, tiny_args("--data-dir", str(empty), "--output-dir", str(tmp_path / "r1")), capsys
    )
    assert code == 2 and "class folder has no images" in _error_line(err)

    code, _, err = call_main(
        train,
        tiny_args(
            "--data-dir",
            str(tiny_data),
            "--output-dir",
            str(tmp_path / "r2"),
            "--set",
            "model.pretrained=true",
        ),
        capsys,
    )
    assert code == 2 and "--pretrained-weights" in _error_line(err)

    code, _, err = call_main(
        train, ["--set", "model.convnext_nam=x", "--output-dir", str(tmp_path / "r3")], capsys
    )
    assert code == 2 and "model.convnext_nam" in _error_line(err)

    a = tmp_path / "a_probs.csv"
    b = tmp_path / "b_probs.csv"
    pd.DataFrame(
        {"image_id": ["1", "2"], "prob_normal": [0.4, 0.9], "prob_disease": [0.6, 0.1]}
    ).to_csv(a, index=False)
    pd.DataFrame(
        {"image_id": ["1", "3"], "prob_normal": [0.4, 0.9], "prob_disease": [0.6, 0.1]}
    ).to_csv(b, index=False)
    code, _, err = call_main(vote, [str(a), str(b), "--output", str(tmp_path / "v.csv")], capsys)
    assert code == 2 and "does not match" in _error_line(err)
    assert not (tmp_path / "v.csv").exists()
    code, _, err = call_main(
        vote, [str(a), str(a), "--weights", "1", "--output", str(tmp_path / "v.csv")], capsys
    )
    assert code == 2 and "--weights" in _error_line(err)
    code, _, err = call_main(vote, [str(a)], capsys)
    assert code == 2 and "two or more" in _error_line(err)

    fake = tmp_path / "other.pt"
    save_checkpoint({"model": {"w": torch.zeros(1)}}, fake, kind="ctclip.CTCLIP")
    code, _, err = call_main(predict, [str(fake), "--data-dir", str(tiny_data)], capsys)
    line = _error_line(err)
    assert code == 2 and "ctclip.CTCLIP" in line and "binensemble.MetricModel" in line


@pytest.mark.gpu
@skip_if_no_cuda
def test_cuda_amp_training_step(tiny_data: Path, tmp_path: Path, capsys, tiny_args) -> None:
    code, _, err = call_main(
        train,
        tiny_args(
            "--model",
            "metric",
            "--data-dir",
            str(tiny_data),
            "--device",
            "cuda",
            "--output-dir",
            str(tmp_path / "gpu"),
            "--smoke",
        ),
        capsys,
    )
    assert code == 0, err
    events = [
        json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()
    ]
    start = next(e for e in events if e["event"] == "start")
    assert start["amp"] in ("bf16", "fp16")
