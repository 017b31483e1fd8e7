"""The HDF5 volume store shared by the CT packages: format, resumable writer, settings check.

Layout (format ``medcore.volumes.reader``, version :data:`FORMAT_VERSION`):

- ``/volumes/<name>``: one dataset per volume (a package's fixed-shape uint8 ``[d, h, w]``),
  with the package's per-volume attributes and ``complete = 1``, set only after its data is in;
- file attributes: ``format``, ``format_version``, ``kind`` (the writing package, e.g.
  ``ctclip.volumes``), ``settings`` (JSON of the preprocessing settings) and each setting again
  as its own attribute (``target_shape``, ``hu_window`` ...) for ``h5ls`` and older readers.

Writing (:class:`VolumeStoreWriter`): the job holds the output's lock (a second job is refused)
and writes finished volumes into a staging store ``<out>.partial``, flushed after each volume,
so a killed job loses at most the volume in flight (no ``complete`` mark: dropped on reopening)
and the finished ``<out>`` is never opened for writing while volumes are computed. When the job
ends, the staging store becomes the output: renamed when there is no output yet, otherwise its
volumes are appended to the existing output in place (each one marked complete after its copy;
a kill here is resumed by the next run) and the staging file is deleted. Nothing is ever
copied whole: disk use stays the archive plus the volumes of the current run.

Readers (:func:`complete_names`, :func:`read_settings`, :func:`check_settings`) see complete
volumes only; training, evaluation and indexing call :func:`check_settings` to refuse a store
whose recorded settings differ from their configuration.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import ConfigError, DataError
from medcore.io import RunLock

FORMAT = "medcore.volumes"
FORMAT_VERSION = 1


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _plain(value: Any) -> Any:
    """JSON-comparable form of a setting (tuples and arrays become lists of Python scalars)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def complete_names(h5: Any) -> set[str]:
    """Names of the volumes of an open store that carry the ``complete`` mark."""
    group = h5.get("volumes")
    if group is None:
        return set()
    return {name for name, ds in group.items() if ds.attrs.get("complete", 0) == 1}


def _settings_of(h5: Any) -> dict[str, Any] | None:
    raw = h5.attrs.get("settings")
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The preprocessing settings a store recorded, or None for a file that records none."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "volume store not found")
    try:
        with h5py.File(path, "r") as h5:
            return _settings_of(h5)
    except OSError as exc:
        raise DataError(path, f"not a readable HDF5 file ({str(exc)[:100]})") from None


