"""Raw studies -> fixed-size uint8 volumes in one HDF5 volume store, resumable and atomic.

Per study: read with medcore's reader (canonical orientation: slices inferior -> superior, rows
anterior -> posterior, columns patient right -> left, for DICOM and NIfTI alike), then either
resize to ``target_shape`` (trilinear), or, with ``target_spacing``, resample to that voxel size
and centre it in ``target_shape`` (padded with the window's low end; cropped symmetrically only
where the anatomy is larger than the box, recorded per volume), then window to uint8.

The file is medcore's volume store (:mod:`medcore.volumes.store`, kind ``ctretrieval.volumes``):
``/volumes/<study id>`` uint8 ``[d, h, w]`` with attributes ``source``, ``spacing`` (input mm,
z y x), ``source_shape``, ``pad`` / ``crop`` (voxels before and after, per axis) and
``complete``; file attributes ``format``, ``format_version``, ``kind``, ``settings`` and the
settings ``target_shape``, ``hu_window``, ``target_spacing`` and ``orientation``.

Interruptions: finished studies go into ``<output>.partial`` one by one, flushed, each marked
complete last; a rerun skips studies already complete in the output or the staging file. At the
end the staging file becomes the output (renamed, or appended to an existing output in place),
so the disk holds the archive plus this run's studies, never a second copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctretrieval.config import PreprocessConfig
from ctretrieval.readers import Study, find_studies, read_study
from medcore.cli.run_setup import load_run_config
from medcore.errors import ConfigError, DataError, UserError
from medcore.volumes.geometry import CANONICAL_AXCODES, Volume, center_in_box
from medcore.volumes.store import Shard, VolumeStoreWriter, shard_output

# The identity of the volume stores it writes (their "kind" attribute), not a model's.
STORE_KIND = "ctretrieval.volumes"


def store_settings(cfg: PreprocessConfig) -> dict[str, Any]:
    """The settings a store records and downstream commands compare with their config."""
    return {
        "target_shape": [int(v) for v in cfg.target_shape],
        "hu_window": [float(v) for v in cfg.hu_window],
        "target_spacing": None
        if cfg.target_spacing is None
        else [float(v) for v in cfg.target_spacing],
        "orientation": "".join(CANONICAL_AXCODES),
    }


def _window(vol: torch.Tensor, hu_window: Iterable[float]) -> np.ndarray:
    lo, hi = (float(v) for v in hu_window)
    if hi <= lo:
        raise ConfigError("preprocess.hu_window", f"upper bound {hi} must exceed lower bound {lo}")
    scaled = (vol.clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return scaled.round().to(torch.uint8).numpy()


def to_uint8_volume(
    hu: np.ndarray, target_shape: Iterable[int], hu_window: Iterable[float]
) -> np.ndarray:
    """Resize a HU volume ``[d, h, w]`` to ``target_shape`` (trilinear) and window it to uint8."""
    vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    shape = tuple(int(s) for s in target_shape)
    if tuple(vol.shape[2:]) != shape:
        vol = F.interpolate(vol, size=shape, mode="trilinear", align_corners=False)
    return _window(vol[0, 0], hu_window)


def resample_to_spacing(
    hu: np.ndarray,
    spacing: Iterable[float],
    target_spacing: Iterable[float],
    target_shape: Iterable[int],
    fill: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resample ``hu`` to ``target_spacing`` mm (trilinear), centred in ``target_shape``.

    Returns (float32 volume, {"pad", "crop"}: ``[3, 2]`` voxels added / removed before and after
    along z, y, x). Padding is ``fill``; cropping happens only where the resampled volume is
    larger than the box.
    """
    src = np.asarray(list(spacing), dtype=np.float64)
    dst = np.asarray(list(target_spacing), dtype=np.float64)
    if dst.shape != (3,) or not (dst > 0).all():
        raise ConfigError("preprocess.target_spacing", f"expected three sizes > 0 mm, got {dst}")
    size = tuple(max(1, round(n * s / t)) for n, s, t in zip(hu.shape, src, dst, strict=True))
    vol = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    if size != tuple(hu.shape):
        vol = F.interpolate(vol, size=size, mode="trilinear", align_corners=False)
    out, pad, crop = center_in_box(vol[0, 0].numpy(), tuple(int(v) for v in target_shape), fill)
    return out, {"pad": pad, "crop": crop}


