"""BreakHis multi-magnification breast histopathology classifier (MMNet).

``histommnet.load(source)`` gives a trained model for new patients (``histommnet.api``); it is
imported on first use, so ``import histommnet`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histommnet")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":
        from histommnet.api import load  # the model, its transforms and medcore's weights code

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
