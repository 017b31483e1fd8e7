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

Readers (:class:`VolumeStore`, :func:`complete_names`, :func:`read_settings`,
:func:`check_settings`) see complete volumes only; training, evaluation and indexing call
:func:`check_settings` to refuse a store whose recorded settings differ from their configuration.

Sharding: a job run as shard ``I/N`` (:class:`Shard`, from ``--shard I/N`` or a SLURM job
array) takes the volumes whose name hashes to ``I`` (SHA-256, so the split depends on the names
only, not on the file system's order or on which other volumes exist) and writes them into the
part file ``part-<I>-of-<N>.h5`` of an output folder, a store of its own with the same format,
lock, staging and resume. A folder of parts is read as one store (:class:`VolumeStore`): every
part must have the same kind and settings (a part written otherwise is an error naming it), a
volume in two parts is an error naming both, and missing or unfinished parts are named on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcore.errors import ConfigError, DataError, UserError
from medcore.io import RunLock

FORMAT = "medcore.volumes"
FORMAT_VERSION = 1
_PART = re.compile(r"^part-(\d+)-of-(\d+)\.h5$")
_SLURM_ID, _SLURM_COUNT = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"


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
    """The preprocessing settings a store (a file or a folder of parts) recorded, or None for a
    file that records none."""
    return VolumeStore(path).settings


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


# -- shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): the volumes whose name hashes to it."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str, what: str = "--shard") -> Shard:
        """``"I/N"`` with 1 <= I <= N; anything else is a one-line UserError naming ``what``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise UserError(what, f"{text!r} is not I/N (shard I of N, e.g. 3/10)")
        index, count = int(match[1]), int(match[2])
        if count < 1 or not 1 <= index <= count:
            raise UserError(what, f"{text}: the shard must be one of 1/{count} .. {count}/{count}")
        return cls(index, count)

    @classmethod
    def from_slurm(cls, env: Mapping[str, str] | None = None) -> Shard | None:
        """The shard of a SLURM job array task (``sbatch --array=0-9`` or ``1-10``: the task's
        place among ``SLURM_ARRAY_TASK_COUNT`` tasks from ``SLURM_ARRAY_TASK_MIN`` in steps of
        ``SLURM_ARRAY_TASK_STEP``), None outside a job array."""
        env = os.environ if env is None else env
        if _SLURM_ID not in env or _SLURM_COUNT not in env:
            return None
        try:
            task, count = int(env[_SLURM_ID]), int(env[_SLURM_COUNT])
            low, step = (
                int(env.get("SLURM_ARRAY_TASK_MIN", 0)),
                int(env.get("SLURM_ARRAY_TASK_STEP", 1)),
            )
        except ValueError:
            raise UserError(_SLURM_ID, "SLURM array variables are not integers") from None
        if step < 1 or (task - low) % step:
            raise UserError(_SLURM_ID, f"task {task} is not on the array's grid; give --shard I/N")
        return cls.parse(f"{(task - low) // step + 1}/{count}", f"{_SLURM_ID}={task}")

    def owns(self, name: str) -> bool:
        return shard_of(name, self.count) == self.index

    @property
    def part_name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}.h5"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(name: str, count: int) -> int:
    """The shard (1-based, of ``count``) that volume ``name`` belongs to."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def _part_files(folder: Path) -> list[tuple[Path, int, int]]:
    """(path, index, count) of the part files of ``folder``, sorted by index."""
    found = []
    for path in folder.iterdir():
        match = _PART.match(path.name)
        if match and path.is_file():
            found.append((path, int(match[1]), int(match[2])))
    return sorted(found, key=lambda p: p[1])


def shard_output(folder: str | Path, shard: Shard, kind: str, settings: Mapping[str, Any]) -> Path:
    """The part file of ``shard`` in ``folder``, after checking the parts already there: of the
    same shard count, the same kind and the same settings (else a one-line error naming one)."""
    folder = Path(folder)
    if folder.is_file():
        raise UserError(folder, "is a file; with a shard the output names a folder of part files")
    folder.mkdir(parents=True, exist_ok=True)
    expected = {k: _plain(v) for k, v in settings.items()}
    for path, _, count in _part_files(folder):
        if count != shard.count:
            raise UserError(
                path, f"a part of {count} shards; this job is shard {shard} (use one N per folder)"
            )
        _check_part(path, kind, expected, "this job")
    return folder / shard.part_name


def _check_part(
    path: Path, kind: str | None, settings: Mapping[str, Any] | None, other: str
) -> None:
    """A one-line error unless the part ``path`` has ``kind`` and exactly ``settings``."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FORMAT or (kind and h5.attrs.get("kind") != kind):
                raise DataError(path, f"not a part of a {kind or FORMAT} store")
            recorded = _settings_of(h5) or {}
    except OSError as exc:
        raise DataError(path, f"not a readable HDF5 file ({str(exc)[:100]})") from None
    if settings is None:
        return
    keys = sorted(set(recorded) | set(settings))
    bad = [
        f"{k}={recorded.get(k)}, not {settings.get(k)}"
        for k in keys
        if not _same(recorded.get(k), settings.get(k))
    ]
    if bad:
        raise ConfigError(path, f"written with other settings than {other}: " + "; ".join(bad))


# -- reading -----------------------------------------------------------------------------------


class VolumeStore:
    """A volume store read as one: an HDF5 file, or a folder of part files written by shards.

    ``names`` maps each complete volume to the file that holds it. A file that is not a medcore
    store (written by hand) is read with all its ``/volumes`` datasets. Files are opened lazily
    in each process (an h5py handle must not cross a fork); the object pickles without them.
    """

    def __init__(self, path: str | Path, kind: str | None = None) -> None:
        import h5py

        self.path = Path(path)
        self.kind = kind
        self._open: dict[Path, Any] = {}
        if self.path.is_dir():
            parts = self._parts()
        elif self.path.is_file():
            parts = [self.path]
        else:
            partial = partial_path(self.path)
            hint = f" (an unfinished {partial.name} exists: run the preprocessing again)"
            raise DataError(
                self.path, "volume store not found" + (hint if partial.exists() else "")
            )
        self.parts = parts
        self.names: dict[str, Path] = {}
        self.settings: dict[str, Any] | None = None
        self.attrs: dict[str, Any] = {}
        for k, part in enumerate(parts):
            try:
                with h5py.File(part, "r") as h5:
                    is_store = h5.attrs.get("format") == FORMAT
                    if kind and is_store and h5.attrs.get("kind") != kind:
                        raise DataError(part, f"not a {kind} store (kind {h5.attrs.get('kind')})")
                    if "volumes" not in h5:
                        names: set[str] = set()
                    else:
                        names = complete_names(h5) if is_store else set(h5["volumes"])
                    if k == 0:
                        self.settings = _settings_of(h5)
                        self.attrs = dict(h5.attrs)
                        self.is_store = is_store
            except OSError as exc:
                raise DataError(part, f"not a readable HDF5 file ({str(exc)[:100]})") from None
            if k > 0:
                _check_part(part, self.attrs.get("kind"), self.settings or {}, parts[0].name)
            for name in names:
                if name in self.names:
                    raise DataError(
                        name,
                        f"in two parts of {self.path}: {self.names[name].name} and {part.name}",
                    )
                self.names[name] = part

    def _parts(self) -> list[Path]:
        found = _part_files(self.path)
        if not found:
            raise DataError(self.path, "no part files (part-I-of-N.h5) in the folder")
        counts = sorted({count for _, _, count in found})
        if len(counts) > 1:
            raise DataError(self.path, f"parts of different shard counts {counts} in one folder")
        missing = sorted(set(range(1, counts[0] + 1)) - {index for _, index, _ in found})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            print(
                f"warning: {self.path}: {len(missing)} of {counts[0]} parts missing (shards {shown}); "
                "their volumes are not in the store",
                file=sys.stderr,
            )
        unfinished = sorted(p.name for p in self.path.glob("part-*-of-*.h5.partial"))
        if unfinished:
            print(
                f"warning: {self.path}: {len(unfinished)} unfinished part(s) not read "
                f"({', '.join(unfinished[:3])}): a shard is running or was stopped; run it again",
                file=sys.stderr,
            )
        return [path for path, _, _ in found]

    def dataset(self, name: str) -> Any:
        """The h5py dataset of volume ``name`` (its file opened once per process)."""
        import h5py

        part = self.names.get(name)
        if part is None:
            raise DataError(self.path, f"no volume {name}")
        h5 = self._open.get(part)
        if h5 is None:
            h5 = self._open[part] = h5py.File(part, "r")
        return h5["volumes"][name]

    def read(self, name: str) -> np.ndarray:
        try:
            return self.dataset(name)[()]
        except (KeyError, OSError) as exc:
            raise DataError(
                f"{self.names.get(name, self.path)}:{name}",
                f"cannot read volume ({str(exc)[:100]})",
            ) from None

    def close(self) -> None:
        for h5 in self._open.values():
            h5.close()
        self._open = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # h5py handles do not cross processes


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
