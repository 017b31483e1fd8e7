"""MMNet and its baselines (single magnification, simple concatenation).

Shapes: ``b`` batch, ``m`` magnifications, ``c`` channels, ``h w`` pixels, ``d`` token width.
Every model takes ``images [b, m, 3, h, w]`` and returns a dict with ``logits [b, 2]``
(benign, malignant) and, with the subtype head, ``subtype_logits [b, 8]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from einops import rearrange
from torch import nn

from histommnet.attention import (
    ClinicalChannelAttention,
    ClinicalCrossMagFusion,
    HierarchicalMagnificationAttention,
    MultiScaleAttentionPool,
)
from histommnet.breakhis import SUBTYPE_CODES
from histommnet.config import DataConfig, HistoConfig, ModelConfig
from medcore.config import from_dict
from medcore.engine import inference
from medcore.errors import ConfigError
from medcore.weights.normalization import data_config
from medcore.weights.pretrained import load_pretrained, require_pretrained, resolve_weights

NUM_SUBTYPES = len(SUBTYPE_CODES)
# The hub names of the weights the configs expect (timm's current default tags).
HUB_WEIGHTS = {"efficientnet_b1": "hf-hub:timm/efficientnet_b1.ra4_e3600_r240_in1k"}
_FILTERS = ("bilinear", "bicubic", "nearest")


def weights_hint(backbone: str) -> str:
    """Where the pretrained weights of ``backbone`` are on the hub (for messages)."""
    return f"e.g. --pretrained-weights {HUB_WEIGHTS.get(backbone, f'hf-hub:timm/{backbone}')}"


def create_trunk(cfg: ModelConfig) -> nn.Module:
    """A timm CNN without pooling or classifier (``forward_features -> [b, c, h, w]``), randomly
    initialised (``_MultiTrunk`` loads the pretrained weights)."""
    try:
        trunk = timm.create_model(
            cfg.backbone,
            pretrained=False,
            num_classes=0,
            global_pool="",
            drop_path_rate=cfg.drop_path_rate,
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError("model.backbone", str(exc)) from None
    return trunk


def resolve_normalization(model: ModelConfig, data: DataConfig) -> DataConfig:
    """``data`` with unset ``mean``/``std``/``interpolation`` taken from the backbone's
    pretrained configuration: timm's ``pretrained_cfg``, overridden by the weights' own
    ``config.json`` when ``model.pretrained_weights`` is a snapshot or hub name that has one."""
    if None not in (data.mean, data.std, data.interpolation):
        return data
    try:
        with torch.device("meta"):
            trunk = timm.create_model(model.backbone, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise ConfigError("model.backbone", str(exc)) from None
    weights = resolve_weights(model.pretrained_weights).config if model.pretrained_weights else {}
    found = data_config(model=trunk, weights_config=weights)
    interpolation = found["interpolation"] if found["interpolation"] in _FILTERS else "bicubic"
    return dataclasses.replace(
        data,
        mean=data.mean or found["mean"],
        std=data.std or found["std"],
        interpolation=data.interpolation or interpolation,
    )


def cam_layer(trunk: nn.Module) -> nn.Module:
    """The last convolutional feature layer of a trunk (the Grad-CAM target)."""
    for name in ("bn2", "final_conv", "layer4", "stages", "features"):
        layer = getattr(trunk, name, None)
        if isinstance(layer, nn.Module):
            return (
                layer[-1]
                if isinstance(layer, nn.Sequential) and name in ("stages", "features")
                else layer
            )
    raise ConfigError(
        "model.backbone", f"no known last feature layer in {type(trunk).__name__} for Grad-CAM"
    )


def _head(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    hidden = max(32, in_dim // 2)
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout / 2),
        nn.Linear(hidden, out_dim),
    )


class _MultiTrunk(nn.Module):
    """One trunk per magnification (or one shared), giving a feature map per magnification."""

    def __init__(self, cfg: ModelConfig, num_magnifications: int) -> None:
        super().__init__()
        count = 1 if cfg.shared_backbone else num_magnifications
        self.trunks = nn.ModuleList(create_trunk(cfg) for _ in range(count))
        self.num_features = int(self.trunks[0].num_features)
        require_pretrained(
            cfg.pretrained, cfg.pretrained_weights, "model.pretrained", weights_hint(cfg.backbone)
        )
        if cfg.pretrained_weights:  # read and reported once, copied into every trunk
            each = f" (copied into {count} trunks)" if count > 1 else ""
            load_pretrained(self.trunks[0], cfg.pretrained_weights, what=f"{cfg.backbone}{each}")
            for trunk in self.trunks[1:]:
                trunk.load_state_dict(self.trunks[0].state_dict())

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[b, m, 3, h, w]`` -> m feature maps ``[b, c, h', w']``."""
        m = images.shape[1]
        if len(self.trunks) == 1:
            flat = self.trunks[0].forward_features(rearrange(images, "b m c h w -> (b m) c h w"))
            return list(rearrange(flat, "(b m) c h w -> m b c h w", m=m).unbind(0))
        return [trunk.forward_features(images[:, i]) for i, trunk in enumerate(self.trunks)]

    def cam_layers(self) -> list[nn.Module]:
        return [cam_layer(t) for t in self.trunks]


