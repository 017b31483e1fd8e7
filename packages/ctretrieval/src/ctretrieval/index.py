"""``ctretrieval-index`` and ``ctretrieval-search``: embed an archive once, then find similar studies.

An index is one ``.npz`` file (written atomically, read without pickle): ``ids`` [n] strings,
``embeddings`` [n, e] float32 (L2-normalised), ``labels`` [n, c] uint8 and ``has_labels`` [n]
(studies of the archive without a row in the labels CSV have no findings to show), and ``meta``,
a JSON string with the class names, the checkpoint and its preprocessing settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zipfile
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
from ctretrieval.preprocess import fit_volume
from ctretrieval.readers import NIFTI_SUFFIXES, Study, read_study
from medcore.config import from_dict
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import DataError
from medcore.io import atomic_path, atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table
from medcore.runtime.device import resolve_device
from medcore.volumes.store import read_settings

INDEX_FORMAT = "ctretrieval.index/1"


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
        "class_names": class_names,
        "preprocess_config": state.get("preprocess_config", {}),
        "eval_config": state.get("eval_config", {}),
        "store_settings": read_settings(h5),  # raw queries are preprocessed with these
        "volumes": str(h5),
    }
    with atomic_path(output, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            ids=np.asarray(keys, dtype=str),
            embeddings=emb.numpy().astype(np.float32),
            labels=labels,
            has_labels=has,
            meta=np.asarray(json.dumps(meta)),
        )
    return len(keys)


def load_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "index file not found (build one with ctretrieval-index)")
    try:
        with np.load(path, allow_pickle=False) as z:
            index = {k: z[k] for k in ("ids", "embeddings", "labels", "has_labels", "meta")}
        index["meta"] = json.loads(str(index["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        why = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise DataError(path, f"not a ctretrieval index ({why})") from None
    if index["meta"].get("format") != INDEX_FORMAT:
        raise DataError(path, "not a ctretrieval index (unknown format)")
    return index


def _query_from_path(
    path: Path, checkpoint: Path, device: torch.device, store: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embedding (and head probabilities) of a raw study: a DICOM folder or a NIfTI file.

    The study is preprocessed as the archive was (``store``: the store's recorded settings),
    falling back to the checkpoint's settings for an index of a store that records none.
    """
    model, state = load_model(checkpoint, device)
    prep = from_dict(PreprocessConfig, state.get("preprocess_config", {}))
    if store:
        prep = dataclasses.replace(
            prep,
            target_shape=tuple(store["target_shape"]),
            hu_window=tuple(store["hu_window"]),
            target_spacing=None
            if store.get("target_spacing") is None
            else tuple(store["target_spacing"]),
        )
    study = Study(path.name, path, "dicom" if path.is_dir() else "nifti")
    volume, _ = fit_volume(read_study(study, prep.min_slices), prep)
    out = model.get_embeddings(
        torch.from_numpy(volume)[None].to(device), checkpoint_precision(state, device)
    )
    probs = out.get("probs")
    return out["embedding"][0].cpu(), None if probs is None else probs[0].cpu()


def search(
    index: dict[str, Any],
    query: str,
    top_k: int,
    device: torch.device,
    checkpoint: Path | None = None,
    threshold: float | None = None,
    knn_k: int | None = None,
) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(query id, query findings, top-k rows) for an index id or a raw study path.

    A raw study's findings are the head's probabilities at ``threshold``, or for a model
    without a head the fraction of its ``knn_k`` nearest labelled studies that have each
    finding, at ``threshold``; both default to the checkpoint's ``eval`` settings.
    """
    ecfg = from_dict(EvalConfig, index["meta"].get("eval_config", {}))
    threshold = ecfg.threshold if threshold is None else threshold
    knn_k = ecfg.knn_k if knn_k is None else knn_k
    ids = [str(i) for i in index["ids"]]
    emb = torch.from_numpy(index["embeddings"])
    labels = torch.from_numpy(index["labels"].astype(np.float32))
    names = index["meta"]["class_names"]
    path = Path(query)
    if query in ids:
        qi = ids.index(query)
        q_emb, exclude = emb[qi], qi
        q_hot = labels[qi] > 0 if index["has_labels"][qi] else None
        query_id = query
    elif path.is_dir() or path.name.endswith(NIFTI_SUFFIXES):
        if not path.exists():
            raise DataError(path, "query study not found")
        q_emb, probs = _query_from_path(
            path,
            checkpoint or Path(index["meta"]["checkpoint"]),
            device,
            index["meta"].get("store_settings"),
        )
        exclude = None
        if probs is None:  # no head: the findings its nearest labelled studies agree on
            known = torch.from_numpy(index["has_labels"])
            probs = (
                knn_label_scores(q_emb[None], emb[known], labels[known], k=knn_k)[0]
                if known.any()
                else None
            )
        q_hot = None if probs is None else probs >= threshold
        query_id = path.name
    else:
        raise DataError(query, "neither an id of the index nor a DICOM folder / NIfTI file")
    sim = emb @ q_emb
    if exclude is not None:
        sim[exclude] = -torch.inf
    k = min(top_k, len(ids) - int(exclude is not None))
    top = sim.topk(k)
    q_findings = (
        [] if q_hot is None else [n for n, h in zip(names, q_hot.tolist(), strict=True) if h]
    )
    rows = []
    for rank, (score, j) in enumerate(
        zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1
    ):
        found = (
            [n for n, v in zip(names, labels[j].tolist(), strict=True) if v > 0]
            if index["has_labels"][j]
            else []
        )
        rows.append(
            {
                "rank": rank,
                "id": ids[j],
                "similarity": float(score),
                "findings": ";".join(found) or ("?" if not index["has_labels"][j] else ""),
                "shared_findings": ";".join(f for f in found if f in q_findings),
            }
        )
    return query_id, q_findings, rows


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
    index = load_index(args.index)
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
