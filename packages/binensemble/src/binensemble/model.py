"""The dual backbone (timm ConvNeXt + ViT), the metric model and the cross-entropy baseline.

Shape notation: ``b`` batch, ``f`` concatenated backbone features (1536 + 1024 = 2560 for
ConvNeXt-Large + ViT-Large), ``e`` embedding size (128), ``c`` classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from binensemble.config import BinEnsembleConfig, ModelConfig
from medcore.engine.grad_checkpointing import set_grad_checkpointing
from medcore.errors import ConfigError
from medcore.weights.normalization import data_config
from medcore.weights.pretrained import load_pretrained, require_pretrained, resolve_weights

KIND = "binensemble.Ensemble"
"""The model of a run: every model it trained and their soft vote (an exported folder's kind)."""
MEMBER_KINDS = {"metric": "binensemble.MetricModel", "baseline": "binensemble.BaselineModel"}
"""Each model's checkpoint kind (its ``model.pt`` and training checkpoints), by model name."""

WEIGHTS_HINT = (
    "--pretrained-weights names one source holding both backbones (convnext.*, vit.*); "
    "or give each: --set model.convnext_weights=hf-hub:timm/convnext_large.fb_in22k_ft_in1k "
    "--set model.vit_weights=hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k (or files)"
)


def weight_sources(cfg: ModelConfig) -> dict[str, str | None]:
    """The file each backbone starts from (a per-backbone file wins over the combined one)."""
    combined = cfg.pretrained_weights
    return {"convnext": cfg.convnext_weights or combined, "vit": cfg.vit_weights or combined}


def init_description(cfg: ModelConfig) -> str:
    """The truthful init line: where each backbone's weights come from."""
    parts = [
        f"{branch} pretrained from {source}" if source else f"{branch} from scratch"
        for branch, source in weight_sources(cfg).items()
    ]
    return "init: " + ", ".join(parts)


def check_pretrained(cfg: ModelConfig) -> None:
    """Refuse a config that starts from pretrained weights without them, saying how to give them.

    Called before the run directory is made; a dry run never calls it.
    """
    for branch, source in weight_sources(cfg).items():
        require_pretrained(cfg.pretrained, source, f"model.{branch}_weights", WEIGHTS_HINT)


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
        # medcore.weights.pretrained has already taken off any prefix (module., model., backbone. ...).
        if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
            prefix_tokens = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"],
                new_size=vit.patch_embed.grid_size,
                num_prefix_tokens=prefix_tokens,
            )
        return state

    return convert


BRANCHES = ("convnext", "vit")


