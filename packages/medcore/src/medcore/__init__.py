"""Shared core for medical-imaging deep learning: trainer, metrics, splits, checkpoints, config, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medcore")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