def fit_volume(volume: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """A read study -> (uint8 ``target_shape`` volume, attributes stored with it)."""
    attrs: dict[str, Any] = {
        "source": str(volume.meta.get("path", "")),
        "spacing": np.asarray(volume.spacing, dtype=np.float64),
        "source_shape": np.asarray(volume.shape, dtype=np.int64),
    }
    if cfg.target_spacing is None:
        return to_uint8_volume(volume.voxels, cfg.target_shape, cfg.hu_window), attrs
    hu, box = resample_to_spacing(
        volume.voxels, volume.spacing, cfg.target_spacing, cfg.target_shape, cfg.hu_window[0]
    )
    return _window(torch.from_numpy(hu), cfg.hu_window), {**attrs, **box}


def _process_one(study: Study, cfg: PreprocessConfig) -> tuple[str, Any, Any, dict[str, str]]:
    """(id, uint8 volume or None, its attributes or the reason it was skipped, rejected series)."""
    try:
        volume = read_study(study, cfg.min_slices)
        voxels, attrs = fit_volume(volume, cfg)
    except DataError as exc:
        reason = f"{exc.what}: {exc.why}" if exc.what != study.id else exc.why
        return study.id, None, reason, {}
    return study.id, voxels, attrs, volume.meta.get("rejected_series", {})


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core already; more threads would oversubscribe


def _run(todo: list[Study], cfg: PreprocessConfig, workers: int) -> Iterator[tuple]:
    """Results of ``_process_one`` as studies finish, in ``workers`` processes."""
    if workers <= 1 or len(todo) <= 1:
        yield from (_process_one(s, cfg) for s in todo)
        return
    ctx = get_context("spawn")  # forking after torch started its threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_process_one, s, cfg) for s in todo]
        for fut in as_completed(futures):
            yield fut.result()


@dataclass
class PreprocessReport:
    written: int
    skipped: dict[str, str]
    already_done: int
    total_in_file: int
    output: Path | None = None


def preprocess(
    input_dir: str | Path,
    output: str | Path,
    cfg: PreprocessConfig,
    show_progress: bool = True,
    shard: Shard | None = None,
) -> PreprocessReport:
    """Preprocess every study of ``input_dir`` into ``output`` (see the module docstring); with
    ``shard``, only that shard's studies, into its part file of the folder ``output``."""
    output = Path(output)
    if shard is None and output.is_dir():
        raise UserError(
            output, "is a folder (of shard parts?): name an HDF5 file, or give --shard I/N"
        )
    if len(cfg.target_shape) != 3 or min(cfg.target_shape) < 1:
        raise ConfigError(
            "preprocess.target_shape", f"expected three positive sizes, got {cfg.target_shape}"
        )
    studies = find_studies(input_dir)
    if not studies:
        raise DataError(
            input_dir, "no studies found (expected one DICOM folder or NIfTI file per study)"
        )
    if shard is not None:
        output = shard_output(output, shard, STORE_KIND, store_settings(cfg))
        total_studies = len(studies)
        studies = [s for s in studies if shard.owns(s.id)]
        print(f"shard {shard}: {len(studies)} of the {total_studies} studies", file=sys.stderr)
    with VolumeStoreWriter(output, STORE_KIND, store_settings(cfg), chunks="slice") as store:
        done = store.done
        todo = [s for s in studies if s.id not in done]
        skipped: dict[str, str] = {}
        written = 0
        workers = cfg.workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(todo), desc="preprocess", disable=not show_progress or not todo)
        for study_id, voxels, info, rejected in _run(todo, cfg, workers):
            for series, why in rejected.items():
                tqdm.write(f"note: {study_id}: {series} not used: {why}", file=sys.stderr)
            if voxels is None:
                skipped[study_id] = info
                tqdm.write(f"skipped {study_id}: {info}", file=sys.stderr)
            else:
                store.write(study_id, voxels, info)
                written += 1
            bar.update(1)
        bar.close()
        if not store.done and studies:
            raise DataError(
                input_dir,
                f"none of the {len(studies)} studies could be read ({len(skipped)} skipped)",
            )
        total = store.finish()
    return PreprocessReport(written, skipped, len(done & {s.id for s in studies}), total, output)


def main(args: argparse.Namespace) -> int:
    """``ctretrieval-preprocess`` with parsed arguments (see :mod:`ctretrieval.cli`): the
    preprocess section of ``--config`` on the defaults, then ``--set`` and the flags."""
    from ctretrieval.config import CTRetrievalConfig

    flags = {k: getattr(args, k) for k in ("workers", "min_slices", "hu_window", "target_spacing")}
    items = [f"preprocess.{k}={v}" for k, v in {"target_shape": args.shape, **flags}.items()]
    args.overrides = [*args.overrides, *(i for i in items if not i.endswith("=None"))]
    cfg = load_run_config(
        args, CTRetrievalConfig, "ctretrieval", sections=("preprocess",), base={}
    ).preprocess
    shard = None
    if args.shard is not None:
        shard = Shard.parse(args.shard)
    elif (shard := Shard.from_slurm()) is not None:
        print(f"note: shard {shard} from the SLURM job array (--shard to choose)", file=sys.stderr)
    report = preprocess(args.input, args.output, cfg, shard=shard)
    print(
        f"{report.output}: {report.written} studies written, {len(report.skipped)} skipped, "
        f"{report.already_done} already done; {report.total_in_file} volumes in the file"
    )
    return 0
