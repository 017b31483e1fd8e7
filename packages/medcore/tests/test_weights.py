"""The weights resolver, layout conversion and load reports (offline: a fake HF cache on disk)."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from medcore.cli.command import run_cli
from medcore.errors import CheckpointError, UserError
from medcore.testing import hub_snapshot
from medcore.weights.checkpoint import export_safetensors
from medcore.weights.keys import hf_dinov2_to_timm, timm_to_hf_dinov2
from medcore.weights.normalization import data_config
from medcore.weights.pretrained import (
    OPEN_CLIP_FILES,
    load_pretrained,
    require_pretrained,
    resolve_weights,
)

REV = "0123456789abcdef0123456789abcdef01234567"


def _tiny_resnet() -> torch.nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=0)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _fake_hub_cache(home: Path, repo: str, files: dict[str, bytes], rev: str = REV) -> Path:
    return hub_snapshot(home, repo, files, rev)


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _safetensors_bytes(tmp_path: Path, state: dict) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path.read_bytes()


def test_hub_name_from_the_cache_offline(tmp_path, offline_home, capsys) -> None:
    torch.manual_seed(0)
    source = _tiny_resnet()
    config = {"architecture": "resnet10t", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    snap = _fake_hub_cache(
        offline_home,
        "timm/resnet10t.tiny",
        {
            "model.safetensors": _safetensors_bytes(tmp_path, source.state_dict()),
            "config.json": json.dumps(config).encode(),
        },
    )
    for spec in ("hf-hub:timm/resnet10t.tiny", f"hf-hub:timm/resnet10t.tiny@{REV}", str(snap)):
        resolved = resolve_weights(spec)
        assert resolved.path.resolve() == (snap / "model.safetensors").resolve()
        assert resolved.config == config and resolved.source == spec
        target = _tiny_resnet()
        report = load_pretrained(target, spec)
        assert report.matched == report.total == len(source.state_dict())
        assert not report.missing and not report.unexpected and not report.new
        _assert_same(target, source)
        line = capsys.readouterr().out.strip()
        assert line == (
            f"loaded backbone weights from {spec}: {report.total}/{report.total} tensors matched, "
            "0 new, 0 missing, 0 unexpected"
        )
    assert data_config(weights_config=resolved.config, model=_tiny_resnet())["mean"] == (0.5,) * 3


def test_hub_errors_offline_are_one_line(tmp_path, offline_home) -> None:
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*hf download timm/x"):
        resolve_weights("hf-hub:timm/x")
    _fake_hub_cache(offline_home, "timm/y", {"config.json": b"{}"})
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        resolve_weights("hf-hub:timm/y")
    with pytest.raises(CheckpointError, match="at revision deadbeef"):
        resolve_weights("hf-hub:timm/y@deadbeef")
    with pytest.raises(UserError, match="expected hf-hub:ORG/NAME"):
        resolve_weights("hf-hub:justaname")


def test_hub_name_online_but_unreachable(offline_home, monkeypatch) -> None:
    import huggingface_hub.constants

    # Nothing may be fetched in tests: the library itself stays offline, our check says online.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(
        CheckpointError, match="cannot be reached and the weights are not in the cache"
    ):
        resolve_weights("hf-hub:timm/x")


def test_local_dir_single_file_and_missing_things(tmp_path) -> None:
    source = _tiny_resnet()
    local = tmp_path / "local"
    local.mkdir()
    torch.save(source.state_dict(), local / "pytorch_model.bin")
    (local / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
                "size": {"shortest_edge": 256},
                "crop_size": {"height": 224, "width": 224},
                "resample": 3,
            }
        )
    )
    resolved = resolve_weights(local)
    assert resolved.path == local / "pytorch_model.bin"
    (local / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert resolve_weights(local).path == local / "pytorch_model.bin"
    assert resolve_weights(local, files=OPEN_CLIP_FILES).path.name == "open_clip_pytorch_model.bin"
    (local / "open_clip_pytorch_model.bin").unlink()
    cfg = data_config(weights_config=resolved.config)
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == pytest.approx(0.875)
    assert cfg["interpolation"] == "bicubic"
    target = _tiny_resnet()
    load_pretrained(target, local)
    _assert_same(target, source)

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_weights(tmp_path / "nope.pth")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match=r"no weights file.*model\.safetensors, pytorch_model\.bin"
    ):
        resolve_weights(empty)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_pretrained(_tiny_resnet(), tmp_path / "bad.pth")


def test_exported_final_safetensors_and_its_metadata(tmp_path, capsys) -> None:
    """A medcore export of a whole model loads into the part of it that is named."""
    source = torch.nn.ModuleDict({"backbone": _tiny_resnet(), "head": torch.nn.Linear(512, 3)})
    run = tmp_path / "run" / "checkpoints"
    export_safetensors(source.state_dict(), run / "final.safetensors", metadata={"kind": "x.Y"})
    target = _tiny_resnet()
    report = load_pretrained(target, run)  # the directory: its one weights file
    assert report.metadata == {"kind": "x.Y"} and report.prefix == "backbone."
    assert report.matched == report.total and not report.unexpected
    _assert_same(target, source["backbone"])
    assert "(stripped prefix 'backbone.', 2 tensors outside it left out)" in capsys.readouterr().out
    head = torch.nn.Linear(512, 3)
    report = load_pretrained(head, run / "final.safetensors", what="head")  # the file itself
    assert report.prefix == "head." and torch.equal(head.weight, source["head"].weight)


def test_torchvision_resnet18_into_timm_resnet18(tmp_path) -> None:
    tv = torchvision.models.resnet18(weights=None)
    for m in tv.modules():  # non-default statistics, so that a skipped buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
    report = load_pretrained(trunk, tmp_path / "resnet18.pth")
    assert report.matched == report.total and report.unexpected == ["fc.bias", "fc.weight"]
    tv_state = tv.state_dict()
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, tv_state[k]), k
    # The same file into a model with a head for other classes: the head is declared new.
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    report = load_pretrained(model, tmp_path / "resnet18.pth", new=["fc.*"], what="model")
    assert report.new == ["fc.weight", "fc.bias"] and not report.missing
    with pytest.raises(
        CheckpointError,
        match=r"2 have another shape \(fc\.weight, fc\.bias; fc\.weight: file \(1000, 512\), backbone \(7, 512\)\)",
    ):
        load_pretrained(model, tmp_path / "resnet18.pth")


def _tiny_dinov2(**kw) -> torch.nn.Module:
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=0, depth=2, **kw
    )


def _hf_dinov2_keys(depth: int, registers: bool) -> set[str]:
    """The state-dict keys of transformers' Dinov2Model / Dinov2WithRegistersModel."""
    keys = {
        "embeddings.cls_token",
        "embeddings.mask_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    } | ({"embeddings.register_tokens"} if registers else set())
    layer = [
        "norm1.weight",
        "norm1.bias",
        "attention.attention.query.weight",
        "attention.attention.query.bias",
        "attention.attention.key.weight",
        "attention.attention.key.bias",
        "attention.attention.value.weight",
        "attention.attention.value.bias",
        "attention.output.dense.weight",
        "attention.output.dense.bias",
        "layer_scale1.lambda1",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "layer_scale2.lambda1",
    ]
    return keys | {f"encoder.layer.{i}.{k}" for i in range(depth) for k in layer}


def test_hf_dinov2_swiglu_giant_layout() -> None:
    """ViT-g's SwiGLU MLP: HF ``mlp.weights_in``/``weights_out`` are timm's packed fc1/fc2."""
    source = timm.create_model(
        "vit_giant_patch14_dinov2",
        pretrained=False,
        img_size=28,
        num_classes=0,
        depth=1,
        embed_dim=48,  # SwiGLU's packed hidden size (48 * 16 / 3 = 256) must be even
        num_heads=2,
    )
    state = source.state_dict()
    hf = {
        k.replace("mlp.fc1", "mlp.weights_in").replace("mlp.fc2", "mlp.weights_out"): v
        for k, v in timm_to_hf_dinov2(state).items()
    }
    assert "encoder.layer.0.mlp.weights_in.weight" in hf
    back = hf_dinov2_to_timm(hf)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_hf_transformers_dinov2_round_trip_and_load(tmp_path, name) -> None:
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, img_size=28, num_classes=0, depth=2)
    state = source.state_dict()
    hf = timm_to_hf_dinov2(state)
    assert set(hf) == _hf_dinov2_keys(depth=2, registers="reg4" in name)
    back = hf_dinov2_to_timm(hf)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    # A Dinov2ForImageClassification file: "dinov2." prefix and a classifier.
    wrapped = {f"dinov2.{k}": v for k, v in hf.items()}
    wrapped["classifier.weight"] = torch.zeros(2, 768)
    save_file({k: v.contiguous() for k, v in wrapped.items()}, str(tmp_path / "model.safetensors"))
    target = timm.create_model(name, pretrained=False, img_size=28, num_classes=0, depth=2)
    report = load_pretrained(target, tmp_path)
    assert report.matched == report.total and report.prefix == "dinov2."
    assert report.outside == 1 and not report.unexpected  # the classifier: not the backbone's
    _assert_same(target, source)


