"""Chest X-ray anatomical landmarks: ResNet-18 with Wing, symmetry and distance losses.

``cxrlandmarks.load(source)`` (:mod:`cxrlandmarks.api`) returns a trained model that predicts
the 15 named landmarks of PNG/JPEG files, folders or arrays.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cxrlandmarks")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name == "load":  # imported on first use: `import cxrlandmarks` stays light
        from cxrlandmarks.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
