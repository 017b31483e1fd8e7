"""The commands end to end on the (small, cached) synthetic demo data, and their user errors."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cxrlandmarks.cli import evaluate, predict, train
from cxrlandmarks.data import HEADED_COLUMNS
from medcore.testing import call_main
from medcore.weights.checkpoint import load_checkpoint

TINY = ["--smoke", "--set", "data.image_size=32", "--device", "cpu"]
CHECKPOINTS = ("phase1_best.pt", "phase2_best.pt", "geometric_symmetry.pt", "geometric_complete.pt")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, write_original_checkpoint) -> Path:
    """One `--phase all` smoke run shared by the eval / predict tests; its phase 1 starts from
    a checkpoint of the original code (`--init-from` is honoured for `all`)."""
    root = tmp_path_factory.mktemp("cxr")
    original = root / "original.pt"
    write_original_checkpoint(original)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(root / "cache"))
        argv = [*TINY, "--output-dir", str(root / "run"), "--init-from", str(original)]
        assert train(argv) == 0
    return root / "run"


def test_train_all_chains_the_four_phases(demo_run):
    for name in CHECKPOINTS:
        assert (demo_run / "checkpoints" / name).is_file()
    # One weights-only copy per set of weights: no safetensors twin of the last phase's best
    # (cxrlandmarks-export writes the shareable one).
    assert not list(demo_run.rglob("*.safetensors"))
    for name in (
        "config.yaml",
        "splits.json",
        "metrics.json",
        "metrics.jsonl",
        "eval/metrics.json",
        "eval/per_landmark.csv",
        "eval/per_category.csv",
        "eval/per_image.csv",
        "eval/test_grid.png",
        "eval/phase_comparison.csv",
        "plots/phase2_val_px.png",
        "phase4/checkpoints/final.pt",
    ):
        assert (demo_run / name).exists(), name
    # A finished phase keeps no resume checkpoint: a resumed run skips it.
    assert not list(demo_run.glob("phase*/checkpoints/latest.pt"))
    assert any((demo_run / "tb").iterdir())
    states = [
        load_checkpoint(demo_run / "checkpoints" / n, kind="cxrlandmarks.ResNetLandmarkRegressor")
        for n in CHECKPOINTS
    ]
    original = demo_run.parent / "original.pt"
    assert states[0]["init_from"] == str(original)
    assert "original code's model_state_dict" in states[0]["init"]
    # Phase 1 trains the head only: its trunk is the original checkpoint's, tensor for tensor.
    trunk = torch.load(original, weights_only=True)["model_state_dict"]["backbone.0.weight"]
    assert torch.equal(states[0]["model"]["backbone.conv1.weight"], trunk)
    for prev, state in zip(CHECKPOINTS, states[1:], strict=False):
        assert state["init_from"].endswith(prev)  # each phase starts from the previous best
    assert [s["loss"] for s in states] == ["wing", "wing", "symmetry", "complete"]
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"phase1", "phase2", "phase3", "phase4"}
    assert metrics["mean_px"] > 0
    table = pd.read_csv(demo_run / "eval" / "phase_comparison.csv")
    assert len(table) == 4 and {"mean_px", "<8.5px", "sym_px", "dist_px"} <= set(table.columns)


def test_single_phases_and_missing_previous_phase(
    tmp_path, monkeypatch, capsys, write_original_checkpoint
):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code, _, err = call_main(
        train, [*TINY, "--phase", "3", "--output-dir", str(tmp_path / "other")], capsys
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "error: --phase 3: starts from phase2"
    )
    assert train([*TINY, "--phase", "1", "--output-dir", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["phase1_best.pt"]
    assert train([*TINY, "--phase", "2", "--output-dir", str(run)]) == 0
    state = load_checkpoint(run / "checkpoints" / "phase2_best.pt")
    assert state["init_from"] == str(run / "checkpoints" / "phase1_best.pt")
    # --phase 1 honours --init-from (ours or the original code's checkpoint).
    original = write_original_checkpoint(tmp_path / "original.pt")
    argv = [*TINY, "--phase", "1", "--output-dir", str(tmp_path / "p1")]
    assert train([*argv, "--init-from", str(tmp_path / "original.pt")]) == 0
    state = load_checkpoint(tmp_path / "p1" / "checkpoints" / "phase1_best.pt")
    assert state["init_from"] == str(tmp_path / "original.pt")
    conv = state["model"]["backbone.layer4.1.conv2.weight"]
    assert torch.equal(conv, original.backbone[7][1].conv2.weight.detach())


def test_resume_latest_skips_finished_phases(demo_run, capsys):
    code, out, _ = call_main(
        train, [*TINY, "--resume", "latest", "--output-dir", str(demo_run)], capsys
    )
    assert code == 0
    assert out.count("already finished in this run") == 4


def test_eval_command_compares_phases(demo_run, capsys, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, _ = call_main(
        evaluate,
        ["--run-dir", str(demo_run), "--output-dir", str(out_dir), "--device", "cpu", "--tta-flip"],
        capsys,
    )
    assert code == 0
    assert all(name in out for name in CHECKPOINTS)
    rows = json.loads((out_dir / "phase_comparison.json").read_text())
    assert [r["model"] for r in rows] == list(CHECKPOINTS)
    report = json.loads((out_dir / "geometric_complete" / "metrics.json").read_text())
    splits = json.loads((demo_run / "splits.json").read_text())
    assert report["n_images"] == len(splits["splits"]["test"])
    assert report["tta_flip"] is True and len(report["per_landmark_px224"]) == 15
    assert (out_dir / "geometric_complete" / "test_grid.png").is_file()


def test_predict_folder_with_ensemble_tta_and_a_corrupt_image(demo_run, tmp_path, capsys):
    cache_images = sorted((demo_run.parent / "cache").rglob("*.png"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in cache_images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    ckpts = demo_run / "checkpoints"
    code, _, err = call_main(
        predict,
        [
            str(folder),
            "--checkpoint",
            str(ckpts / "geometric_complete.pt"),
            "--checkpoint",
            str(ckpts / "geometric_symmetry.pt"),
            "--tta-flip",
            "--output-dir",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0
    assert "skipped" in err and "broken.png" in err
    frame = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(frame) == 3 and list(frame.columns) == ["image_name", "image_path", *HEADED_COLUMNS]
    assert sorted(frame["image_name"]) == sorted(p.stem for p in cache_images)
    coords = frame[HEADED_COLUMNS].to_numpy()
    assert (coords >= 0).all() and (coords <= 299).all()  # pixels of the 299 x 299 originals
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["tta_flip"] is True


@pytest.mark.faults
def test_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    cases = [
        (train, [*TINY, "--data-dir", str(tmp_path / "nope")], "data directory not found"),
        (train, [*TINY, "--set", "model.depth=3"], "unknown config key"),
        (evaluate, ["--checkpoint", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (
            predict,
            [str(tmp_path / "none.png"), "--checkpoint", str(tmp_path / "x.pt")],
            "x.pt: not found (expected a run directory, a checkpoint, an exported model folder",
        ),
    ]
    bad = tmp_path / "bad"
    (bad / "dataset").mkdir(parents=True)
    (bad / "coordenadas").mkdir()
    (bad / "coordenadas" / "coordenadas_maestro.csv").write_text(
        "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,x\n"
    )
    cases.append(
        (
            train,
            # --data-dir alone is the paper config: --from-scratch gets past its weights check.
            [*TINY, "--data-dir", str(bad), "--output-dir", str(tmp_path / "r"), "--from-scratch"],
            "expected 32 columns",
        )
    )
    for main, argv, message in cases:
        code, _, err = call_main(main, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
