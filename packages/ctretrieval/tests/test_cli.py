"""The commands end to end on the tiny demo (--smoke), and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from ctretrieval.cli import evaluate, index, search, train
from medcore.testing import call_main, skip_if_no_cuda


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def microf1_run(cache_dir: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "microf1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(cache_dir))
        assert (
            train(["--smoke", "--mode", "microf1", "--output-dir", str(run), "--device", "cpu"])
            == 0
        )
    return run


def _one_line_error(code: int, err: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err


def test_train_microf1_smoke_writes_the_run(microf1_run: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "splits.json",
        "test_metrics.csv",
        "checkpoints/final.pt",
        "plots/test_roc.png",
    ):
        assert (microf1_run / name).is_file(), name
    assert any((microf1_run / "tb").iterdir())
    best = list((microf1_run / "checkpoints").glob("microf1_*_epoch=000_metric=*.pt"))
    assert len(best) == 1
    # One weights-only copy per set of weights: the best .pt is the tested model, no export.
    assert not list((microf1_run / "checkpoints").glob("*.safetensors"))
    summary = json.loads((microf1_run / "metrics.json").read_text())
    assert (
        summary["mode"] == "microf1"
        and "map@1" in summary["test"]
        and "micro_f1" in summary["test"]
    )
    assert set(summary["random"]) <= set(summary["test"])
    state = torch.load(microf1_run / "checkpoints" / "final.pt", weights_only=True)
    assert (
        state["kind"] == "ctretrieval.Proximity100x100"
        and state["model_config"]["num_classes"] == 4
    )


def test_train_triplet_smoke(cache_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(cache_dir))
    code, out, _ = call_main(
        train,
        [
            "--smoke",
            "--mode",
            "triplet",
            "--output-dir",
            str(tmp_path / "r"),
            "--set",
            "loss.mining=semihard",
        ],
        capsys,
    )
    assert code == 0 and "triplet mode" in out and "map@1" in out
    state = torch.load(tmp_path / "r" / "checkpoints" / "final.pt", weights_only=True)
    assert state["model_config"]["num_classes"] == 0 and state["mode"] == "triplet"
    records = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("train/triplets" in r for r in records)


def test_eval_command(microf1_run: Path, cache_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(cache_dir))
    ckpt = microf1_run / "checkpoints" / "final.pt"
    code, out, _ = call_main(evaluate, ["--checkpoint", str(ckpt), "--split", "test"], capsys)
    assert code == 0 and "ndcg@1" in out
    result = json.loads((microf1_run / "eval_test" / "metrics.json").read_text())
    train_summary = json.loads((microf1_run / "metrics.json").read_text())
    if train_summary["checkpoint"] == str(ckpt):
        assert result["metrics"]["map@1"] == pytest.approx(train_summary["test"]["map@1"])
    assert result["n_queries"] == train_summary["n_test"]


def test_index_and_search(
    microf1_run: Path, cache_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(cache_dir))
    ckpt = microf1_run / "checkpoints" / "final.pt"
    code, out, _ = call_main(
        index, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "idx.npz")], capsys
    )
    assert code == 0 and "indexed 24 studies" in out
    code, out, _ = call_main(
        search,
        [
            "--index",
            str(tmp_path / "idx.npz"),
            "--query",
            "demo_003",
            "--top-k",
            "5",
            "--output",
            str(tmp_path / "res.csv"),
        ],
        capsys,
    )
    assert code == 0
    rows = pd.read_csv(tmp_path / "res.csv")
    assert len(rows) == 5 and "demo_003" not in rows["id"].tolist()
    assert rows["similarity"].is_monotonic_decreasing
    result = json.loads((tmp_path / "res.json").read_text())
    for row in result["results"]:
        shared = set(filter(None, row["shared_findings"].split(";")))
        assert shared == set(filter(None, row["findings"].split(";"))) & set(
            result["query_findings"]
        )
    # A raw study as the query: a DICOM folder of the demo archive.
    raw = cache_dir / "ctretrieval" / "demo-v2-n24-s24" / "dicom" / "demo_003"
    code, out, _ = call_main(
        search,
        [
            "--index",
            str(tmp_path / "idx.npz"),
            "--query",
            str(raw),
            "--top-k",
            "3",
            "--output",
            str(tmp_path / "raw.csv"),
        ],
        capsys,
    )
    assert code == 0
    top = pd.read_csv(tmp_path / "raw.csv")
    assert top["id"].iloc[0] == "demo_003" and top["similarity"].iloc[0] == pytest.approx(
        1.0, abs=1e-4
    )


@pytest.mark.faults
def test_bad_inputs_are_one_line_errors(
    microf1_run: Path, tmp_path: Path, small_dataset: Path, capsys
) -> None:
    _one_line_error(*call_main(train, ["--data-dir", str(tmp_path / "nope")], capsys)[::2])
    _one_line_error(
        *call_main(
            train, ["--set", "model.nonsense=1", "--output-dir", str(tmp_path / "r")], capsys
        )[::2]
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "volumes.h5").write_bytes((small_dataset / "volumes.h5").read_bytes())
    pd.DataFrame(
        {"CT": ["x1", "x2"], "condensacion": [1, 0], "nodulos": [0, 0], "quistes": [0, 1]}
    ).to_csv(bad / "labels.csv", index=False)
    code, _, err = call_main(
        train, ["--data-dir", str(bad), "--output-dir", str(tmp_path / "r2"), "--smoke"], capsys
    )
    _one_line_error(code, err)
    assert "no study id in common" in err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    _one_line_error(*call_main(evaluate, ["--checkpoint", str(tmp_path / "other.pt")], capsys)[::2])
    (tmp_path / "idx.npz").write_bytes(b"junk")
    _one_line_error(
        *call_main(search, ["--index", str(tmp_path / "idx.npz"), "--query", "a"], capsys)[::2]
    )


def test_train_on_real_layout_data_dir(small_dataset: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = call_main(
        train,
        [
            "--data-dir",
            str(small_dataset),
            "--output-dir",
            str(tmp_path / "r"),
            "--smoke",
            "--device",
            "cpu",
            "--set",
            "model.num_slices=6",
            "--set",
            "model.image_size=[32,32]",
            "--set",
            "model.embedding_size=16",
            "--set",
            "trainer.batch_size=4",
        ],
        capsys,
    )
    assert code == 0 and "queries ranked against" in out


@pytest.mark.gpu
@skip_if_no_cuda
def test_cuda_training_step_with_amp(tmp_path: Path, small_dataset: Path, capsys) -> None:
    code, _, _ = call_main(
        train,
        [
            "--data-dir",
            str(small_dataset),
            "--output-dir",
            str(tmp_path / "r"),
            "--smoke",
            "--device",
            "cuda",
            "--set",
            "model.num_slices=6",
            "--set",
            "model.image_size=[32,32]",
            "--set",
            "trainer.amp=true",
        ],
        capsys,
    )
    assert code == 0
    records = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    start = next(r for r in records if r.get("event") == "start")
    assert start["amp"] in ("bf16", "fp16")
    assert all(r["train/loss"] is not None for r in records if "train/loss" in r)
