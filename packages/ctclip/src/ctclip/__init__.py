"""3D CT CLIP: DINOv2 per slice, x-transformers slice fusion, zero-shot findings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctclip")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
