"""The text tower follows its weights' activation (QuickGELU or GELU), checked against open_clip.

open_clip itself builds and saves the reference models: a tiny CLIP written the way open_clip
hub repositories are (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` +
``open_clip_model.safetensors``), reloaded by ``open_clip.create_model("local-dir:...")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.push_to_hf_hub import save_config_for_hf

from ctclip import cli
from ctclip.config import CTClipConfig
from ctclip.model import build_model, checkpoint_config
from medcore.errors import ConfigError
from medcore.testing import hub_snapshot
from medcore.weights.checkpoint import load_checkpoint

# The tiny config's text tower (tests/conftest.py): 32 wide, 2 heads, 1 layer, 32 tokens.
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def open_clip_model(quick_gelu: bool, seed: int = 1) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP of ``MODEL_CFG``."""
    from dataclasses import asdict

    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**MODEL_CFG, quick_gelu=quick_gelu).eval()
    set_model_preprocess_cfg(model, asdict(PreprocessCfg()))  # as open_clip.create_model does
    return model


def save_like_the_hub(model: torch.nn.Module, folder: Path, quick_gelu: bool | None) -> Path:
    """``folder`` as ``open_clip.push_to_hf_hub`` writes a repository (config, .bin and
    .safetensors); ``quick_gelu=None`` leaves the key out of the config, as older repos do."""
    folder.mkdir(parents=True)
    model_cfg = dict(MODEL_CFG)
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    save_config_for_hf(model, folder / HF_CONFIG_NAME, model_config=model_cfg)
    state = model.state_dict()
    torch.save(state, folder / HF_WEIGHTS_NAME)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / HF_SAFE_WEIGHTS_NAME)
    )
    return folder


@pytest.fixture
def tokens() -> torch.Tensor:
    from ctclip.text import Tokenizer

    texts = ["A 12 mm nodule is noted in the right lung.", "No pleural effusion.", "Cardiomegaly."]
    return Tokenizer(context_length=32)(texts)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_features_equal_open_clip_for_a_hub_layout_folder(
    quick_gelu, tmp_path, tiny_cfg, tokens, capsys
):
    folder = save_like_the_hub(open_clip_model(quick_gelu), tmp_path / "repo", quick_gelu)
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        expected = reference.encode_text(tokens)
        model = build_model(CTClipConfig(model=tiny_cfg(text_weights=str(folder)))).eval()
        got = model.encode_text(tokens, normalize=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert model.text_activation.quick_gelu is quick_gelu
    assert "open_clip_config.json" in model.text_activation.source
    line = capsys.readouterr().out
    n = len(model.text.state_dict())
    assert f"{n}/{n} tensors matched" in line  # the load itself cannot tell the activations apart
    # The activation is what makes them equal: the same tensors with the other one are far off.
    other = build_model(
        CTClipConfig(model=tiny_cfg(text_quick_gelu=not quick_gelu)), load_weights=False
    )
    other.text.load_state_dict(model.text.state_dict())
    with torch.no_grad():
        assert (other.eval().encode_text(tokens, normalize=False) - expected).abs().max() > 1e-3


def test_hub_name_resolves_the_config_from_the_cache(tmp_path, tiny_cfg, tokens, offline_hub):
    folder = save_like_the_hub(open_clip_model(True), tmp_path / "repo", True)
    hub_snapshot(offline_hub, "org/tiny-clip", {p.name: p.read_bytes() for p in folder.iterdir()})
    model = build_model(CTClipConfig(model=tiny_cfg(text_weights="hf-hub:org/tiny-clip"))).eval()
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens, normalize=False),
            reference.encode_text(tokens),
            atol=1e-5,
            rtol=0,
        )
    assert model.text_activation.quick_gelu