def test_torch_hub_dinov2_and_dino_teacher_wrapper(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, num_classes=0, depth=2
    )
    state = source.state_dict()
    # torch.hub layout: cls position inside pos_embed, register_tokens, mask_token.
    hub = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub["register_tokens"] = state["reg_token"]
    hub["mask_token"] = torch.zeros(1, 384)
    cls_pos = torch.randn(1, 1, 384)
    hub["cls_token"] = state["cls_token"] - cls_pos
    hub["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    teacher = {f"backbone.{k}": v for k, v in hub.items()}
    teacher["head.last_layer.weight"] = torch.zeros(8, 384)
    torch.save({"teacher": teacher, "student": {}}, tmp_path / "dino.pth")
    target = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, num_classes=0, depth=2
    )
    report = load_pretrained(target, tmp_path / "dino.pth")
    assert report.matched == report.total and report.prefix == "backbone."
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=1e-6)


def test_partial_and_foreign_files_are_one_line_errors(tmp_path, offline_home, capsys) -> None:
    source = _tiny_resnet().state_dict()
    partial = {k: v for k, v in source.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(
        CheckpointError, match=r"partial weights for the backbone: .*layer4\.0"
    ) as e:
        load_pretrained(_tiny_resnet(), tmp_path / "partial.pt")
    assert "\n" not in str(e.value)
    torch.save(_tiny_dinov2().state_dict(), tmp_path / "vit.pt")
    resnet = _tiny_resnet()
    with pytest.raises(
        CheckpointError,
        match=r"wrong architecture: the file looks like a ViT \(depth 2, width 384\); 0 of the "
        r"backbone's 70 tensors match, 70 are missing \(conv1\.0\.weight",
    ) as e:
        load_pretrained(resnet, tmp_path / "vit.pt")
    assert "\n" not in str(e.value)

    (tmp_path / "empty").mkdir()
    for spec_main in (
        lambda: load_pretrained(resnet, tmp_path / "vit.pt"),
        lambda: load_pretrained(resnet, tmp_path / "partial.pt"),
        lambda: load_pretrained(resnet, tmp_path / "missing.pt"),
        lambda: resolve_weights("hf-hub:timm/not-cached"),
        lambda: resolve_weights(tmp_path),  # a directory with several files, none standard
        lambda: resolve_weights(tmp_path / "empty"),  # no weights file at all
        lambda: require_pretrained(True, None, "model.pretrained", "see the README"),
    ):
        capsys.readouterr()
        assert run_cli(spec_main) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_meta_module_is_refused(tmp_path) -> None:
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with torch.device("meta"):
        lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta device"):
        load_pretrained(lin, tmp_path / "w.pt")


def test_require_pretrained() -> None:
    require_pretrained(False, None, "model.pretrained", "")
    require_pretrained(True, "w.pt", "model.pretrained", "")
    with pytest.raises(
        UserError, match=r"--pretrained-weights FILE\|DIR\|hf-hub:ORG/NAME.*--from-scratch.*Hint"
    ):
        require_pretrained(True, None, "model.pretrained", "Hint.")


def test_data_config_from_timm_pretrained_cfgs() -> None:
    with torch.device("meta"):
        vit = timm.create_model("vit_large_patch16_224.augreg_in21k_ft_in1k", pretrained=False)
        resnet = timm.create_model("resnet18", pretrained=False)
    cfg = data_config(vit)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 224, 224)
    cfg = data_config(resnet)
    assert cfg["mean"] == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert cfg["std"] == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)
    assert data_config(pretrained_cfg=dict(vit.pretrained_cfg)) == data_config(vit)
    with pytest.raises(ValueError, match="no timm pretrained_cfg"):
        data_config(torchvision.models.resnet18(weights=None))