def branch_normalisation(
    branch: nn.Module,
    name: str,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    weights_config: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """A branch's input mean and std: the given ones, else those its weights expect (the weights'
    own config, e.g. a hub snapshot's ``config.json``, over timm's ``pretrained_cfg``)."""
    if mean is None or std is None:
        expected = data_config(model=branch, weights_config=weights_config)
        mean = list(expected["mean"]) if mean is None else mean
        std = list(expected["std"]) if std is None else std
    mean, std = list(mean), list(std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"model.{name}_mean/std", "needs 3 means and 3 positive stds (none in the backbone)"
        )
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def with_normalisation(cfg: ModelConfig, backbone: DualBackbone) -> ModelConfig:
    """``cfg`` with each branch's normalisation filled in, as it is recorded in checkpoints."""
    values = {}
    for name, norm in backbone.normalisation().items():
        values[f"{name}_mean"], values[f"{name}_std"] = norm["mean"], norm["std"]
    return dataclasses.replace(cfg, **values)


class DualBackbone(nn.Module):
    """ConvNeXt and ViT side by side; ``forward`` returns their pooled features concatenated.

    Input: ``[b, 3, h, w]`` pixels in [0, 1]; each branch normalises them with its own mean and
    std (its pretrained weights' statistics), held as buffers outside the state dict.
    """

    def __init__(
        self,
        convnext_name: str = "convnext_large",
        vit_name: str = "vit_large_patch16_224",
        img_size: int = 448,
        drop_path_rate: float = 0.0,
        convnext_kwargs: dict[str, Any] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        norms: dict[str, dict[str, list[float] | None]] | None = None,
    ) -> None:
        """``norms``: per branch ``{"mean", "std"}``; missing or None values come from the
        backbone's pretrained configuration."""
        super().__init__()
        self.convnext = _create(
            convnext_name, drop_path_rate=drop_path_rate, **(convnext_kwargs or {})
        )
        # img_size builds position embeddings for the input grid (448 / 16 = 28 x 28 tokens).
        self.vit = _create(
            vit_name, img_size=img_size, drop_path_rate=drop_path_rate, **(vit_kwargs or {})
        )
        self.num_features = self.convnext.num_features + self.vit.num_features
        for name in BRANCHES:
            self.register_buffer(f"{name}_mean", torch.zeros(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.ones(1, 3, 1, 1), persistent=False)
        given = norms or {}
        self.set_normalisation(
            {n: branch_normalisation(getattr(self, n), n, **given.get(n, {})) for n in BRANCHES}
        )

    def set_normalisation(self, norms: dict[str, dict[str, list[float]]]) -> None:
        """Per-branch ``{"mean": [3], "std": [3]}`` of the input pixels."""
        with torch.no_grad():
            for name, norm in norms.items():
                getattr(self, f"{name}_mean").copy_(torch.tensor(norm["mean"]).view(1, 3, 1, 1))
                getattr(self, f"{name}_std").copy_(torch.tensor(norm["std"]).view(1, 3, 1, 1))
        self._norms = {name: {k: list(v) for k, v in norm.items()} for name, norm in norms.items()}

    def normalisation(self) -> dict[str, dict[str, list[float]]]:
        return {name: dict(norm) for name, norm in self._norms.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cnn = self.convnext((x - self.convnext_mean) / self.convnext_std)
        vit = self.vit((x - self.vit_mean) / self.vit_std)
        return torch.cat([cnn, vit], dim=1)  # [b, f]

    def load_weights(self, cfg: ModelConfig) -> None:
        """Pretrained weights: one source holding both backbones and/or one per backbone.

        Each load prints its counts (medcore.weights.pretrained); a missing backbone tensor is an error. A
        branch whose normalisation the config leaves open takes the one its weights' config
        names (a hub snapshot's ``config.json``), else timm's for the model.
        """
        if cfg.pretrained_weights:
            # A combined source (keys convnext.* and vit.*), e.g. a backbone this package exported.
            load_pretrained(
                self, cfg.pretrained_weights, convert=self._combined_convert, what="dual backbone"
            )
        norms = self.normalisation()
        for name, what, convert in (
            ("convnext", "ConvNeXt backbone", None),
            ("vit", "ViT backbone", _vit_convert(self.vit)),
        ):
            spec = getattr(cfg, f"{name}_weights")
            if not spec:
                continue
            resolved = resolve_weights(spec)
            branch = getattr(self, name)
            load_pretrained(branch, resolved, convert=convert, what=what)
            norms[name] = branch_normalisation(
                branch,
                name,
                getattr(cfg, f"{name}_mean"),
                getattr(cfg, f"{name}_std"),
                resolved.config,
            )
        self.set_normalisation(norms)

    def _combined_convert(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "vit.pos_embed" in state:  # any prefix (backbone., module. ...) is already taken off
            resampled = _vit_convert(self.vit)({"pos_embed": state["vit.pos_embed"]})
            state["vit.pos_embed"] = resampled["pos_embed"]
        return state

    def freeze(self, convnext_stages: int, vit_blocks: int) -> None:
        """Leave only the last stages / blocks and the final norms trainable (-1: everything)."""
        # ConvNeXt's final norms: norm_pre and head (head.norm); there is no classifier here.
        _train_last(self.convnext, "stages", convnext_stages, ("norm_pre", "head"), "convnext")
        _train_last(self.vit, "blocks", vit_blocks, ("norm", "fc_norm"), "vit")


def _train_last(net: nn.Module, parts: str, n: int, norms: tuple[str, ...], key: str) -> None:
    """Freeze ``net`` but its last ``n`` of ``net.<parts>`` and its ``norms`` (-1: leave all)."""
    if n < 0:
        return
    seq = getattr(net, parts, None)
    if seq is None:
        what = "CNN" if key == "convnext" else "transformer"
        field = f"model.train_{key}_{'stages' if key == 'convnext' else 'blocks'}"
        raise ConfigError(field, f"this {what} has no .{parts} to freeze by")
    _set_trainable(net, False)
    for part in list(seq)[len(seq) - n :] if n else []:
        _set_trainable(part, True)
    for name in norms:
        if hasattr(net, name):
            _set_trainable(getattr(net, name), True)


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


def build_model(cfg: BinEnsembleConfig, *, load_weights: bool = True) -> _DualModel:
    """The model ``cfg.model.kind`` for ``cfg.data.img_size`` inputs, its backbones' trainable
    parts as configured; ``load_weights``: start from the configured pretrained weights (a
    missing source is an error), else from random ones (a dry run, or a checkpoint loaded next).
    """
    m = cfg.model
    backbone = DualBackbone(
        m.convnext_name,
        m.vit_name,
        cfg.data.img_size,
        m.drop_path_rate,
        m.convnext_kwargs,
        m.vit_kwargs,
        {n: {"mean": getattr(m, f"{n}_mean"), "std": getattr(m, f"{n}_std")} for n in BRANCHES},
    )
    if load_weights:
        check_pretrained(m)
        backbone.load_weights(m)
    backbone.freeze(m.train_convnext_stages, m.train_vit_blocks)
    # timm checkpoints non-reentrantly: trainable blocks behind frozen ones keep their grads.
    set_grad_checkpointing(backbone, m.grad_checkpointing)
    cls = MODEL_CLASSES[m.kind]
    return cls(backbone, cls._head(backbone.num_features, m))
