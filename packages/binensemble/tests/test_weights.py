"""Pretrained weights per backbone (file, hub snapshot), their counts, and the normalisation the
weights expect, recorded in the checkpoint and used by predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from binensemble.cli import train
from binensemble.model import DualBackbone
from binensemble.predict import load_bundle
from medcore.testing import call_main, error_line, hub_snapshot
from medcore.weights.checkpoint import load_checkpoint

REV = "0123456789abcdef0123456789abcdef01234567"
VIT_NORM = {"mean": [0.1, 0.2, 0.3], "std": [0.6, 0.5, 0.4]}


def _hub_snapshot(home: Path, repo: str, files: dict[str, bytes]) -> Path:
    return hub_snapshot(home, repo, files, REV)


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A ConvNeXt state dict file and a ViT snapshot (with its config) in an offline hub cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    source = DualBackbone("test_convnext", "test_vit", img_size=32)
    cnn = tmp_path / "cnn" / "convnext.pt"
    cnn.parent.mkdir()
    torch.save(source.convnext.state_dict(), cnn)
    vit_file = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(vit_file))
    config = {"architecture": "test_vit", "pretrained_cfg": VIT_NORM}
    _hub_snapshot(
        tmp_path / "hf",
        "timm/test_vit.tiny",
        {"model.safetensors": vit_file.read_bytes(), "config.json": json.dumps(config).encode()},
    )
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in source.convnext.state_dict().items() if "stem" not in k}, partial)
    return {"convnext": cnn, "partial": partial, "source": source}  # type: ignore[dict-item]


def test_weights_per_backbone_with_their_normalisation(
    weights, tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "run"
    sets = [
        "model.pretrained=true",
        f"model.convnext_weights={weights['convnext']}",
        "model.vit_weights=hf-hub:timm/test_vit.tiny",
        "model.convnext_mean=null",
        "model.convnext_std=null",
        "model.vit_mean=null",
        "model.vit_std=null",
        "predict.tta=false",
    ]
    argv = ["--model", "metric", "--data-dir", str(tiny_data), "--output-dir", str(run), "--smoke"]
    code, out, err = call_main(
        train, tiny_args(*argv, *[a for s in sets for a in ("--set", s)]), capsys
    )
    assert code == 0, err
    assert f"loaded ConvNeXt backbone weights from {weights['convnext']}" in out
    assert "loaded ViT backbone weights from hf-hub:timm/test_vit.tiny" in out
    assert "0 missing" in out and "init: convnext pretrained from" in err
    saved = load_checkpoint(run / "model.pt", kind="binensemble.MetricModel")["model_config"]
    # The ViT's from its snapshot's config; the ConvNeXt file has none: timm's for test_convnext.
    assert (saved["vit_mean"], saved["vit_std"]) == (VIT_NORM["mean"], VIT_NORM["std"])
    assert saved["convnext_mean"] == pytest.approx([0.5] * 3)
    bundle = load_bundle(run, torch.device("cpu"))
    assert bundle.model.backbone.normalisation()["vit"] == VIT_NORM
    torch.testing.assert_close(
        bundle.model.backbone.vit_std.flatten(), torch.tensor(VIT_NORM["std"])
    )


def test_a_partial_backbone_file_is_refused(
    weights, tiny_data: Path, tmp_path: Path, capsys, tiny_args
) -> None:
    run = tmp_path / "run"
    sets = ["model.pretrained=true", f"model.convnext_weights={weights['partial']}"]
    sets += ["model.vit_weights=hf-hub:timm/test_vit.tiny"]
    argv = ["--model", "metric", "--data-dir", str(tiny_data), "--output-dir", str(run), "--smoke"]
    code, _, err = call_main(
        train, tiny_args(*argv, *[a for s in sets for a in ("--set", s)]), capsys
    )
    assert code == 2 and "stem" in error_line(err)
    assert not (run / "checkpoints").exists()
