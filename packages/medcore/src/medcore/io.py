"""Safe file I/O shared by every package: atomic writes, run locks, validated CSVs and images."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import DataError, UserError

# A real radiograph or histology tile is far below this; a header claiming more is refused
# before any pixel is decoded (decompression-bomb protection).
MAX_IMAGE_PIXELS = 20_000 * 20_000


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted writer leaves the old file intact.
    The result has the mode ``open()`` gives a new file (0666 less the umask), whatever the
    writer did: safetensors, for one, writes its files 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f".{path.name}.", suffix or (path.suffix + ".tmp"))
    mode = stat.S_IMODE(tmp_path.stat().st_mode)
    try:
        yield tmp_path
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file(directory: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file ``<prefix><random><suffix>`` in ``directory``.

    Its mode is 0666 less the umask, as ``open()`` gives a new file (the kernel applies the
    umask: nothing reads or changes it), not mkstemp's private 0600, which the rename would
    carry to every result file.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = directory / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, flags, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(directory / prefix))


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_default(obj: Any) -> Any:
    """JSON form of numpy scalars/arrays, paths and tensors (``json.dumps(default=...)``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN written as null-safe ``NaN`` per Python's json)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_write_csv(path: str | Path, frame: Any, index: bool = False) -> Path:
    """Write a pandas DataFrame atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
    return Path(path)


class RunLock:
    """An exclusive lock on an output (a run directory, an HDF5 file) held for a job's life.

    A second job writing into the same output is refused with a clear message instead of
    interleaving. The lock is a file holding the owner's PID; a lock whose owner no longer
    runs (the job was killed) is taken over.
    """

    def __init__(self, target: str | Path, directory: bool | None = None) -> None:
        target = Path(target)
        is_dir = target.is_dir() if directory is None else directory
        self.path = target / ".lock" if is_dir else target.with_name(target.name + ".lock")
        self.target = target
        self._nested = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._owner() == os.getpid():
            # Already held by this process (e.g. start_run's lock on the run dir): re-entrant.
            self._nested = True
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _pid_alive(owner):
                    raise UserError(
                        self.target,
                        f"in use by another running job (pid {owner}); wait for it or choose another output",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise UserError(self.target, f"could not take the lock {self.path}")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        if self._nested:
            self._nested = False
            return
        if self._owner() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def waiting_lock(target: str | Path, wait_s: float = 3600.0) -> Iterator[None]:
    """A :class:`RunLock` on ``target`` that waits while another live process holds it.

    For work that a sibling (another DDP rank, a parallel job) may be doing already, such as
    generating the demo data or building an image store: wait, then re-check, instead of refusing.
    """
    deadline = time.monotonic() + wait_s
    lock = RunLock(target, directory=False)
    while True:
        try:
            lock.__enter__()
            break
        except UserError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def safe_join(root: str | Path, name: str) -> Path:
    """``root / name``, refusing names that climb out of ``root`` (``../``, absolute paths)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / name).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise DataError(name, f"path leaves the data directory {root}")
    return candidate


def read_csv(
    path: str | Path,
    required: Sequence[str] = (),
    unique: str | None = None,
    **kwargs: Any,
):
    """Read a CSV with pandas, turning every way it can be broken into a one-line DataError.

    ``required`` columns must be present; ``unique`` names a column whose values must not repeat.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        frame = pd.read_csv(path, encoding="utf-8", **kwargs)
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text (save the CSV as UTF-8)") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "the CSV is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(path, f"cannot parse CSV ({str(exc).splitlines()[0]})") from None
    dupes = [
        c for c in frame.columns if str(c).rsplit(".", 1)[0] in frame.columns and "." in str(c)
    ]
    if dupes:
        raise DataError(path, f"duplicated column(s): {', '.join(map(str, dupes))}")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {', '.join(map(str, frame.columns))})",
        )
    if unique is not None:
        repeated = frame[unique][frame[unique].duplicated()].astype(str).unique().tolist()
        if repeated:
            raise DataError(path, f"duplicated {unique} value(s): {', '.join(repeated[:5])}")
    return frame


def load_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image file to a uint8 array in ``mode`` ("RGB" -> [H, W, 3], "L" -> [H, W]).

    Grayscale, palette, RGBA, 16/32-bit integer and 32-bit float images are converted (the
    deep ones are rescaled from their own min-max range, not clipped; NaN/inf is an error). Corrupt, truncated or implausibly large files raise a DataError.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    path, f"image header claims {img.width}x{img.height} pixels; refusing to decode"
                )
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                if not np.isfinite(arr).all():  # float images (TIFF) can hold NaN/inf
                    raise DataError(path, "contains NaN or infinite pixel values")
                lo, hi = float(arr.min()), float(arr.max())
                scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
            if img.mode == "P":
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA") and mode == "RGB":
                # Composite transparency over black, the background of radiographs and slides.
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img.convert("RGBA"))
            return np.asarray(img.convert(mode), dtype=np.uint8).copy()
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(path, "image is implausibly large (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            path,
            f"cannot decode image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
        ) from None
