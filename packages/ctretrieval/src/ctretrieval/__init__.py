"""3D chest CT retrieval with triplet learning and a graded micro-F1 loss.

``ctretrieval.load(source)`` gives a trained model (:mod:`ctretrieval.api`); it is imported on
first use, so ``import ctretrieval`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctretrieval")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> object:  # PEP 562: the model code loads on first use
    if name == "load":
        from ctretrieval.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
