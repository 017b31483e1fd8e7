"""BreakHis multi-magnification breast histopathology classifier (MMNet)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histommnet")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
