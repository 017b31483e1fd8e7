"""Chest X-ray anatomical landmarks: ResNet-18 with Wing, symmetry and distance losses."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxrlandmarks")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
