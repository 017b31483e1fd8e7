"""ResNet-18 landmark regressor: torchvision trunk, the spec's regression head, optional CoordAtt.

Shapes: ``b`` batch; images ``[b, 3, S, S]`` (ImageNet-normalised); output ``[b, 2 * L]`` as
``x1, y1, ..., xL, yL`` in [0, 1] (Sigmoid), normalised to the image width and height.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from timm.layers.coord_attn import CoordAttn
from torch import nn
from torchvision.models import resnet18

from cxrlandmarks.config import ModelConfig
from medcore.weights import load_pretrained, missing_weights_error

KIND = "cxrlandmarks.ResNetLandmarkRegressor"
FEATURES = 512


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

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ResNetLandmarkRegressor:
        return cls(cfg.num_landmarks, cfg.head_dropout, cfg.coord_attention)

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

    def load_pretrained_trunk(self, path: str | Path | None) -> tuple[list[str], list[str]]:
        """Load ImageNet (or other) ResNet-18 weights from a local torchvision-layout file."""
        if path is None:
            raise missing_weights_error(
                "model.pretrained_weights",
                "Save torchvision's weights once on a machine with network access: "
                'python -c "import torch, torchvision; torch.save(torchvision.models.resnet18('
                "weights='IMAGENET1K_V1').state_dict(), 'resnet18.pth')\"",
            )
        report = load_pretrained(self.backbone, path, what="ResNet-18 trunk")
        return report.missing, report.unexpected


class ResNetWithCoordinateAttention(ResNetLandmarkRegressor):
    """The spec's attention experiment: :class:`ResNetLandmarkRegressor` with CoordAtt."""

    def __init__(
        self, num_landmarks: int = 15, head_dropout: Sequence[float] = (0.5, 0.25, 0.125)
    ) -> None:
        super().__init__(num_landmarks, head_dropout, coord_attention=True)


def build_model(cfg: ModelConfig) -> ResNetLandmarkRegressor:
    return ResNetLandmarkRegressor.from_config(cfg)