class _Classifier(nn.Module):
    """What every model shares: its config and magnifications, the benign/malignant head and the
    optional subtype head on a ``width``-wide embedding, and the output dict."""

    def _set_config(self, cfg: ModelConfig, magnifications: Sequence[str]) -> None:
        self.cfg = cfg
        self.magnifications = list(magnifications)

    def _add_heads(self, width: int) -> None:
        self.head = _head(width, 2, self.cfg.dropout)
        self.subtype_head = (
            _head(width, NUM_SUBTYPES, self.cfg.dropout) if self.cfg.subtype_head else None
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._outputs(self.embed(images))

    def _outputs(self, emb: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"logits": self.head(emb), "embedding": emb, **extra}
        if self.subtype_head is not None:
            out["subtype_logits"] = self.subtype_head(emb)
        return out


class MMNet(_Classifier):
    """Multi-magnification network: per-magnification trunks and attention, hierarchical
    cross-magnification attention, fusion, a benign/malignant head and an optional subtype head.
    """

    def __init__(self, cfg: ModelConfig, magnifications: Sequence[str]) -> None:
        super().__init__()
        self._set_config(cfg, magnifications)
        m, d = len(self.magnifications), cfg.embed_dim
        self.encoder = _MultiTrunk(cfg, m)
        c = self.encoder.num_features
        self.channel_attention = nn.ModuleList(
            ClinicalChannelAttention(c, cfg.channel_reduction) for _ in range(m)
        )
        self.spatial_pool = nn.ModuleList(
            MultiScaleAttentionPool(c, cfg.attention_scales) for _ in range(m)
        )
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.LayerNorm(d)) for _ in range(m)
        )
        attn_dropout = min(0.1, cfg.dropout)
        self.hierarchy = HierarchicalMagnificationAttention(d, m, cfg.num_heads, attn_dropout)
        self.fusion = ClinicalCrossMagFusion(d, m, attn_dropout)
        self._add_heads(d)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """One token per magnification, ``[b, m, d]``, before cross-magnification attention."""
        feats = self.encoder.forward_features(images)
        tokens = [
            proj(pool(att(f)))
            for f, att, pool, proj in zip(
                feats, self.channel_attention, self.spatial_pool, self.project, strict=True
            )
        ]
        return torch.stack(tokens, dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, hier_weights = self.hierarchy(self.tokens(images))
        fused, mag_weights = self.fusion(tokens)
        return self._outputs(
            fused, magnification_weights=mag_weights, hierarchy_weights=hier_weights
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The fused patient-draw embedding ``[b, d]``."""
        return self.forward(images)["embedding"]


class SingleMagNet(_Classifier):
    """Baseline: one magnification (``single_magnification``) through a trunk and average pooling."""

    def __init__(self, cfg: ModelConfig, magnifications: Sequence[str]) -> None:
        super().__init__()
        if cfg.single_magnification not in magnifications:
            raise ConfigError(
                "model.single_magnification",
                f"{cfg.single_magnification} is not among data.magnifications {list(magnifications)}",
            )
        self._set_config(cfg, magnifications)
        self.index = self.magnifications.index(cfg.single_magnification)
        self.encoder = _MultiTrunk(cfg, 1)
        self._add_heads(self.encoder.num_features)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        feat = self.encoder.forward_features(images[:, self.index : self.index + 1])[0]
        return feat.mean((2, 3))


class ConcatNet(_Classifier):
    """Baseline: average-pooled features of every magnification concatenated, then a head."""

    def __init__(self, cfg: ModelConfig, magnifications: Sequence[str]) -> None:
        super().__init__()
        self._set_config(cfg, magnifications)
        self.encoder = _MultiTrunk(cfg, len(self.magnifications))
        self._add_heads(self.encoder.num_features * len(self.magnifications))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.mean((2, 3)) for f in self.encoder.forward_features(images)], dim=1)


MODELS: dict[str, type[nn.Module]] = {"mmnet": MMNet, "single": SingleMagNet, "concat": ConcatNet}
# The checkpoint identity of MMNet; the baselines' are ``histommnet.<class name>`` as well
# (``checkpoint_kind``), and loading accepts any of ``KINDS``.
KIND = "histommnet.MMNet"
KINDS = frozenset(f"histommnet.{cls.__name__}" for cls in MODELS.values())


def build_model(cfg: HistoConfig) -> nn.Module:
    """The model ``cfg.model`` names, for the magnifications ``cfg.data.magnifications`` (with
    its pretrained trunk weights loaded when ``cfg.model`` asks for them)."""
    return MODELS[cfg.model.name](cfg.model, cfg.data.magnifications)  # type: ignore[call-arg]


def check_model_config(cfg: HistoConfig, dry: bool = False) -> None:
    """What refuses the model settings before a run starts (``dry``: no weights needed)."""
    if not dry:
        require_pretrained(
            cfg.model.pretrained,
            cfg.model.pretrained_weights,
            "model.pretrained",
            weights_hint(cfg.model.backbone),
        )
    if not timm.is_model(cfg.model.backbone):
        raise ConfigError("model.backbone", f"unknown timm model {cfg.model.backbone!r}")
    mags = list(cfg.data.magnifications)
    if cfg.model.name == "single" and cfg.model.single_magnification not in mags:
        raise ConfigError(
            "model.single_magnification",
            f"{cfg.model.single_magnification} is not among data.magnifications {mags}",
        )


def dry_run_config(cfg: HistoConfig) -> HistoConfig:
    """``cfg`` without weights to load: what a meta-device build (``--dry-run``) uses."""
    model = dataclasses.replace(cfg.model, pretrained=False, pretrained_weights=None)
    return dataclasses.replace(cfg, model=model)


def checkpoint_kind(model: nn.Module) -> str:
    return f"histommnet.{type(model).__name__}"


def build_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """The unweighted model a checkpoint (or export) describes: the config of its
    ``model_config`` and ``magnifications``, never loading pretrained weights (the checkpoint's
    replace them)."""
    model = from_dict(
        ModelConfig, {**state["model_config"], "pretrained": False, "pretrained_weights": None}
    )
    data = DataConfig(magnifications=list(state["magnifications"]))
    return build_model(HistoConfig(model=model, data=data))


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from one of its checkpoints alone; returns (model, checkpoint dict)."""
    return inference.load_model(path, KINDS, build_from_checkpoint, device=map_location)
