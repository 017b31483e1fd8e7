"""Pretrained trunks the way users have them (a file, a hub name in the cache), reported
loads, normalisation from the weights' own config, and a 2-process run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from histommnet.cli import train
from histommnet.config import DataConfig, ModelConfig
from histommnet.model import build_model, resolve_normalization
from medcore.testing import call_main, error_line, hub_snapshot

MAGS = ["40X", "100X", "200X", "400X"]
REPO = "timm/test_efficientnet.tiny"
REV = "89abcdef0123456789abcdef0123456789abcdef"


def _timm_source() -> torch.nn.Module:
    """What a timm hub file holds: the whole classifier network, head included."""
    torch.manual_seed(3)
    return timm.create_model("test_efficientnet", pretrained=False)


def _hub_snapshot(home: Path, files: dict[str, bytes]) -> Path:
    return hub_snapshot(home, REPO, files, REV)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _timm_source()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    config = {
        "architecture": "test_efficientnet",
        "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"},
    }
    _hub_snapshot(
        home,
        {"model.safetensors": weights.read_bytes(), "config.json": json.dumps(config).encode()},
    )
    return source


def test_hub_name_loads_every_trunk_and_says_so(
    hub: torch.nn.Module, tiny_model_cfg: ModelConfig, histo_config, capsys
) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, pretrained=True, pretrained_weights=f"hf-hub:{REPO}")
    model = build_model(histo_config(cfg, MAGS))
    for trunk in model.encoder.trunks:
        for key, value in trunk.state_dict().items():
            torch.testing.assert_close(value, hub.state_dict()[key])
    trunk_tensors = len(model.encoder.trunks[0].state_dict())
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("loaded")]
    assert len(lines) == 1  # read once, copied into the 4 trunks
    assert f"from hf-hub:{REPO}" in lines[0] and "copied into 4 trunks" in lines[0]
    assert f"{trunk_tensors}/{trunk_tensors} tensors matched" in lines[0]
    assert "0 missing" in lines[0] and "2 unexpected (classifier.bias" in lines[0]
    # the weights' config.json decides the normalisation, over timm's ImageNet default
    data = resolve_normalization(cfg, DataConfig())
    assert (data.mean, data.std, data.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")
    assert timm.create_model("test_efficientnet").pretrained_cfg["mean"][0] == 0.485


def test_partial_weights_are_refused(tiny_args, tiny_tree: Path, tmp_path: Path, capsys) -> None:
    state = _timm_source().state_dict()
    del state["conv_stem.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    argv = ["--data-dir", str(tiny_tree), "--output-dir", str(tmp_path / "run")]
    code, _, err = call_main(
        train, [*argv, "--pretrained-weights", str(partial), *tiny_args()], capsys
    )
    assert code == 2
    line = error_line(err)
    assert str(partial) in line and "partial weights" in line and "conv_stem.weight" in line


def test_two_processes_on_cpu(tiny_args, tiny_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ddp"
    argv = ["--smoke", "--devices", "2", "--device", "cpu", "--data-dir", str(tiny_tree)]
    code, stdout, err = call_main(train, [*argv, "--output-dir", str(out), *tiny_args()], capsys)
    assert code == 0, err
    events = [json.loads(x) for x in (out / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2
    assert "mean ± std" in stdout and (out / "fold_0" / "result.json").is_file()