def _mismatches(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    out = []
    for key, want in expected.items():
        if want is None:
            continue
        if key not in recorded:
            out.append(f"{key} not recorded (expected {_plain(want)})")
        elif not _same(recorded[key], want):
            out.append(f"{key}={_plain(recorded[key])}, not {_plain(want)}")
    return out


def check_settings(
    path: str | Path, expected: Mapping[str, Any], hint: str = ""
) -> dict[str, Any] | None:
    """The store's recorded settings after checking them against ``expected``.

    A key of ``expected`` with value None is not checked. A difference is a one-line
    :class:`ConfigError` naming every differing setting (``hint`` says how to fix it). A store
    that records no settings (written by hand or by an old version) is named on stderr and not
    checked.
    """
    recorded = read_settings(path)
    if recorded is None:
        print(
            f"warning: {path}: records no preprocessing settings; not checked against the config",
            file=sys.stderr,
        )
        return None
    bad = _mismatches(recorded, expected)
    if bad:
        raise ConfigError(
            path, "written with other settings: " + "; ".join(bad) + (f" ({hint})" if hint else "")
        )
    return recorded


class VolumeStoreWriter:
    """Resumable writer of one store (see the module docstring); use as a context manager.

    ``kind`` names the writing package's layout; ``settings`` (JSON-serialisable) are recorded
    in the file and must match those of an existing output or staging file (else ConfigError).
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        settings: Mapping[str, Any],
        compression: str | None = None,
        chunks: str = "volume",
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.kind = kind
        self.settings = {k: _plain(v) for k, v in settings.items()}
        self.compression = None if compression in (None, "none") else compression
        self.chunks = chunks  # "volume": one chunk per volume; "slice": one per slice
        self._lock = RunLock(self.path)
        self._h5 = None
        self.existing: set[str] = set()  # complete volumes of the output
        self.staged: set[str] = set()  # complete volumes of the staging store

    # -- opening ---------------------------------------------------------------------------

    def _check(self, h5: Any, where: Path) -> None:
        if h5.attrs.get("format") != FORMAT or h5.attrs.get("kind") != self.kind:
            raise DataError(where, f"not a {self.kind} volume store; use another output file")
        if int(h5.attrs.get("format_version", 0)) != FORMAT_VERSION:
            raise DataError(
                where,
                f"store format version {h5.attrs.get('format_version')} (this writer: "
                f"{FORMAT_VERSION}); use another output file",
            )
        bad = _mismatches(_settings_of(h5) or {}, self.settings)
        if bad:
            raise ConfigError(
                where,
                "was written with other settings ("
                + "; ".join(bad)
                + "); use the same settings or another output file",
            )

    def _init_attrs(self, h5: Any) -> None:
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["kind"] = self.kind
        h5.attrs["settings"] = json.dumps(self.settings, sort_keys=True)
        for key, value in self.settings.items():
            if value is not None:
                h5.attrs[key] = np.asarray(value) if isinstance(value, list) else value
        h5.create_group("volumes")

    def _open_partial(self) -> Any:
        import h5py

        if self.partial.exists():
            try:
                h5 = h5py.File(self.partial, "a")
            except OSError as exc:
                aside = self.partial.with_name(self.partial.name + ".unreadable")
                os.replace(self.partial, aside)
                print(
                    f"warning: {self.partial}: unreadable after an interruption "
                    f"({str(exc)[:80]}); moved to {aside.name}, its volumes are redone",
                    file=sys.stderr,
                )
                return self._open_partial()
            try:
                self._check(h5, self.partial)
            except Exception:
                h5.close()
                raise
            group = h5.require_group("volumes")
            for name in [n for n, ds in group.items() if ds.attrs.get("complete", 0) != 1]:
                del group[name]  # half-written before an interruption
            return h5
        h5 = h5py.File(self.partial, "w")
        self._init_attrs(h5)
        return h5

    def __enter__(self) -> VolumeStoreWriter:
        import h5py

        self._lock.__enter__()
        try:
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)  # under the lock: no other job writes them
            if self.path.exists():
                try:
                    with h5py.File(self.path, "r") as h5:
                        self._check(h5, self.path)
                        self.existing = complete_names(h5)
                except OSError as exc:
                    raise DataError(
                        self.path,
                        f"not a readable HDF5 file ({str(exc)[:100]}); use another output",
                    ) from None
            self._h5 = self._open_partial()
            self.staged = complete_names(self._h5)
        except BaseException:
            self._close()
            self._lock.__exit__(None, None, None)
            raise
        return self

    @property
    def done(self) -> set[str]:
        """Volumes already complete in the output or in the staging store."""
        return self.existing | self.staged

    # -- writing ---------------------------------------------------------------------------

    def write(self, name: str, voxels: np.ndarray, attrs: Mapping[str, Any] | None = None) -> None:
        """Stage one volume: data, then attributes, then the ``complete`` mark, then a flush."""
        group = self._h5["volumes"]
        if name in group:
            del group[name]
        chunks = voxels.shape if self.chunks == "volume" else (1, *voxels.shape[1:])
        ds = group.create_dataset(name, data=voxels, chunks=chunks, compression=self.compression)
        for key, value in (attrs or {}).items():
            ds.attrs[key] = value
        ds.attrs["complete"] = 1  # last: a volume without it is redone on resume
        self._h5.flush()
        self.staged.add(name)

    def finish(self) -> int:
        """Make the staged volumes part of the output (see the module docstring); volume count."""
        import h5py

        self._close()
        if not self.path.exists():
            os.replace(self.partial, self.path)
            return len(self.staged)
        if not self.staged:
            self.partial.unlink()
            return len(self.existing)
        with h5py.File(self.partial, "r") as src, h5py.File(self.path, "a") as dst:
            out = dst.require_group("volumes")
            for name in [n for n, ds in out.items() if ds.attrs.get("complete", 0) != 1]:
                del out[name]  # a copy cut short by an earlier kill
            for name in sorted(complete_names(src) - complete_names(dst)):
                # Raw chunks, not re-encoded; the complete mark goes on last, as in write().
                src.copy(src["volumes"][name], out, name=name, without_attrs=True)
                for key, value in src["volumes"][name].attrs.items():
                    if key != "complete":
                        out[name].attrs[key] = value
                out[name].attrs["complete"] = 1
                dst.flush()
            count = len(complete_names(dst))
        self.partial.unlink()
        return count

    def _close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __exit__(self, *exc: object) -> None:
        self._close()
        if not self.staged and self.partial.exists():
            self.partial.unlink()  # nothing staged: leave no empty file behind
        self._lock.__exit__(*exc)
