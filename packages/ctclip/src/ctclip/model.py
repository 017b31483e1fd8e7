"""The 3D CT CLIP model: a DINOv2 ViT on every slice, x-transformers slice fusion, CLIP text tower.

Shape notation: ``b`` batch, ``d`` slices (depth), ``h w`` slice pixels, ``c`` feature channels,
``n`` text tokens, ``e`` joint embedding dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from open_clip.model import CLIPTextCfg, _build_text_tower
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn
from x_transformers import Encoder

from ctclip.config import CTClipConfig, ModelConfig
from medcore.config import from_dict
from medcore.errors import ConfigError, UserError
from medcore.weights.normalization import IMAGENET_MEAN, IMAGENET_STD, data_config
from medcore.weights.pretrained import (
    OPEN_CLIP_FILES,
    WEIGHT_FILES,
    ResolvedWeights,
    load_pretrained,
    require_pretrained,
    resolve_weights,
)

KIND = "ctclip.CTCLIP"  # the identity of ctclip's checkpoints and exports
# The spec's torch.hub names of DINOv2 and the timm models with the same architecture.
BACKBONES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned temperature
# Where an open_clip checkpoint's weights are looked for: the open_clip files of a hub repository
# before its HF-transformers copy.
TEXT_WEIGHT_FILES = (*OPEN_CLIP_FILES, *WEIGHT_FILES)
# open_clip_config.json text_cfg keys that ModelConfig sets, and the field that sets each.
TEXT_CFG_FIELDS = {
    "context_length": "context_length",
    "vocab_size": "vocab_size",
    "width": "text_width",
    "heads": "text_heads",
    "layers": "text_layers",
}
# text_cfg keys that do not change this tower's features: the tokenizer's, the outputs', and
# the settings of a Hugging Face text tower (hf_model_name itself is checked: ctclip has none).
TEXT_CFG_IGNORED = (
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "output_tokens",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
)


def exists(value: object) -> bool:
    return value is not None


def timm_backbone_name(name: str) -> str:
    """The timm model for a DINOv2 name (hub spelling like ``dinov2_vitb14`` or the timm name)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name in BACKBONES.values():
        return name
    valid = ", ".join([*BACKBONES, *BACKBONES.values()])
    raise ConfigError("model.dinov2_model_name", f"unknown backbone {name!r} (valid: {valid})")


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """The DINOv2 ViT for ``cfg`` (random init: weights only come from a local file)."""
    name = timm_backbone_name(cfg.dinov2_model_name)
    try:
        return timm.create_model(
            name, pretrained=False, img_size=cfg.image_size, num_classes=0, **cfg.backbone_overrides
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            "model.backbone_overrides", f"timm rejected them ({str(exc).splitlines()[0][:160]})"
        ) from None


