"""ResNet-18 landmark regressor: torchvision trunk, the spec's regression head, optional CoordAtt.

Shapes: ``b`` batch; images ``[b, 3, S, S]`` (ImageNet-normalised); output ``[b, 2 * L]`` as
``x1, y1, ..., xL, yL`` in [0, 1] (Sigmoid), normalised to the image width and height.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.layers.coord_attn import CoordAttn
from torch import nn
from torchvision.models import resnet18

from cxrlandmarks.config import CxrConfig, ModelConfig
from medcore.config import from_dict, to_dict
from medcore.engine.inference import load_model as load_checkpoint_model
from medcore.errors import CheckpointError
from medcore.weights.checkpoint import load_checkpoint
from medcore.weights.normalization import data_config
from medcore.weights.pretrained import LoadReport, load_pretrained, missing_weights_error

KIND = "cxrlandmarks.ResNetLandmarkRegressor"
FEATURES = 512
# timm's name for torchvision's ImageNet ResNet-18 weights (the trunk's own layout): its
# pretrained configuration gives the input normalisation when the weights carry none.
TIMM_TAG = "resnet18.tv_in1k"


def input_normalisation(weights_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``mean``, ``std`` (3 channels), ``interpolation`` and ``input_size`` the trunk's weights
    expect: from the weights' own config (a timm/HF snapshot's config.json) when there is one,
    else from timm's pretrained configuration of torchvision's ResNet-18 weights.

    Recorded in every checkpoint (``input_norm``) and used unchanged by eval and predict.
    """
    import timm

    tag = timm.models.get_pretrained_cfg(TIMM_TAG).to_dict()
    cfg = data_config(pretrained_cfg=tag, weights_config=weights_config or {})
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": cfg["interpolation"],
        "input_size": list(cfg["input_size"]),
    }


PRETRAINED_HINT = (
    "E.g. --pretrained-weights hf-hub:timm/resnet18.tv_in1k (torchvision's ImageNet weights "
    "through the Hugging Face cache), or a torchvision resnet18.pth file"
)


