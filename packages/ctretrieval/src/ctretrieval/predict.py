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

Searching an index (:class:`ctretrieval.index.Index`) is here too: a query, an id of the index
or a raw study, ranked against the archive (:func:`search`, :func:`ranked`), by the model that
embedded it (:func:`check_model`); :func:`load_model` rebuilds a checkpoint's model.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ctretrieval.config import EvalConfig, PreprocessConfig
from ctretrieval.metrics import embed, knn_label_scores
from ctretrieval.model import KINDS, Proximity100x100, build_model, stored_config
from ctretrieval.preprocess import fit_volume
from ctretrieval.readers import NIFTI_SUFFIXES, check_volume, read_study, study_at
from medcore.config import from_dict
from medcore.engine import inference
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import DataError
from medcore.volumes.geometry import CANONICAL_AXCODES, Volume

if TYPE_CHECKING:  # the index module builds on this one
    from ctretrieval.index import Index

Item = str | Path | np.ndarray | torch.Tensor | Volume


def load_model(
    path: str | Path, device: torch.device, state: dict[str, Any] | None = None
) -> tuple[Proximity100x100, dict[str, Any]]:
    """The model of a ctretrieval checkpoint (rebuilt by :func:`ctretrieval.model.build_model`
    from its stored config) and the checkpoint; ``state``: the checkpoint already read."""
    model, state = inference.load_model(
        path, KINDS, lambda s: build_model(stored_config(s)), device=device, state=state
    )
    return model, state  # type: ignore[return-value]


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


def check_model(index: Index, fingerprint: str, embedding_size: int, model: str) -> None:
    """A DataError unless ``index`` was embedded by the model ``model`` names (its weights'
    fingerprint and embedding size): embeddings of two models are not comparable."""
    size = index.embeddings.shape[1] if index.embeddings.ndim == 2 else None
    if size != embedding_size:
        raise DataError(
            "index", f"holds {size}-d embeddings, {model} gives {embedding_size}-d: rebuild it"
        )
    recorded = index.meta.get("weights")
    if recorded is None:
        print(
            "note: the index records no weights fingerprint (an older file): its model "
            f"cannot be checked against {model}",
            file=sys.stderr,
        )
    elif recorded != fingerprint:
        raise DataError(
            "index",
            f"embedded by another model (weights {recorded}, {model} has {fingerprint}): "
            "build the index with this model",
        )


def _query_from_path(
    path: Path, checkpoint: Path, device: torch.device, index: Index
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embedding (and head probabilities) of a raw study, a DICOM folder or a NIfTI file, by
    ``checkpoint``, which must be the model that embedded ``index`` (:func:`check_model`).

    The study is preprocessed as ``ctretrieval-preprocess`` stored the archive (the index's
    record of the store's settings), falling back to the checkpoint's settings for an index of
    a store that records none (:func:`preprocess_for`).
    """
    model, state = load_model(checkpoint, device)
    check_model(index, weights_fingerprint(state["model"]), model.embedding_size, str(checkpoint))
    prep = from_dict(PreprocessConfig, state.get("preprocess_config", {}))
    prep = preprocess_for(prep, index.meta.get("store_settings"))
    name, item = named_items([path])[0]
    voxels, _ = prepare(name, item, prep)  # the only item: unreadable is an error, not a skip
    options = PredictOptions(device, checkpoint_precision(state, device), 1, 0, False, None)
    out = embed_prepared(model, [(name, voxels)], options)
    return out.embeddings[0], None if out.probs is None else out.probs[0]


def stored_query(index: Index, query_id: str) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(embedding, row, findings as a bool vector or None when unlabelled) of an index id."""
    row = [str(i) for i in index.ids].index(query_id)
    hot = torch.from_numpy(index.labels[row] > 0) if index.has_labels[row] else None
    return torch.from_numpy(index.embeddings[row]), row, hot


def ranked(
    index: Index,
    q_emb: torch.Tensor,
    top_k: int,
    *,
    exclude: int | None = None,
    q_hot: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    threshold: float,
    knn_k: int,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(query findings, top-k rows) of a query embedding against ``index``.

    The query's findings are ``q_hot`` (a study of the index), else the head's ``probs`` at
    ``threshold``, else, for a model without a head, the fraction of its ``knn_k`` nearest
    labelled studies that have each finding, at ``threshold``. Rows: ``rank``, ``id``,
    ``similarity`` (cosine), the study's ``findings`` (``?`` when unlabelled) and the
    ``shared_findings``. ``exclude``: a row of the index left out (the query itself).
    """
    emb = torch.from_numpy(np.asarray(index.embeddings, dtype=np.float32))
    labels = torch.from_numpy(np.asarray(index.labels).astype(np.float32))
    names = index.meta["class_names"]
    if q_hot is None:
        if probs is None:  # no head: the findings its nearest labelled studies agree on
            known = torch.from_numpy(np.asarray(index.has_labels, dtype=bool))
            if known.any():
                probs = knn_label_scores(q_emb[None], emb[known], labels[known], k=knn_k)[0]
        q_hot = None if probs is None else probs >= threshold
    q_findings = (
        [] if q_hot is None else [n for n, h in zip(names, q_hot.tolist(), strict=True) if h]
    )
    sim = emb @ q_emb.float()
    if exclude is not None:
        sim[exclude] = -torch.inf
    top = sim.topk(min(top_k, len(index) - int(exclude is not None)))
    rows = []
    for rank, (score, j) in enumerate(
        zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1
    ):
        found = (
            [n for n, v in zip(names, labels[j].tolist(), strict=True) if v > 0]
            if index.has_labels[j]
            else []
        )
        rows.append(
            {
                "rank": rank,
                "id": str(index.ids[j]),
                "similarity": float(score),
                "findings": ";".join(found) or ("?" if not index.has_labels[j] else ""),
                "shared_findings": ";".join(f for f in found if f in q_findings),
            }
        )
    return q_findings, rows


def search(
    index: Index,
    query: str,
    top_k: int,
    device: torch.device,
    checkpoint: Path | None = None,
    threshold: float | None = None,
    knn_k: int | None = None,
) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(query id, query findings, top-k rows) for an index id or a raw study path.

    A raw study (a DICOM folder or a NIfTI file) is preprocessed as the archive was and
    embedded by ``checkpoint`` (default: the index's); see :func:`ranked` for its findings,
    whose ``threshold`` and ``knn_k`` default to the checkpoint's ``eval`` settings.
    """
    ecfg = from_dict(EvalConfig, index.meta.get("eval_config", {}))
    settings = {
        "threshold": ecfg.threshold if threshold is None else threshold,
        "knn_k": ecfg.knn_k if knn_k is None else knn_k,
    }
    path = Path(query)
    if query in {str(i) for i in index.ids}:
        q_emb, row, hot = stored_query(index, query)
        q_findings, rows = ranked(index, q_emb, top_k, exclude=row, q_hot=hot, **settings)
        return query, q_findings, rows
    if not (path.is_dir() or path.name.endswith(NIFTI_SUFFIXES)):
        raise DataError(query, "neither an id of the index nor a DICOM folder / NIfTI file")
    study = study_at(path)
    q_emb, probs = _query_from_path(
        path, checkpoint or Path(index.meta["checkpoint"]), device, index
    )
    q_findings, rows = ranked(index, q_emb, top_k, probs=probs, **settings)
    return study.id, q_findings, rows
