"""Pretrained weights from the Hugging Face cache (offline), their input normalisation carried
from the weights' config to the checkpoint and to predict; ``--devices 2`` on CPU."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from cxrlandmarks.cli import predict, train
from cxrlandmarks.data import HEADED_COLUMNS, image_tensor, resize_and_normalise
from cxrlandmarks.model import input_normalisation, load_model
from medcore.testing import call_main, hub_snapshot
from medcore.weights.checkpoint import load_checkpoint

REPO = "timm/resnet18.a1_in1k"
REV = "0123456789abcdef0123456789abcdef01234567"
TINY = ["--smoke", "--set", "data.image_size=32", "--device", "cpu", "--config", "default"]


def fake_hub_snapshot(home: Path, tmp: Path) -> torch.nn.Module:
    """A timm ResNet-18 in the hub cache layout, its config.json asking for mean = std = 0.5."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp / "w.st"))
    config = {"architecture": "resnet18", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    files = {
        "model.safetensors": (tmp / "w.st").read_bytes(),
        "config.json": json.dumps(config).encode(),
    }
    hub_snapshot(home, REPO, files, REV)
    return source


def test_default_normalisation_is_timms_config_of_torchvision_weights():
    norm = input_normalisation()
    cfg = timm.models.get_pretrained_cfg("resnet18.tv_in1k")
    assert norm["mean"] == pytest.approx(list(cfg.mean)) and norm["std"] == pytest.approx(
        list(cfg.std)
    )


def test_hub_weights_offline_normalisation_recorded_and_used_by_predict(
    tmp_path, monkeypatch, capsys
):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    source = fake_hub_snapshot(home, tmp_path)
    run = tmp_path / "run"
    argv = [
        *TINY,
        "--phase",
        "1",
        "--output-dir",
        str(run),
        "--pretrained-weights",
        f"hf-hub:{REPO}",
    ]
    code, out, err = call_main(train, argv, capsys)
    assert code == 0, err
    n = len(source.state_dict()) - 2  # every tensor but the classifier's
    assert f"loaded ResNet-18 trunk weights from hf-hub:{REPO}: {n}/{n} tensors matched" in out
    assert f"init=pretrained trunk from hf-hub:{REPO}" in out
    state = load_checkpoint(run / "checkpoints" / "phase1_best.pt")
    assert state["input_norm"]["mean"] == [0.5] * 3 and state["input_norm"]["std"] == [0.5] * 3
    # Phase 1 freezes the trunk: it is the hub file's, tensor for tensor.
    assert torch.equal(state["model"]["backbone.conv1.weight"], source.conv1.weight)

    # predict normalises with the checkpoint's 0.5 / 0.5, not ImageNet's.
    image = sorted((tmp_path / "cache").rglob("*.png"))[0]
    ckpt = run / "checkpoints" / "phase1_best.pt"
    code, _, err = call_main(
        predict, [str(image), "--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "p"),
                  "--device", "cpu", "--no-overlays"], capsys,
    )  # fmt: skip
    assert code == 0, err
    got = pd.read_csv(tmp_path / "p" / "predictions.csv")[HEADED_COLUMNS].iloc[0].to_numpy(float)
    model, _ = load_model(ckpt, torch.device("cpu"))
    img = image_tensor(image)

    def expected(norm):
        x, _ = resize_and_normalise(img, torch.zeros(1, 2), 32, norm)
        with torch.no_grad():
            return (
                model(x[None])[0].reshape(15, 2).numpy() * [img.shape[-1], img.shape[-2]]
            ).ravel()

    np.testing.assert_allclose(got, expected(state["input_norm"]), atol=0.05)
    assert np.abs(got - expected(input_normalisation())).max() > 0.05


def test_devices_2_on_cpu_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code, _, err = call_main(train, [*TINY, "--devices", "2", "--output-dir", str(run)], capsys)
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    for phase in ("phase1", "phase4"):
        lines = (run / phase / "metrics.jsonl").read_text().splitlines()
        start = next(json.loads(x) for x in lines if '"event": "start"' in x)
        assert start["world_size"] == 2
