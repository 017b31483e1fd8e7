"""The cache of built-in demo datasets: generated once, atomically, shared by later runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from medcore.io import waiting_lock


def cache_root() -> Path:
    """``$MEDCORE_CACHE_DIR`` or the user's cache directory (``~/.cache/medcore``)."""
    env = os.environ.get("MEDCORE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medcore"


def ensure_demo_data(package: str, generate: Callable[[Path], None], version: str = "v1") -> Path:
    """Return the demo data directory of ``package``, generating it with ``generate(dir)`` once.

    Generation writes into a temporary sibling directory that is renamed into place only when
    complete, so an interrupted generation is never mistaken for a finished dataset.
    """
    target = cache_root() / package / f"demo-{version}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Waits while a sibling (another rank of a --devices N run) generates the same data.
    with waiting_lock(target.parent / f"demo-{version}.gen"):
        if (target / ".complete").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".demo-{version}."))
        try:
            generate(tmp)
            (tmp / ".complete").write_text(version)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