class ResNetLandmarkRegressor(nn.Module):
    """ResNet-18 (512 features) -> Dropout 0.5, 512->512, ReLU, Dropout 0.25, 512->256, ReLU,
    Dropout 0.125, 256->2L, Sigmoid.

    ``coord_attention=True`` applies Coordinate Attention (Hou et al., CVPR 2021; timm's
    ``CoordAttn``) to the last feature map before pooling: the spec's Phase-2-Attention variant.
    """

    def __init__(
        self,
        num_landmarks: int = 15,
        head_dropout: Sequence[float] = (0.5, 0.25, 0.125),
        coord_attention: bool = False,
    ) -> None:
        super().__init__()
        if len(head_dropout) != 3:
            raise ValueError(f"head_dropout needs 3 rates, got {list(head_dropout)}")
        self.num_landmarks = num_landmarks
        self.backbone = resnet18(weights=None)  # weights only from a local file, never downloaded
        self.backbone.fc = nn.Identity()
        self.attention = CoordAttn(FEATURES) if coord_attention else nn.Identity()
        d1, d2, d3 = head_dropout
        self.head = nn.Sequential(
            nn.Dropout(d1),
            nn.Linear(FEATURES, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(d2),
            nn.Linear(512, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(d3),
            nn.Linear(256, num_landmarks * 2),
            nn.Sigmoid(),
        )
        self.trunk_frozen = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last ResNet feature map ``[b, 512, S/32, S/32]`` (after CoordAtt if enabled)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.attention(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 512-d image features."""
        return self.forward_features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.embed(x)
        # The head runs in fp32 even under autocast: a bf16 sigmoid output is only good to
        # ~0.4 px at 224, too coarse for sub-pixel landmarks; the head costs nothing.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.head(features.float())

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The new layers (head and attention), trained with the head learning rate."""
        yield from self.attention.parameters()
        yield from self.head.parameters()

    def freeze_trunk(self, frozen: bool = True) -> None:
        """Stop (or resume) training the trunk's weights.

        BatchNorm layers still update their running statistics in train mode, as in the
        original phase 1: the normalisation adapts to radiographs while the filters stay fixed.
        """
        self.trunk_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)

    def load_pretrained_trunk(self, spec: str | Path | None) -> LoadReport:
        """Load ResNet-18 weights into the trunk (torchvision or timm layout): a file, a
        snapshot directory or ``hf-hub:timm/resnet18.a1_in1k``; prints the load's one line."""
        if spec is None:
            raise missing_weights_error("model.pretrained_weights", PRETRAINED_HINT)
        return load_pretrained(self.backbone, spec, what="ResNet-18 trunk")


class ResNetWithCoordinateAttention(ResNetLandmarkRegressor):
    """The spec's attention experiment: :class:`ResNetLandmarkRegressor` with CoordAtt."""

    def __init__(
        self, num_landmarks: int = 15, head_dropout: Sequence[float] = (0.5, 0.25, 0.125)
    ) -> None:
        super().__init__(num_landmarks, head_dropout, coord_attention=True)


def build_model(cfg: CxrConfig) -> ResNetLandmarkRegressor:
    """The regressor ``cfg.model`` describes, randomly initialised (weights come from a
    checkpoint or :meth:`ResNetLandmarkRegressor.load_pretrained_trunk`)."""
    m = cfg.model
    return ResNetLandmarkRegressor(m.num_landmarks, m.head_dropout, m.coord_attention)


def saved_config(state: dict[str, Any]) -> CxrConfig:
    """The config :func:`build_model` needs, from a checkpoint's recorded ``model_config``."""
    return from_dict(CxrConfig, {"model": state["model_config"]})


# The original code's trunk is ``nn.Sequential(*resnet18.children()[:-1])`` (``backbone``, or
# ``backbone_conv`` in its attention variant): children 0, 1, 4-7 are conv1, bn1, layer1-4.
_ORIGINAL_TRUNK = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
_ORIGINAL_KEY = re.compile(r"^(?:backbone|backbone_conv)\.(\d+)\.(.*)$")


def convert_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the original code's ``model_state_dict`` -> this model's keys.

    ``backbone.<i>.*`` -> ``backbone.<conv1|bn1|layerN>.*``, ``regression_head.*`` -> ``head.*``
    (the same Sequential indices), ``coordinate_attention.*`` -> ``attention.*``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _ORIGINAL_KEY.match(key)
        if match and match.group(1) in _ORIGINAL_TRUNK:
            key = f"backbone.{_ORIGINAL_TRUNK[match.group(1)]}.{match.group(2)}"
        elif key.startswith("regression_head."):
            key = "head." + key[len("regression_head.") :]
        elif key.startswith("coordinate_attention."):
            key = "attention." + key[len("coordinate_attention.") :]
        out[key] = value
    return out


def _original_model_config(state: dict[str, Any], weights: dict[str, torch.Tensor]) -> ModelConfig:
    """The ModelConfig of an original checkpoint (its ``model_config``: num_landmarks, dropout_rate)."""
    saved = state.get("model_config") if isinstance(state.get("model_config"), dict) else {}
    head_out = weights.get("head.7.weight")
    num_landmarks = int(
        saved.get("num_landmarks", head_out.shape[0] // 2 if head_out is not None else 15)
    )
    rate = float(saved.get("dropout_rate", 0.5))
    return ModelConfig(
        num_landmarks=num_landmarks,
        head_dropout=[rate, rate / 2, rate / 4],
        coord_attention=any(k.startswith("attention.") for k in weights),
        pretrained=False,
    )


def read_model_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Weights, model config and the whole state of a cxrlandmarks checkpoint, or of one written
    by the original code (``{"model_state_dict", "model_config", ...}``, imported by key).

    Any other checkpoint (another package's, or one without a model identity) is refused.
    """
    state = load_checkpoint(path, map_location="cpu")
    if state.get("kind") is None and isinstance(state.get("model_state_dict"), dict):
        weights = convert_original_state(state["model_state_dict"])
        return weights, _original_model_config(state, weights), state
    found = state.get("kind")
    if found is None:
        raise CheckpointError(path, f"not a {KIND} checkpoint (it carries no model identity)")
    if found != KIND:
        raise CheckpointError(path, f"this is a {found} checkpoint, not {KIND}")
    if "model_config" not in state:
        raise CheckpointError(path, "has no model_config (not written by cxrlandmarks-train)")
    return state["model"], from_dict(ModelConfig, state["model_config"]), state


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """All of ``weights`` into ``model``, strictly: a mismatch is a one-line CheckpointError."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not match the model ({str(exc).splitlines()[0][:120]})"
        ) from None


def load_model(
    path: str | Path, device: torch.device
) -> tuple[ResNetLandmarkRegressor, dict[str, Any]]:
    """Rebuild a model from a checkpoint alone (ours or the original code's), in eval mode.

    The original code's checkpoint is read into our layout first (converted weights, its model
    config), then both go through :func:`medcore.engine.inference.load_model`.
    """
    weights, cfg, state = read_model_checkpoint(path)
    state = {**state, "kind": KIND, "model": weights, "model_config": to_dict(cfg)}
    model, state = load_checkpoint_model(
        path,
        KIND,
        lambda s: build_model(saved_config(s)),
        device=device,
        state=state,
    )
    return model, state  # type: ignore[return-value]
