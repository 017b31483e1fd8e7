"""The dual backbone (timm ConvNeXt + ViT), the metric model and the cross-entropy baseline.

Shape notation: ``b`` batch, ``f`` concatenated backbone features (1536 + 1024 = 2560 for
ConvNeXt-Large + ViT-Large), ``e`` embedding size (128), ``c`` classes.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from binensemble.config import ModelConfig
from medcore.errors import ConfigError
from medcore.weights import load_pretrained, missing_weights_error

WEIGHTS_HINT = (
    "Save timm state dicts on a machine with internet access, e.g. "
    "python -c \"import timm, torch; torch.save(timm.create_model('convnext_large.fb_in22k_ft_in1k', "
    "pretrained=True).state_dict(), 'convnext.pt'); torch.save(timm.create_model("
    "'vit_large_patch16_224.augreg_in21k_ft_in1k', pretrained=True).state_dict(), 'vit.pt')\", then pass "
    "--set model.convnext_weights=convnext.pt --set model.vit_weights=vit.pt "
    "(or one file with both backbones as --pretrained-weights)."
)


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(
            name, f"cannot build this timm model ({str(exc).splitlines()[0]})"
        ) from None
    except TypeError as exc:
        raise ConfigError(name, f"unsupported timm model for this role ({exc})") from None


def _vit_convert(vit: nn.Module):
    """Resample a checkpoint's absolute position embeddings to this ViT's token grid."""

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for prefix in ("", "module.", "model."):
            key = f"{prefix}pos_embed"
            if key in state and state[key].shape != vit.pos_embed.shape:
                prefix_tokens = (
                    0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
                )
                state[key] = resample_abs_pos_embed(
                    state[key], new_size=vit.patch_embed.grid_size, num_prefix_tokens=prefix_tokens
                )
        return state

    return convert


class DualBackbone(nn.Module):
    """ConvNeXt and ViT side by side; ``forward`` returns their pooled features concatenated."""

    def __init__(
        self,
        convnext_name: str = "convnext_large",
        vit_name: str = "vit_large_patch16_224",
        img_size: int = 448,
        drop_path_rate: float = 0.0,
        convnext_kwargs: dict[str, Any] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.convnext = _create(
            convnext_name, drop_path_rate=drop_path_rate, **(convnext_kwargs or {})
        )
        # img_size builds position embeddings for the input grid (448 / 16 = 28 x 28 tokens).
        self.vit = _create(
            vit_name, img_size=img_size, drop_path_rate=drop_path_rate, **(vit_kwargs or {})
        )
        self.num_features = self.convnext.num_features + self.vit.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.convnext(x), self.vit(x)], dim=1)  # [b, f]

    def load_weights(self, cfg: ModelConfig) -> None:
        """Pretrained weights from local files: one combined file and/or one per backbone."""
        covered = {"convnext": False, "vit": False}
        if cfg.pretrained_weights:
            # A combined file (keys convnext.* and vit.*), e.g. a backbone exported by this package.
            load_pretrained(
                self, cfg.pretrained_weights, convert=self._combined_convert, what="dual backbone"
            )
            covered = {"convnext": True, "vit": True}
        if cfg.convnext_weights:
            load_pretrained(self.convnext, cfg.convnext_weights, what="ConvNeXt backbone")
            covered["convnext"] = True
        if cfg.vit_weights:
            load_pretrained(
                self.vit, cfg.vit_weights, convert=_vit_convert(self.vit), what="ViT backbone"
            )
            covered["vit"] = True
        if cfg.pretrained and not all(covered.values()):
            missing = ", ".join(k for k, v in covered.items() if not v)
            raise missing_weights_error(
                f"model.pretrained (no weights for {missing})", WEIGHTS_HINT
            )

    def _combined_convert(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for prefix in ("", "backbone."):
            key = f"{prefix}vit.pos_embed"
            if key in state:
                state[key] = _vit_convert(self.vit)({"pos_embed": state[key]})["pos_embed"]
        return state

    def freeze(self, convnext_stages: int, vit_blocks: int) -> None:
        """Leave only the last stages / blocks and the final norms trainable (-1: everything)."""
        if convnext_stages >= 0:
            stages = getattr(self.convnext, "stages", None)
            if stages is None:
                raise ConfigError(
                    "model.train_convnext_stages", "this CNN has no .stages to freeze by"
                )
            _set_trainable(self.convnext, False)
            for stage in list(stages)[len(stages) - convnext_stages :] if convnext_stages else []:
                _set_trainable(stage, True)
            for name in ("norm_pre", "head"):  # the final norms (head.norm); no classifier here
                if hasattr(self.convnext, name):
                    _set_trainable(getattr(self.convnext, name), True)
        if vit_blocks >= 0:
            blocks = getattr(self.vit, "blocks", None)
            if blocks is None:
                raise ConfigError(
                    "model.train_vit_blocks", "this transformer has no .blocks to freeze by"
                )
            _set_trainable(self.vit, False)
            for block in list(blocks)[len(blocks) - vit_blocks :] if vit_blocks else []:
                _set_trainable(block, True)
            for name in ("norm", "fc_norm"):
                if hasattr(self.vit, name):
                    _set_trainable(getattr(self.vit, name), True)


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class _DualModel(nn.Module):
    def __init__(self, backbone: DualBackbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_config(cls, cfg: ModelConfig, img_size: int, load_weights: bool = True):
        backbone = DualBackbone(
            cfg.convnext_name,
            cfg.vit_name,
            img_size,
            cfg.drop_path_rate,
            cfg.convnext_kwargs,
            cfg.vit_kwargs,
        )
        if load_weights:
            backbone.load_weights(cfg)
        backbone.freeze(cfg.train_convnext_stages, cfg.train_vit_blocks)
        return cls(backbone, cls._head(backbone.num_features, cfg))

    @staticmethod
    def _head(in_dim: int, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, backbone_lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Backbone and head parameters with their own learning rates (frozen ones left out)."""
        return [
            {
                "params": [p for p in self.backbone.parameters() if p.requires_grad],
                "lr": backbone_lr,
                "name": "backbone",
            },
            {"params": list(self.head.parameters()), "lr": head_lr, "name": "head"},
        ]


class MetricModel(_DualModel):
    """Dual backbone -> adapter (f -> 512 -> 128) -> L2-normalised embedding."""

    @staticmethod
    def _head(in_dim: int, cfg: ModelConfig) -> nn.Module:
        return _mlp(in_dim, cfg.hidden_dim, cfg.embed_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)  # [b, e]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class BaselineModel(_DualModel):
    """Dual backbone -> classifier (f -> 512 -> c), trained with cross-entropy."""

    @staticmethod
    def _head(in_dim: int, cfg: ModelConfig) -> nn.Module:
        return _mlp(in_dim, cfg.hidden_dim, cfg.num_classes, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # [b, c] logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (after the hidden layer), for analysis."""
        return self.head[:-1](self.backbone(x))


MODEL_CLASSES: dict[str, type[_DualModel]] = {"metric": MetricModel, "baseline": BaselineModel}


def model_kind(name: str) -> str:
    """The checkpoint ``kind`` stamp of a model name (``metric`` -> ``binensemble.MetricModel``)."""
    return f"binensemble.{MODEL_CLASSES[name].__name__}"


def build_model(cfg: ModelConfig, img_size: int, load_weights: bool = True) -> _DualModel:
    return MODEL_CLASSES[cfg.kind].from_config(cfg, img_size, load_weights=load_weights)
