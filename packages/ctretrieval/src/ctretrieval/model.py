"""Proximity networks: a CT volume -> an L2-normalised embedding (and finding logits).

Shape notation: ``b`` batch, ``s`` slices, ``n`` three-slice images (``s / 3``), ``f`` ResNet
feature channels (512), ``h``/``w`` pixels (of the volume, or of the feature map).

A volume ``[b, s, 1, h, w]`` (or ``[b, s, h, w]``) is cut into ``n = s / 3`` images of three
consecutive slices, which stand in for the three colour channels of the ResNet-18 trunk. The
trunk's feature maps ``[b, n, f, h', w']`` go through a Conv3d reduction that treats the ``n``
images as channels and convolves over (features, height, width), then fully connected layers
to the embedding. The flattened size after the reduction follows from the input size by a
dry run, so any slice count (a multiple of 3) and in-plane size work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ctretrieval.config import CTRetrievalConfig, ModelConfig
from medcore.config import from_dict
from medcore.runtime.device import AmpPolicy, autocast
from medcore.weights.normalization import IMAGENET_MEAN, IMAGENET_STD, data_config
from medcore.weights.pretrained import (
    LoadReport,
    load_pretrained,
    missing_weights_error,
    resolve_weights,
)

# The package's network, Proximity; a checkpoint's kind also names its architecture (a name of
# MODELS, each starting with "Proximity"): ctretrieval.Proximity100x100 or ...300x300 (KINDS).
KIND = "ctretrieval.Proximity"

RESNET18_HINT = (
    "ImageNet ResNet-18 weights: hf-hub:timm/resnet18.a1_in1k (timm), or a torchvision file "
    "(torch.save(torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict(), 'resnet18.pt'))"
)


def resnet18_trunk() -> nn.Sequential:
    """torchvision ResNet-18 without its pooling and classifier (random init, no download)."""
    net = torchvision.models.resnet18(weights=None)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


def _reduction(n_images: int, channels: tuple[int, int, int]) -> nn.Sequential:
    c1, c2, c3 = channels
    # Stride 3 along the 512 features shrinks them quickly; padding keeps small maps alive.
    # BatchNorm: without it the study-to-study differences of the trunk features are a tiny
    # fraction of their common level, and the embedding starts out nearly the same for all.
    return nn.Sequential(
        nn.Conv3d(
            n_images, c1, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=(0, 1, 1), bias=False
        ),
        nn.BatchNorm3d(c1),
        nn.ReLU(inplace=True),
        nn.Conv3d(c1, c2, kernel_size=(3, 3, 3), stride=(3, 1, 1), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(c2),
        nn.ReLU(inplace=True),
        nn.Conv3d(c2, c3, kernel_size=(3, 2, 2), stride=(3, 2, 2), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(c3),
        nn.ReLU(inplace=True),
    )


class Proximity100x100(nn.Module):
    """Volume -> embedding network with the flattened size derived from the input size."""

    def __init__(
        self,
        num_slices: int = 300,
        image_size: tuple[int, int] = (270, 270),
        embedding_size: int = 1024,
        num_classes: int = 0,
        reduce_channels: tuple[int, int, int] = (64, 32, 16),
        fc_hidden: int = 512,
        dropout: float = 0.5,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_slices % 3 or num_slices < 3:
            raise ValueError(f"num_slices must be a positive multiple of 3, got {num_slices}")
        self.num_slices = num_slices
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.n_images = num_slices // 3
        self.embedding_size = embedding_size
        self.trunk = resnet18_trunk()
        self.reduce = _reduction(self.n_images, tuple(reduce_channels))
        self.flattened_size = self._dry_run_flattened_size()
        self.fc = nn.Sequential(
            nn.Linear(self.flattened_size, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_hidden, embedding_size),
        )
        self.head = nn.Linear(embedding_size, num_classes) if num_classes > 0 else None
        # The trunk's input normalisation (model.mean / model.std, recorded in the checkpoint).
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def _dry_run_flattened_size(self) -> int:
        """Flattened size after the reduction for one study: one trunk image, then the reduction."""
        was_training = self.training
        self.eval()
        feat = self.trunk(torch.zeros(1, 3, *self.image_size))
        stack = feat[None].expand(1, self.n_images, *feat.shape[1:])
        size = self.reduce(stack).numel()
        self.train(was_training)
        return int(size)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Proximity100x100:
        model = cls(**cls.config_kwargs(cfg))
        model.load_trunk_weights(cfg)
        return model

    @staticmethod
    def config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
        """The constructor's keywords from the model section."""
        return {
            "num_slices": cfg.num_slices,
            "image_size": tuple(cfg.image_size),
            "embedding_size": cfg.embedding_size,
            "num_classes": cfg.num_classes,
            "reduce_channels": tuple(cfg.reduce_channels),
            "fc_hidden": cfg.fc_hidden,
            "dropout": cfg.dropout,
            "mean": tuple(cfg.mean),
            "std": tuple(cfg.std),
        }

    def load_trunk_weights(self, cfg: ModelConfig) -> LoadReport | None:
        """ResNet-18 weights from ``cfg.pretrained_weights``: a file, a snapshot directory or an
        ``hf-hub:`` name, in timm's or torchvision's layout (the same keys); None without."""
        if cfg.pretrained_weights:
            return load_pretrained(
                self.trunk,
                cfg.pretrained_weights,
                convert=_torchvision_to_trunk,
                what="ResNet-18 trunk",
            )
        if cfg.pretrained:
            raise missing_weights_error("model.pretrained", RESNET18_HINT)
        return None

    def prepare(self, volume: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float ``[b, s, (1,) h, w]`` -> float ``[b, s, h, w]`` at the model's size."""
        if volume.ndim == 5:
            volume = volume[:, :, 0]
        if volume.ndim != 4:
            raise ValueError(
                f"expected a volume batch [b, s, 1, h, w] or [b, s, h, w], got {tuple(volume.shape)}"
            )
        x = volume.float() / 255.0 if volume.dtype == torch.uint8 else volume.float()
        target = (self.num_slices, *self.image_size)
        if tuple(x.shape[1:]) != target:
            x = F.interpolate(x[:, None], size=target, mode="trilinear", align_corners=False)[:, 0]
        return x

    def embed_features(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared volumes ``[b, s, h, w]`` -> embeddings ``[b, e]`` before L2 normalisation."""
        b, s, h, w = x.shape
        images = x.reshape(b * s // 3, 3, h, w)  # [b, (n 3), h, w] -> [(b n), 3, h, w]
        feats = self.trunk((images - self.mean) / self.std)
        feats = feats.reshape(
            b, s // 3, *feats.shape[1:]
        )  # [(b n), f, h', w'] -> [b, n, f, h', w']
        return self.fc(self.reduce(feats).flatten(1))

    def forward(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"embedding": [b, e]}`` plus ``"logits": [b, c]`` when the model has a head."""
        raw = self.embed_features(self.prepare(volume))
        out = {"embedding": F.normalize(raw, dim=1)}
        if self.head is not None:
            # The head reads the embedding before normalisation: on the unit sphere its logits
            # could only grow as fast as its weights, which stalls the F1 loss early on.
            out["logits"] = self.head(raw)
        return out

    @torch.no_grad()
    def get_embeddings(
        self, volume: torch.Tensor, amp: AmpPolicy | None = None
    ) -> dict[str, torch.Tensor]:
        """Embeddings (and finding probabilities) without gradients, in float32.

        ``amp`` is the precision to run in, the training run's (``Trainer.amp``, or
        :func:`medcore.runtime.device.amp_policy` of a checkpoint's trainer settings) so that
        embeddings are computed as they were trained; None runs in float32.
        """
        with autocast(volume.device, amp) if amp is not None else contextlib.nullcontext():
            out = self.forward(volume)
        result = {"embedding": F.normalize(out["embedding"].float(), dim=1)}
        if "logits" in out:
            result["probs"] = torch.sigmoid(out["logits"].float())
        return result


class Proximity300x300(Proximity100x100):
    """The legacy fixed-input variant: 300 slices of 300 x 300, inputs resized to that size.

    Its flattened size is the constant of the original design; the dry run only confirms it.
    """

    FLATTENED_SIZE = 16 * 18 * 6 * 6

    def __init__(self, **kwargs: Any) -> None:
        """``Proximity100x100``'s keywords except the fixed input and reduction."""
        super().__init__(300, (300, 300), reduce_channels=(64, 32, 16), **kwargs)
        if self.flattened_size != self.FLATTENED_SIZE:
            raise RuntimeError(
                f"flattened size {self.flattened_size} != legacy {self.FLATTENED_SIZE}"
            )

    @staticmethod
    def config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
        fixed = ("num_slices", "image_size", "reduce_channels")
        return {k: v for k, v in Proximity100x100.config_kwargs(cfg).items() if k not in fixed}


MODELS: dict[str, type[Proximity100x100]] = {
    "Proximity100x100": Proximity100x100,
    "Proximity300x300": Proximity300x300,
}


KINDS = tuple(f"ctretrieval.{name}" for name in MODELS)


def model_kind(cfg: CTRetrievalConfig) -> str:
    """The kind a checkpoint of ``cfg``'s network is stored as, one of :data:`KINDS`."""
    return f"ctretrieval.{cfg.model.name}"


def build_model(cfg: CTRetrievalConfig) -> Proximity100x100:
    """The network of ``cfg.model`` as it stands (the training run sizes the head for its mode:
    :func:`ctretrieval.train.model_config`), with the trunk's pretrained weights it names."""
    return MODELS[cfg.model.name].from_config(cfg.model)


def stored_config(state: dict[str, Any]) -> CTRetrievalConfig:
    """The config :func:`build_model` rebuilds a checkpoint's network from: its stored (resolved)
    model section, with no pretrained weights to read (the checkpoint's replace them)."""
    stored = {**state["model_config"], "pretrained_weights": None, "pretrained": False}
    if stored.get("name") == "Proximity300x300":  # fixed input; older checkpoints stored others
        stored.update(num_slices=300, image_size=[300, 300])
    return CTRetrievalConfig(model=from_dict(ModelConfig, stored))


def with_weights_normalisation(cfg: ModelConfig, report: bool = True) -> ModelConfig:
    """``cfg`` with the trunk's mean/std from the pretrained weights' own configuration.

    A timm snapshot (``hf-hub:timm/resnet18.*`` or its directory) carries a ``config.json``
    whose ``pretrained_cfg`` names the statistics its weights were trained with; a bare
    torchvision file carries none, and torchvision's ImageNet weights expect ImageNet's, which
    are the defaults. Prints which one is used (``report``).
    """
    if not cfg.pretrained_weights:
        return cfg
    resolved = resolve_weights(cfg.pretrained_weights)
    try:
        stats = data_config(weights_config=resolved.config)
    except ValueError:  # no (complete) preprocessing config beside the weights
        if report:
            print(
                f"normalisation: ImageNet mean/std (no preprocessing config in {resolved.source})"
            )
        return cfg
    if report:
        print(f"normalisation: mean {stats['mean']}, std {stats['std']} (from {resolved.source})")
    return dataclasses.replace(cfg, mean=stats["mean"], std=stats["std"])


def _torchvision_to_trunk(state: dict[str, Any]) -> dict[str, Any]:
    """torchvision ResNet-18 keys (``conv1.weight``, ``layer1.0...``) -> the trunk's Sequential indices."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    index = {name: str(i) for i, name in enumerate(names)}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in index:
            out[f"{index[head]}.{rest}"] = value
        elif head.isdigit() or head == "fc":
            out[key] = value
    return out
