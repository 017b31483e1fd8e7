"""Prediction: raw studies and HU arrays -> the volumes preprocess stores -> embeddings.

One path for every raw input of a trained model (``ctretrieval.load(...).embed`` and
``.search``, a raw query of ``ctretrieval-search``): a DICOM folder or NIfTI file is read by
medcore's readers (:func:`ctretrieval.readers.read_study`), an array in HU is checked as a read
study is (:func:`ctretrieval.readers.check_volume`), and both are fitted by preprocess's
per-volume function (:func:`ctretrieval.preprocess.fit_volume`), so the model sees exactly the
volume ``ctretrieval-preprocess`` would have stored. The volumes are then embedded by the loop
evaluation and indexing use (:func:`ctretrieval.metrics.embed`), in the checkpoint's precision.

Arrays are ``[slices, rows, columns]`` in HU in the canonical orientation the readers give
(slices inferior -> superior, rows anterior -> posterior, columns patient right -> left). A
model trained on volumes resampled to a voxel size (``preprocess.target_spacing``) needs the
spacing: pass a :class:`medcore.volumes.geometry.Volume` instead of a bare array.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctretrieval.config import PreprocessConfig
from ctretrieval.metrics import embed
from ctretrieval.preprocess import fit_volume
from ctretrieval.readers import check_volume, read_study, study_at
from medcore.engine.inference import PredictOptions
from medcore.errors import DataError
from medcore.volumes.geometry import CANONICAL_AXCODES, Volume

Item = str | Path | np.ndarray | torch.Tensor | Volume


@dataclass
class Embeddings:
    """Embeddings of named volumes, in input order, the unreadable ones left out.

    ``embeddings`` ``[n, e]`` float32, L2-normalised (cosine similarity is a dot product);
    ``probs`` ``[n, c]`` the head's finding probabilities (None for a model without a head);
    ``skipped``: name -> why, for the inputs that could not be read.
    """

    names: list[str]
    embeddings: torch.Tensor
    probs: torch.Tensor | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def preprocess_for(prep: PreprocessConfig, store: Mapping[str, Any] | None) -> PreprocessConfig:
    """``prep`` with a volume store's recorded settings (``store``: what an index records of the
    archive it embeds), so that a raw study is preprocessed as the archive was."""
    if not store:
        return prep
    spacing = store.get("target_spacing")
    return dataclasses.replace(
        prep,
        target_shape=tuple(int(v) for v in store["target_shape"]),
        hu_window=tuple(float(v) for v in store["hu_window"]),
        target_spacing=None if spacing is None else tuple(float(v) for v in spacing),
    )


def named_items(volumes: Any, names: Iterable[str] | None = None) -> list[tuple[str, Item]]:
    """``(name, item)`` of one input or many: a path, an array, a medcore Volume, a list of
    these, a mapping name -> item, or a 4-D array (a stack of volumes). A path is named by its
    study id (the folder's name, the NIfTI file's without suffix), an array by its position."""
    if isinstance(volumes, Mapping):
        pairs = [(str(k), v) for k, v in volumes.items()]
    else:
        if isinstance(volumes, (str, Path, Volume)) or (
            isinstance(volumes, (np.ndarray, torch.Tensor)) and volumes.ndim != 4
        ):
            volumes = [volumes]
        pairs = [(_default_name(item, i), item) for i, item in enumerate(volumes)]
    if names is not None:
        given = [str(n) for n in names]
        if len(given) != len(pairs):
            raise DataError("names", f"{len(given)} names for {len(pairs)} volumes")
        pairs = [(n, item) for n, (_, item) in zip(given, pairs, strict=True)]
    return pairs


def _default_name(item: Any, position: int) -> str:
    if isinstance(item, (str, Path)):
        try:
            return study_at(item).id
        except DataError:
            return str(item)  # named by its path; reading it will say what is wrong
    if isinstance(item, Volume) and item.meta.get("path"):
        return str(item.meta["path"])
    return f"volume_{position}"


def prepare(name: str, item: Item, prep: PreprocessConfig) -> tuple[np.ndarray, Volume]:
    """The uint8 volume ``ctretrieval-preprocess`` would store for ``item`` (and the read
    volume); a DataError naming ``name`` when it cannot be read or fitted."""
    if isinstance(item, (str, Path)):
        volume = read_study(study_at(item), prep.min_slices)
    elif isinstance(item, Volume):
        volume = check_volume(item, name, prep.min_slices)
    elif isinstance(item, (np.ndarray, torch.Tensor)):
        volume = check_volume(_array_volume(name, item, prep), name, prep.min_slices)
    else:
        raise DataError(
            name, f"not a volume: {type(item).__name__} (a path, an HU array or a Volume)"
        )
    voxels, _ = fit_volume(volume, prep)
    return voxels, volume


def _array_volume(name: str, item: np.ndarray | torch.Tensor, prep: PreprocessConfig) -> Volume:
    array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim != 3:
        raise DataError(name, f"expected an HU volume [slices, rows, columns], got {array.shape}")
    if array.dtype == np.uint8:
        raise DataError(
            name, "a uint8 array looks preprocessed already: pass the volume in HU (float or int16)"
        )
    if prep.target_spacing is not None:
        raise DataError(
            name,
            f"this model resamples to {list(prep.target_spacing)} mm and an array carries no "
            "voxel spacing: pass a medcore Volume, or the DICOM folder / NIfTI file",
        )
    # Resizing to target_shape reads only the voxels; unit spacing stands for "not given".
    return Volume(
        np.asarray(array, dtype=np.float32),
        np.eye(4),
        (1.0, 1.0, 1.0),
        CANONICAL_AXCODES,
        {"path": name},
    )


def prepared(
    pairs: list[tuple[str, Item]], prep: PreprocessConfig, skipped: dict[str, str]
) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, uint8 volume)`` of each readable input, in order; an unreadable one is named
    on stderr (``skipped <name>: <why>``) and recorded in ``skipped``."""
    for name, item in pairs:
        try:
            voxels, volume = prepare(name, item, prep)
        except DataError as exc:
            why = f"{exc.what}: {exc.why}" if exc.what != name else exc.why
            skipped[name] = why
            print(f"skipped {name}: {why}", file=sys.stderr)
            continue
        for series, why in volume.meta.get("rejected_series", {}).items():
            print(f"note: {name}: {series} not used: {why}", file=sys.stderr)
        yield name, voxels


