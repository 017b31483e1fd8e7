"""Constants more than one package needs.

``IMAGENET_MEAN`` / ``IMAGENET_STD``: the RGB statistics torchvision's and timm's ImageNet
weights were trained with (timm's ``IMAGENET_DEFAULT_MEAN/STD``; a test checks they agree).
Backbones whose weights carry their own statistics (timm's ``pretrained_cfg``) use those
instead, through :func:`medcore.weights.data_config`.
"""

from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
