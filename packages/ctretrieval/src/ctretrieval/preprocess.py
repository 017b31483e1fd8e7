"""Raw studies -> fixed-size uint8 volumes in one HDF5 file, resumable and atomic.

HDF5 layout: ``/volumes/<study id>`` uint8 ``[d, h, w]``; root attributes ``format``,
``target_shape`` and ``hu_window``.

How it survives interruptions: every finished study is first written on its own, atomically,
as ``<output>.parts/<id>.npy``; a rerun skips studies already in the HDF5 file or in the parts
folder. Only when every study is done is a new HDF5 file assembled (the old one's volumes plus
the parts) beside the output and renamed over it, so the output is always either the previous
complete file or the new complete file, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctretrieval.config import PreprocessConfig
from ctretrieval.readers import Study, find_studies, read_study
from medcore.errors import ConfigError, DataError
from medcore.io import RunLock, atomic_path

FORMAT = "ctretrieval.volumes/1"


def to_uint8_volume(
    hu: np.ndarray, target_shape: Iterable[int], hu_window: Iterable[float]
) -> np.ndarray:
    """Resize a HU volume ``[d, h, w]`` to ``target_shape`` (trilinear) and window it to uint8."""
    lo, hi = (float(v) for v in hu_window)
    if hi <= lo:
        raise ConfigError("preprocess.hu_window", f"upper bound {hi} must exceed lower bound {lo}")
    vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    shape = tuple(int(s) for s in target_shape)
    if tuple(vol.shape[2:]) != shape:
        vol = F.interpolate(vol, size=shape, mode="trilinear", align_corners=False)
    scaled = (vol[0, 0].clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return scaled.round().to(torch.uint8).numpy()


def _parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _process_one(study: Study, cfg: PreprocessConfig, parts: Path) -> tuple[str, str | None]:
    """Read, resize and window one study into ``parts/<id>.npy``; (id, reason it was skipped)."""
    try:
        hu = read_study(study, cfg.min_slices)
        volume = to_uint8_volume(hu, cfg.target_shape, cfg.hu_window)
    except DataError as exc:
        return study.id, f"{exc.what}: {exc.why}" if exc.what != study.id else exc.why
    with atomic_path(parts / f"{study.id}.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, volume)
    return study.id, None


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core already; more threads would oversubscribe


def _existing_ids(output: Path, cfg: PreprocessConfig) -> list[str]:
    """Ids already in ``output``; refuses a file written with other settings."""
    import h5py

    if not output.exists():
        return []
    try:
        with h5py.File(output, "r") as f:
            shape = tuple(int(v) for v in f.attrs.get("target_shape", ()))
            window = tuple(float(v) for v in f.attrs.get("hu_window", ()))
            ids = list(f["volumes"].keys()) if "volumes" in f else []
    except OSError as exc:
        raise DataError(
            output, f"not a readable HDF5 file ({str(exc)[:100]}); delete it to rebuild"
        ) from None
    if shape != tuple(cfg.target_shape) or window != tuple(float(v) for v in cfg.hu_window):
        raise ConfigError(
            output,
            f"was written with shape {shape} and HU window {window}; use the same settings or another --output",
        )
    return ids


def _assemble(output: Path, parts: Path, cfg: PreprocessConfig, had_existing: bool) -> int:
    """Write old volumes + parts into a new HDF5 file and move it over ``output``; volume count."""
    import h5py

    part_files = sorted(parts.glob("*.npy")) if parts.is_dir() else []
    with atomic_path(output, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as dst:
        dst.attrs["format"] = FORMAT
        dst.attrs["target_shape"] = np.asarray(cfg.target_shape, dtype=np.int64)
        dst.attrs["hu_window"] = np.asarray(cfg.hu_window, dtype=np.float64)
        group = dst.create_group("volumes")
        if had_existing:
            with h5py.File(output, "r") as src:
                for key in src["volumes"]:
                    src.copy(src["volumes"][key], group, name=key)
        for path in tqdm(part_files, desc="writing HDF5", leave=False, disable=not part_files):
            volume = np.load(path, allow_pickle=False)
            group.create_dataset(path.stem, data=volume, chunks=(1, *volume.shape[1:]))
        count = len(group)
    shutil.rmtree(parts, ignore_errors=True)
    return count


def _remove_stale_temp_files(output: Path, parts: Path) -> None:
    """Temp files a killed run left (an HDF5 file half assembled, a study half saved).

    Only called under the output's lock: no other job can be writing them.
    """
    for stale in [*output.parent.glob(f".{output.name}.*.tmp"), *parts.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)


def _run(
    todo: list[Study], cfg: PreprocessConfig, parts: Path, workers: int
) -> Iterator[tuple[str, str | None]]:
    """(id, skip reason) of each study as it finishes, in ``workers`` processes."""
    if workers <= 1 or len(todo) <= 1:
        yield from (_process_one(s, cfg, parts) for s in todo)
        return
    ctx = get_context("spawn")  # forking after torch started its threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_process_one, s, cfg, parts) for s in todo]
        for fut in as_completed(futures):
            yield fut.result()


@dataclass
class PreprocessReport:
    written: int
    skipped: dict[str, str]
    already_done: int
    total_in_file: int


def preprocess(
    input_dir: str | Path, output: str | Path, cfg: PreprocessConfig, show_progress: bool = True
) -> PreprocessReport:
    """Preprocess every study of ``input_dir`` into ``output`` (see the module docstring)."""
    output = Path(output)
    if len(cfg.target_shape) != 3 or min(cfg.target_shape) < 1:
        raise ConfigError(
            "preprocess.target_shape", f"expected three positive sizes, got {cfg.target_shape}"
        )
    studies = find_studies(input_dir)
    if not studies:
        raise DataError(
            input_dir, "no studies found (expected one DICOM folder or NIfTI file per study)"
        )
    with RunLock(output):
        existing = set(_existing_ids(output, cfg))
        parts = _parts_dir(output)
        parts.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(output, parts)
        done = existing | {p.stem for p in parts.glob("*.npy")}
        todo = [s for s in studies if s.id not in done]
        skipped: dict[str, str] = {}
        written = 0
        workers = cfg.workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(todo), desc="preprocess", disable=not show_progress or not todo)
        for study_id, reason in _run(todo, cfg, parts, workers):
            if reason is None:
                written += 1
            else:
                skipped[study_id] = reason
                tqdm.write(f"skipped {study_id}: {reason}", file=sys.stderr)
            bar.update(1)
        bar.close()
        pending = any(parts.glob("*.npy"))
        if not existing and not pending:
            shutil.rmtree(parts, ignore_errors=True)
            raise DataError(
                input_dir,
                f"none of the {len(studies)} studies could be read ({len(skipped)} skipped)",
            )
        total = _assemble(output, parts, cfg, bool(existing)) if pending else len(existing)
    return PreprocessReport(written, skipped, len(done & {s.id for s in studies}), total)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from medcore.config import load_config

    parser = argparse.ArgumentParser(
        prog="ctretrieval-preprocess",
        description="DICOM series / NIfTI files -> uint8 volumes in one HDF5 file",
    )
    parser.add_argument(
        "--input", type=Path, required=True, help="one DICOM folder or NIfTI file per study"
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="HDF5 file to write (resumed if it exists)"
    )
    parser.add_argument(
        "--config", type=Path, help="YAML whose preprocess: section sets the options"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set preprocess.min_slices=32",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("SLICES", "H", "W"),
        help="target size (default 300 270 270)",
    )
    parser.add_argument(
        "--hu-window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="HU window (default -1000 400)",
    )
    parser.add_argument(
        "--workers", type=int, help="worker processes (default: one per core, at most 8)"
    )
    parser.add_argument("--min-slices", type=int, help="skip series with fewer slices")
    args = parser.parse_args(argv)

    from ctretrieval.config import CTRetrievalConfig

    items = list(args.overrides)
    for flag, key in (
        ("shape", "target_shape"),
        ("hu_window", "hu_window"),
        ("workers", "workers"),
        ("min_slices", "min_slices"),
    ):
        value = getattr(args, flag)
        if value is not None:
            items.append(f"preprocess.{key}={list(value) if isinstance(value, list) else value}")
    cfg = load_config(CTRetrievalConfig, args.config, overrides=items).preprocess
    report = preprocess(args.input, args.output, cfg)
    print(
        f"{args.output}: {report.written} studies written, {len(report.skipped)} skipped, "
        f"{report.already_done} already done; {report.total_in_file} volumes in the file"
    )
    return 0
