"""``ctretrieval-index`` and ``ctretrieval-search``: embed an archive once, then find similar studies.

An index is one ``.npz`` file (written atomically, read without pickle): ``ids`` [n] strings,
``embeddings`` [n, e] float32 (L2-normalised), ``labels`` [n, c] uint8 and ``has_labels`` [n]
(studies of the archive without a row in the labels CSV have no findings to show), and ``meta``,
a JSON string with the class names, the checkpoint, a fingerprint of its weights and the
store's preprocessing settings. :class:`Index` is the same in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctretrieval.config import DataConfig, EvalConfig, PreprocessConfig
from ctretrieval.data import (
    CTVolumeDataset,
    check_store,
    locate_data,
    normalise_id,
    read_labels,
    volume_ids,
)
from ctretrieval.evaluate import load_model
from ctretrieval.metrics import embed, knn_label_scores
from ctretrieval.predict import (
    embed_prepared,
    named_items,
    prepare,
    preprocess_for,
    weights_fingerprint,
)
from ctretrieval.readers import NIFTI_SUFFIXES, study_at
from medcore.config import from_dict
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import DataError
from medcore.io import atomic_path, atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table
from medcore.runtime.device import resolve_device
from medcore.volumes.store import read_settings

INDEX_FORMAT = "ctretrieval.index/1"


@dataclass
class Index:
    """An archive's embeddings: what an index file holds, in memory (see the module docstring).

    ``ctretrieval-index`` writes one from a volume store, ``ctretrieval.load(...).build_index``
    from raw volumes or embeddings; :meth:`read` and :meth:`write` move it to and from a file.
    """

    ids: np.ndarray  # [n] str
    embeddings: np.ndarray  # [n, e] float32, L2-normalised
    labels: np.ndarray  # [n, c] uint8, in the order of meta["class_names"]
    has_labels: np.ndarray  # [n] bool
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, path: str | Path) -> Index:
        """The index file ``path``; a missing or foreign file is a one-line DataError."""
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "index file not found (build one with ctretrieval-index)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("ids", "embeddings", "labels", "has_labels", "meta")}
            arrays["meta"] = json.loads(str(arrays["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            why = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise DataError(path, f"not a ctretrieval index ({why})") from None
        if arrays["meta"].get("format") != INDEX_FORMAT:
            raise DataError(path, "not a ctretrieval index (unknown format)")
        return cls(**arrays)

    def write(self, path: str | Path) -> Path:
        """Write the index to ``path`` (``.npz``, atomically, no pickled objects)."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                ids=np.asarray(self.ids, dtype=str),
                embeddings=np.asarray(self.embeddings, dtype=np.float32),
                labels=np.asarray(self.labels, dtype=np.uint8),
                has_labels=np.asarray(self.has_labels, dtype=bool),
                meta=np.asarray(json.dumps({**self.meta, "format": INDEX_FORMAT})),
            )
        return path


def build_index(
    checkpoint: Path,
    h5: Path,
    labels_csv: Path | None,
    output: Path,
    device: torch.device,
    batch_size: int = 4,
) -> int:
    """Embed every volume of ``h5`` with ``checkpoint`` into the index file ``output``; its size."""
    model, state = load_model(checkpoint, device)
    dcfg = from_dict(DataConfig, state.get("data_config", {}))
    check_store(h5, from_dict(PreprocessConfig, state.get("preprocess_config", {})))
    keys = volume_ids(h5)
    class_names = list(state.get("class_names", []))
    labels = np.zeros((len(keys), len(class_names)), dtype=np.uint8)
    has = np.zeros(len(keys), dtype=bool)
    if labels_csv is not None and labels_csv.is_file():
        table = read_labels(labels_csv, dcfg)
        rows = {i: r for r, i in enumerate(table.ids)}
        for k, key in enumerate(keys):
            r = rows.get(normalise_id(key, dcfg.id_suffixes))
            if r is not None:
                labels[k], has[k] = table.y[r], True
    data = CTVolumeDataset(h5, keys, labels, np.zeros(len(keys), dtype=np.int64))
    precision = checkpoint_precision(state, device)
    emb = embed(model, data, PredictOptions(device, precision, batch_size, desc="indexing")).emb
    meta = {
        "format": INDEX_FORMAT,
        "checkpoint": str(checkpoint),
        "kind": state.get("kind"),
        "weights": weights_fingerprint(state["model"]),
        "class_names": class_names,
        "preprocess_config": state.get("preprocess_config", {}),
        "eval_config": state.get("eval_config", {}),
        "store_settings": read_settings(h5),  # raw queries are preprocessed with these
        "volumes": str(h5),
    }
    Index(np.asarray(keys, dtype=str), emb.numpy(), labels, has, meta).write(output)
    return len(keys)


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
    a store that records none (:mod:`ctretrieval.predict`).
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


def index_main(args: argparse.Namespace) -> int:
    """``ctretrieval-index`` with parsed arguments (see :mod:`ctretrieval.cli`)."""
    device = resolve_device(args.device)
    h5, csv = args.volumes, args.labels
    if h5 is None:
        _, state = load_model(args.checkpoint, torch.device("cpu"))
        dcfg = from_dict(DataConfig, state.get("data_config", {}))
        if args.data_dir is not None:
            dcfg.data_dir = str(args.data_dir)
        h5, default_csv = locate_data(
            dcfg, from_dict(PreprocessConfig, state.get("preprocess_config", {}))
        )
        csv = csv or default_csv
    n = build_index(args.checkpoint, h5, csv, args.output, device, args.batch_size)
    print(f"indexed {n} studies into {args.output}")
    return 0


def search_main(args: argparse.Namespace) -> int:
    """``ctretrieval-search`` with parsed arguments (see :mod:`ctretrieval.cli`)."""
    for flag, value in (("--top-k", args.top_k), ("--knn-k", args.knn_k)):
        if value is not None and value < 1:
            raise DataError(flag, f"must be at least 1, got {value}")
    index = Index.read(args.index)
    query_id, findings, rows = search(
        index,
        args.query,
        args.top_k,
        resolve_device(args.device),
        args.checkpoint,
        threshold=args.threshold,
        knn_k=args.knn_k,
    )
    out = args.output or args.index.with_name(f"{args.index.stem}_search") / f"{query_id}.csv"
    atomic_write_csv(out, pd.DataFrame(rows))
    atomic_write_json(
        out.with_suffix(".json"), {"query": query_id, "query_findings": findings, "results": rows}
    )
    print(f"query {query_id} (findings: {', '.join(findings) or 'none known'})")
    print(format_table(rows, ["rank", "id", "similarity", "findings", "shared_findings"]))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