def convert_dinov2_state(
    state: dict[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """Hub-layout DINOv2 weights (``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``, a
    518-pixel position grid) or timm-layout weights -> the keys and grid of ``backbone``.

    timm's own filter does the conversion and the position-embedding interpolation. Wrapper
    prefixes (DDP ``module.``, a DINO ``teacher`` checkpoint's ``backbone.``, a LightningModule's
    attribute) are already taken off by ``medcore.weights.pretrained.load_pretrained``.
    """
    state = {
        k: v for k, v in state.items() if not k.startswith(("head.", "dino_head.", "ibot_head."))
    }
    return checkpoint_filter_fn(state, backbone)


class VolumeEncoder(nn.Module):
    """Volume ``[b, d, h, w]`` -> ``[b, e]``: DINOv2 CLS feature of every slice, fused over slices."""

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        fusion_depth: int = 4,
        fusion_heads: int = 8,
        slice_chunk_size: int = 64,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.slice_chunk_size = slice_chunk_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.fusion = Encoder(
            dim=dim, depth=fusion_depth, heads=fusion_heads, rotary_pos_emb=True, attn_flash=True
        )
        self.proj = nn.Linear(dim, embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalization(self) -> dict[str, list[float]]:
        """The per-channel mean/std the slices are normalised with (recorded in checkpoints)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)

    def normalize_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """``[n, h, w]`` -> ``[n, 3, h, w]``: min-max per slice to [0, 1], then the backbone's mean/std."""
        x = slices.float()
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)  # a uniform slice becomes 0
        x = repeat(x, "n h w -> n c h w", c=3)
        return (x - self.mean) / self.std

    def slice_features(self, volume: torch.Tensor) -> torch.Tensor:
        """``[b, d, h, w]`` -> ``[b, d, c]``, slices through the backbone ``slice_chunk_size`` at a time."""
        b = volume.shape[0]
        slices = rearrange(volume, "b d h w -> (b d) h w")
        feats = [
            self.backbone(self.normalize_slices(chunk))
            for chunk in slices.split(self.slice_chunk_size)
        ]
        return rearrange(torch.cat(feats), "(b d) c -> b d c", b=b)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        tokens = self.slice_features(volume)
        cls = repeat(self.cls_token, "1 1 c -> b 1 c", b=tokens.shape[0])
        fused = self.fusion(torch.cat([cls.to(tokens.dtype), tokens], dim=1))
        return self.proj(fused[:, 0])


class CTCLIP(nn.Module):
    """Contrastive volume-report model with a learned temperature (``logit_scale``)."""

    def __init__(
        self,
        visual: VolumeEncoder,
        text: nn.Module,
        context_length: int,
        init_logit_scale: float = math.log(1 / 0.07),
        text_activation: TextActivation | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.context_length = context_length
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        # What the text tower's MLPs compute and what decided it (recorded in checkpoints).
        self.text_activation = text_activation or TextActivation(False, "open_clip's default")

    def encode_volume(self, volume: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual(volume)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    embed = encode_volume

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(
        self, volume: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised volume features ``[b, e]``, normalised text features ``[b, e]``, logit scale)."""
        return self.encode_volume(volume), self.encode_text(tokens), self.scale()

    def param_groups(self, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the backbone at a lower learning rate; no decay on gains, biases, tokens."""
        groups: dict[str, dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "backbone" if name.startswith("visual.backbone.") else "head"
            decay = (
                param.ndim >= 2
                and "token" not in name
                and "pos_embed" not in name
                and "embedding" not in name
            )
            key = f"{part}{'' if decay else '_no_decay'}"
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "name": key,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr": lr * (backbone_lr_scale if part == "backbone" else 1.0),
                },
            )
            group["params"].append(param)
        return list(groups.values())


def build_model(cfg: CTClipConfig, *, load_weights: bool = True) -> CTCLIP:
    """The model of ``cfg.model``; with ``load_weights`` the backbone takes
    ``pretrained_weights`` and the text tower ``text_weights`` with the activation they were
    trained with (a config that needs weights but names none is refused, see
    :func:`check_weights`). Without it the text tower's activation is ``text_quick_gelu`` (a
    checkpoint's)."""
    m = cfg.model
    backbone = create_backbone(m)
    if m.grad_checkpointing:
        backbone.set_grad_checkpointing(True)  # timm checkpoints each block
    weights_config: dict = {}
    if load_weights:
        check_weights(m)
        if exists(m.pretrained_weights):
            weights_config = load_backbone_weights(backbone, m.pretrained_weights)
    if m.freeze_dinov2:
        backbone.requires_grad_(False)
    norm = normalization(m, backbone, weights_config)
    visual = VolumeEncoder(
        backbone,
        m.embed_dim,
        m.fusion_depth,
        m.fusion_heads,
        m.slice_chunk_size,
        mean=norm["mean"],
        std=norm["std"],
    )
    text_cfg = CLIPTextCfg(
        context_length=m.context_length,
        vocab_size=m.vocab_size,
        width=m.text_width,
        heads=m.text_heads,
        layers=m.text_layers,
    )
    if load_weights:
        activation = text_activation(m)
    else:
        activation = TextActivation(bool(m.text_quick_gelu), "the model config")
    text = _build_text_tower(m.embed_dim, text_cfg, quick_gelu=activation.quick_gelu)
    if load_weights and exists(m.text_weights):
        load_text_weights(text, m.text_weights)
    return CTCLIP(visual, text, m.context_length, m.init_logit_scale, activation)


def checkpoint_config(state: Mapping[str, Any]) -> CTClipConfig:
    """The config that rebuilds a checkpoint's model with :func:`build_model` (``load_weights=
    False``): the model section the checkpoint stores (``model_config``, resolved when training
    started), without the start weights and freezing, which the stored weights replace."""
    start = {"pretrained_weights": None, "freeze_dinov2": False}
    return from_dict(CTClipConfig, {"model": {**state["model_config"], **start}})


def normalization(
    cfg: ModelConfig, backbone: nn.Module, weights_config: dict | None = None
) -> dict[str, tuple[float, ...]]:
    """``{"mean", "std"}`` of ``cfg`` where set, else what the weights' own config says, else
    the backbone's timm pretrained_cfg (medcore.weights.normalization.data_config)."""
    if exists(cfg.mean) and exists(cfg.std):
        if len(cfg.mean) != 3 or len(cfg.std) != 3:
            raise ConfigError("model.mean", "model.mean and model.std need 3 values (RGB)")
        return {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    if exists(cfg.mean) or exists(cfg.std):
        raise ConfigError("model.mean", "set both model.mean and model.std, or neither")
    data = data_config(model=backbone, weights_config=weights_config)
    return {"mean": data["mean"], "std": data["std"]}


def check_weights(cfg: ModelConfig) -> TextActivation:
    """Refuse a model config that cannot start as configured, before anything is written.

    ``pretrained`` without ``pretrained_weights`` says how to supply them; a frozen backbone
    needs weights in any case (a frozen random backbone learns nothing). Returns the text
    tower's activation (:func:`text_activation`).
    """
    timm_name = timm_backbone_name(cfg.dinov2_model_name)
    hint = (
        f"DINOv2 {cfg.dinov2_model_name}: a torch.hub, timm or HF-transformers file or "
        f"directory, or e.g. hf-hub:timm/{timm_name}.lvd142m"
    )
    if cfg.freeze_dinov2 and not exists(cfg.pretrained_weights):
        raise UserError(
            "--freeze-dinov2",
            "a frozen random backbone learns nothing: pass --pretrained-weights FILE|DIR|"
            f"hf-hub:NAME ({hint})",
        )
    require_pretrained(cfg.pretrained, cfg.pretrained_weights, "model.pretrained", hint)
    # Named weights that cannot be found are refused now, not after the run has started.
    if exists(cfg.pretrained_weights):
        resolve_weights(cfg.pretrained_weights)
    return text_activation(cfg)  # text weights that cannot be found or contradict the config


def init_line(cfg: ModelConfig, activation: TextActivation | None = None) -> str:
    """What the backbone and the text tower start from (and the tower's activation, when
    known), for the training log."""
    source = (
        f"pretrained from {cfg.pretrained_weights}"
        if exists(cfg.pretrained_weights)
        else "scratch (random init)"
    )
    frozen = ", frozen" if cfg.freeze_dinov2 else ""
    text = f"from {cfg.text_weights}" if exists(cfg.text_weights) else "scratch (random init)"
    if activation is not None:
        text += f", {activation.describe()}"
    name = timm_backbone_name(cfg.dinov2_model_name)
    return f"init: backbone {name} {source}{frozen}; text tower {text}"


def component_counts(model: CTCLIP) -> dict[str, int]:
    """Parameters per component (backbone, slice fusion, projection, text tower, temperature)."""
    parts = {
        "visual.backbone": model.visual.backbone,
        "visual.fusion": model.visual.fusion,
        "visual.proj": model.visual.proj,
        "text": model.text,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["visual.cls_token"] = model.visual.cls_token.numel()
    counts["logit_scale"] = model.logit_scale.numel()
    return counts


def load_backbone_weights(backbone: nn.Module, spec: str | Path) -> dict:
    """DINOv2 weights (torch.hub, timm or HF-transformers layout; file, directory or hub name)
    into ``backbone``, one line with the counts; a missing tensor is an error. Returns the
    weights' own config (for their normalisation), {} when there is none."""
    resolved = resolve_weights(spec)
    load_pretrained(
        backbone,
        resolved,
        convert=lambda state: convert_dinov2_state(state, backbone),
        what="DINOv2 backbone",
    )
    return resolved.config


def load_text_weights(text: nn.Module, spec: str | Path) -> None:
    """The text tower of an open_clip CLIP checkpoint (file, directory or hub name) into
    ``text``; the image tower's tensors are reported as unexpected, a missing text tensor (another
    width, depth or context length) is an error. In a hub repository the open_clip files are
    preferred over the HF-transformers copy beside them."""
    resolved = resolve_weights(spec, files=TEXT_WEIGHT_FILES)
    load_pretrained(text, resolved, what="CLIP text tower")


@dataclasses.dataclass(frozen=True)
class TextActivation:
    """The text transformer's MLP activation and what decided it (for the log)."""

    quick_gelu: bool
    source: str

    def describe(self) -> str:
        return f"{'QuickGELU' if self.quick_gelu else 'GELU'} ({self.source})"


def text_activation(cfg: ModelConfig) -> TextActivation:
    """The activation the text tower must use to compute the features its weights were trained
    for: QuickGELU (OpenAI CLIP, open_clip's ``-quickgelu`` models) or GELU.

    The weights decide (:func:`weights_activation`); ``model.text_quick_gelu`` may repeat what
    they say, and must say it for weights that neither their config nor open_clip's registry
    describes. A contradiction, or weights of unknown activation with the setting unset, is a
    one-line ConfigError: the tower would otherwise load every tensor and silently compute
    other features. Without text weights: the setting, GELU when unset (open_clip's default).
    """
    setting = cfg.text_quick_gelu
    if not exists(cfg.text_weights):
        if exists(setting):
            return TextActivation(bool(setting), "model.text_quick_gelu")
        return TextActivation(False, "open_clip's default")
    resolved = resolve_weights(cfg.text_weights, files=TEXT_WEIGHT_FILES)
    said = weights_activation(resolved, cfg)
    if said is None:
        if not exists(setting):
            raise ConfigError(
                "model.text_quick_gelu",
                f"cannot tell whether the text weights {cfg.text_weights} were trained with "
                "QuickGELU (OpenAI CLIP, open_clip's -quickgelu models) or GELU: no "
                "open_clip_config.json beside them and open_clip's pretrained registry does not "
                "know them; set it to true or false (--text-quick-gelu / --no-text-quick-gelu)",
            )
        return TextActivation(bool(setting), "model.text_quick_gelu")
    if exists(setting) and bool(setting) != said.quick_gelu:
        raise ConfigError(
            "model.text_quick_gelu",
            f"is {str(bool(setting)).lower()}, but the text weights {cfg.text_weights} use "
            f"{said.describe()}: the tower would compute other features than the ones they "
            "were trained for (leave it unset)",
        )
    return said


def weights_activation(resolved: ResolvedWeights, cfg: ModelConfig) -> TextActivation | None:
    """What an open_clip checkpoint says about its text activation; None when nothing does.

    First its ``open_clip_config.json`` (``model_cfg.quick_gelu``; its ``text_cfg`` is checked
    against ``cfg`` on the way), then open_clip's pretrained registry (by hub repository or
    release file name; QuickGELU for the ``openai`` tags and the ``-quickgelu`` models), then a
    config that does not set the key (open_clip builds GELU from it).
    """
    model_cfg = resolved.config.get("model_cfg")
    if isinstance(model_cfg, dict):
        check_text_cfg(model_cfg, cfg, resolved.source)
        if "quick_gelu" in model_cfg:
            value = json.dumps(model_cfg["quick_gelu"])
            return TextActivation(
                bool(model_cfg["quick_gelu"]), f"quick_gelu: {value} in its open_clip_config.json"
            )
    for key in _registry_keys(resolved):
        known = _open_clip_registry().get(key)
        if known is not None:
            quick, entry = known
            return TextActivation(quick, f"open_clip's pretrained registry: {entry}")
    if isinstance(model_cfg, dict):
        return TextActivation(False, "its open_clip_config.json sets no quick_gelu")
    return None


def check_text_cfg(model_cfg: dict, cfg: ModelConfig, source: str) -> None:
    """The ``text_cfg`` of an open_clip config must describe the tower ``cfg`` builds."""
    ours = {key: getattr(cfg, name) for key, name in TEXT_CFG_FIELDS.items()}
    default = CLIPTextCfg()
    for key, value in (model_cfg.get("text_cfg") or {}).items():
        if key in TEXT_CFG_IGNORED:
            continue
        if key in ours:
            if value != ours[key]:
                raise ConfigError(
                    f"model.{TEXT_CFG_FIELDS[key]}",
                    f"is {ours[key]}, but the text weights {source} have text_cfg.{key}={value} "
                    "in their open_clip_config.json",
                )
        elif not hasattr(default, key):
            raise ConfigError(
                source, f"text_cfg.{key} in its open_clip_config.json is not an open_clip setting"
            )
        elif value != getattr(default, key):
            raise ConfigError(
                source,
                f"text_cfg.{key}={value!r} in its open_clip_config.json: ctclip builds open_clip's "
                f"standard CLIP text transformer ({key}={getattr(default, key)!r})",
            )
    embed_dim = model_cfg.get("embed_dim")
    if exists(embed_dim) and embed_dim != cfg.embed_dim:
        raise ConfigError(
            "model.embed_dim",
            f"is {cfg.embed_dim}, but the text weights {source} have embed_dim={embed_dim} in "
            "their open_clip_config.json",
        )


def _registry_keys(resolved: ResolvedWeights) -> list[str]:
    """How open_clip's registry may name these weights: the hub repository (from an hf-hub:
    name or a Hugging Face cache path) and the file name (open_clip's release files)."""
    keys = []
    if resolved.source.startswith("hf-hub:"):
        keys.append(resolved.source[len("hf-hub:") :].partition("@")[0])
    for part in resolved.path.parts:
        if part.startswith("models--"):
            keys.append(part[len("models--") :].replace("--", "/", 1))
    keys.append(resolved.path.name)
    return keys


@functools.cache
def _open_clip_registry() -> dict[str, tuple[bool, str]]:
    """open_clip's pretrained registry: hub repository and release file name -> (QuickGELU,
    "MODEL:TAG"). QuickGELU where the tag says so (``openai`` ...) or the model config does
    (``-quickgelu`` models); a key whose entries disagree is left out."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    found: dict[str, set[tuple[bool, str]]] = {}
    for model, tag in open_clip.list_pretrained():
        pcfg = get_pretrained_cfg(model, tag)
        model_cfg = open_clip.get_model_config(model) or {}
        quick = bool(pcfg.get("quick_gelu") or model_cfg.get("quick_gelu"))
        for key in (pcfg.get("hf_hub", "").strip("/"), Path(pcfg.get("url", "")).name):
            if key:
                found.setdefault(key, set()).add((quick, f"{model}:{tag}"))
    return {
        key: (next(iter(entries))[0], min(e for _, e in entries))
        for key, entries in found.items()
        if len({quick for quick, _ in entries}) == 1
    }
