"""Dual-backbone (ConvNeXt + ViT) metric learning, KNN, TTA and soft-voting ensemble."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("binensemble")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":  # the model code is imported on first use: `import binensemble` stays light
        from binensemble.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