def test_open_clip_registry_decides_for_weights_without_a_config(
    tmp_path, tiny_cfg, tokens, offline_hub
):
    """OpenAI's tags and open_clip's -quickgelu release files are QuickGELU in open_clip's
    registry: a hub repository of the openai tag and a release file name are recognised."""
    clip = open_clip_model(True)
    with torch.no_grad():
        expected = clip.encode_text(tokens)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    release = tmp_path / "vit_b_32-quickgelu-laion400m_e31-d867053b.pt"
    torch.save(state, release)
    hub_snapshot(
        offline_hub,
        "timm/vit_base_patch32_clip_224.openai",
        {HF_SAFE_WEIGHTS_NAME: safetensors.torch.save(state)},
    )
    for spec, entry in (
        (str(release), "laion400m_e31"),
        ("hf-hub:timm/vit_base_patch32_clip_224.openai", "openai"),
    ):
        model = build_model(CTClipConfig(model=tiny_cfg(text_weights=spec))).eval()
        assert model.text_activation.quick_gelu, spec
        assert "registry" in model.text_activation.source and entry in model.text_activation.source
        with torch.no_grad():
            torch.testing.assert_close(
                model.encode_text(tokens, normalize=False), expected, atol=1e-5, rtol=0
            )
    # A laion2B tag of the same architecture was trained with GELU.
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    hub_snapshot(offline_hub, repo, {HF_SAFE_WEIGHTS_NAME: safetensors.torch.save(state)})
    model = build_model(CTClipConfig(model=tiny_cfg(text_weights=f"hf-hub:{repo}")))
    assert not model.text_activation.quick_gelu
    assert "ViT-B-32:laion2b_s34b_b79k" in model.text_activation.source


def test_unknown_activation_and_contradictions_are_one_line_errors(tmp_path, tiny_cfg, tokens):
    clip = open_clip_model(True)
    bare = tmp_path / "clip_text.pt"
    torch.save(clip.state_dict(), bare)
    with pytest.raises(ConfigError, match="cannot tell whether") as err:
        build_model(CTClipConfig(model=tiny_cfg(text_weights=str(bare))))
    assert err.value.what == "model.text_quick_gelu"
    # Saying it is enough for weights nothing describes.
    model = build_model(
        CTClipConfig(model=tiny_cfg(text_weights=str(bare), text_quick_gelu=True))
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens, normalize=False), clip.encode_text(tokens), atol=1e-5, rtol=0
        )
    folder = save_like_the_hub(clip, tmp_path / "repo", True)
    with pytest.raises(ConfigError, match=r"quick_gelu: true in its open_clip_config\.json"):
        build_model(CTClipConfig(model=tiny_cfg(text_weights=str(folder), text_quick_gelu=False)))
    # A config of another text transformer is named before any tensor is compared.
    with pytest.raises(ConfigError, match=r"text_cfg.width=32") as err:
        build_model(CTClipConfig(model=tiny_cfg(text_weights=str(folder), text_width=64)))
    assert err.value.what == "model.text_width"
    config = json.loads((folder / HF_CONFIG_NAME).read_text())
    config["model_cfg"]["text_cfg"]["no_causal_mask"] = True
    (folder / HF_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no_causal_mask=True"):
        build_model(CTClipConfig(model=tiny_cfg(text_weights=str(folder))))


def test_config_without_the_key_is_gelu_as_open_clip_builds_it(tmp_path, tiny_cfg, tokens):
    folder = save_like_the_hub(open_clip_model(False), tmp_path / "repo", None)
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    model = build_model(CTClipConfig(model=tiny_cfg(text_weights=str(folder)))).eval()
    assert (
        not model.text_activation.quick_gelu
        and "sets no quick_gelu" in model.text_activation.source
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens, normalize=False),
            reference.encode_text(tokens),
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.slow
def test_train_records_the_activation_and_eval_rebuilds_it(tmp_path, tiny_sets, tokens, capsys):
    folder = save_like_the_hub(open_clip_model(True), tmp_path / "repo", True)
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDCORE_CACHE_DIR", str(cache))
    try:
        code = cli.train(
            [
                *["--smoke", "--output-dir", str(run), "--device", "cpu", *tiny_sets],
                *["--text-weights", str(folder), "--epochs", "1"],
            ]
        )
    finally:
        mp.undo()
    err = capsys.readouterr().err
    assert code == 0, err
    assert (
        "text tower from" in err
        and "QuickGELU (quick_gelu: true in its open_clip_config.json)" in err
    )
    assert "text_quick_gelu: true" in (run / "config.yaml").read_text()
    state = load_checkpoint(run / "checkpoints/final.pt", kind="ctclip.CTCLIP")
    assert state["model_config"]["text_quick_gelu"] is True
    rebuilt = build_model(checkpoint_config(state), load_weights=False)
    assert rebuilt.text_activation.quick_gelu