def embed_prepared(
    model: nn.Module, volumes: list[tuple[str, np.ndarray]], options: PredictOptions
) -> Embeddings:
    """Embeddings of named uint8 volumes as :func:`prepare` (or a volume store) gives them."""
    data = [{"volume": torch.from_numpy(v), "labels": torch.zeros(0)} for _, v in volumes]
    out = embed(model, data, options)
    return Embeddings([n for n, _ in volumes], out.emb, out.probs)


def embed_volumes(
    model: nn.Module,
    pairs: list[tuple[str, Item]],
    prep: PreprocessConfig,
    options: PredictOptions,
) -> Embeddings:
    """Embeddings of ``pairs`` (see :func:`named_items`), ``options.batch_size`` volumes in
    memory at a time. Unreadable inputs are skipped, named and counted; none readable is a
    DataError."""
    parts: list[Embeddings] = []
    skipped: dict[str, str] = {}
    batch: list[tuple[str, np.ndarray]] = []
    for pair in prepared(pairs, prep, skipped):
        batch.append(pair)
        if len(batch) == options.batch_size:
            parts.append(embed_prepared(model, batch, options))
            batch = []
    if batch:
        parts.append(embed_prepared(model, batch, options))
    if skipped:
        print(f"warning: {len(skipped)} of {len(pairs)} volume(s) skipped", file=sys.stderr)
    if not parts:
        raise DataError(
            "volumes", f"none of the {len(pairs)} volume(s) could be read ({len(skipped)} skipped)"
        )
    probs = [p.probs for p in parts]
    return Embeddings(
        [n for p in parts for n in p.names],
        torch.cat([p.embeddings for p in parts]),
        None if probs[0] is None else torch.cat(probs),  # type: ignore[arg-type]
        skipped,
    )


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a model's weights (names, dtypes, shapes, bytes): an index records the
    one of the model that embedded it, so that a query is never embedded by another model."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
