"""Dual-backbone (ConvNeXt + ViT) metric learning, KNN, TTA and soft-voting ensemble."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("binensemble")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
