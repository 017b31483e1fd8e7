"""3D CT CLIP: DINOv2 per slice, x-transformers slice fusion, zero-shot findings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctclip")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        # Resolved on first use: ``import ctclip`` stays light (no torch model code).
        from ctclip.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
