"""3D chest CT retrieval with triplet learning and a graded micro-F1 loss."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctretrieval")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
