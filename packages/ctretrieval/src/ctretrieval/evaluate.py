"""Embedding extraction and the metric table: retrieval (P/R/mAP/NDCG@k) and finding F1.

Shape notation: ``q`` queries, ``n`` database studies, ``c`` label slots, ``e`` embedding size.

Findings are predicted by the classification head (microf1 mode) or, for a model without a
head (triplet mode), by a vote of the ``knn_k`` nearest database studies: a slot is positive
when at least ``threshold`` of the neighbours have it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ctretrieval.config import DataConfig, EvalConfig, ModelConfig, PreprocessConfig
from ctretrieval.data import StudyTable, load_studies
from ctretrieval.model import Proximity100x100, build_model
from medcore.checkpoint import load_checkpoint
from medcore.cli import add_common_args, format_table
from medcore.config import from_dict
from medcore.device import resolve_device
from medcore.errors import CheckpointError, DataError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.metrics.classification import multilabel_f1
from medcore.metrics.retrieval import random_baseline, retrieval_metrics
from medcore.splits import load_splits


@dataclass
class Embedded:
    emb: torch.Tensor  # [n, e] float32, L2-normalised
    labels: torch.Tensor  # [n, c]
    probs: torch.Tensor | None  # [n, c] head probabilities, None without a head


@torch.no_grad()
def extract(
    model: Proximity100x100,
    data: Dataset,
    device: torch.device,
    batch_size: int = 4,
    amp: bool = True,
    num_workers: int = 0,
    show_progress: bool = False,
    desc: str = "embedding",
) -> Embedded:
    """Embeddings (and head probabilities) of every study of ``data``, in order, no augmentation."""
    was_training = model.training
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    embs, labels, probs = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show_progress):
        out = model.get_embeddings(batch["volume"].to(device, non_blocking=True), amp=amp)
        embs.append(out["embedding"].cpu())
        labels.append(batch["labels"])
        if "probs" in out:
            probs.append(out["probs"].cpu())
    model.train(was_training)
    return Embedded(torch.cat(embs), torch.cat(labels), torch.cat(probs) if probs else None)


def knn_label_scores(
    query: torch.Tensor,
    db: torch.Tensor,
    db_labels: torch.Tensor,
    k: int,
    exclude_self: bool = False,
) -> torch.Tensor:
    """``[q, c]``: the fraction of each query's ``k`` most similar (cosine) database studies with each slot."""
    sim = query @ db.T
    if exclude_self:
        sim.fill_diagonal_(-math.inf)
    k = min(k, db.shape[0] - int(exclude_self))
    top = sim.topk(k, dim=1).indices
    return (db_labels[top] > 0).float().mean(1)


def valid_ks(ks: list[int], n_db: int, exclude_self: bool) -> list[int]:
    """The cutoffs that a database of ``n_db`` studies can fill."""
    return [k for k in sorted(set(ks)) if k <= n_db - int(exclude_self)]


def compute_metrics(
    query: Embedded, db: Embedded, cfg: EvalConfig, class_names: list[str], exclude_self: bool
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """(model metrics, random-ranking baseline, finding scores ``[q, c]``) for ``query`` against ``db``."""
    ks = valid_ks(cfg.ks, len(db.emb), exclude_self)
    if not ks:
        raise DataError(
            "evaluation",
            f"the database has {len(db.emb)} studies: too few for any cutoff in {cfg.ks}",
        )
    metrics = retrieval_metrics(
        query.emb,
        db.emb,
        query.labels,
        db.labels,
        ks=ks,
        relevance=cfg.relevance,
        exclude_self=exclude_self,
    )
    baseline = random_baseline(
        query.labels, db.labels, ks=ks, relevance=cfg.relevance, exclude_self=exclude_self
    )
    if query.probs is not None:
        scores = query.probs
    else:
        scores = knn_label_scores(query.emb, db.emb, db.labels, cfg.knn_k, exclude_self)
    f1 = multilabel_f1(query.labels.numpy() > 0, scores.numpy() >= cfg.threshold)
    metrics.update(micro_f1=f1["micro_f1"], macro_f1=f1["macro_f1"], weighted_f1=f1["weighted_f1"])
    metrics.update(
        {f"f1/{name}": v for name, v in zip(class_names, f1["per_class_f1"], strict=True)}
    )
    return metrics, baseline, scores


def metric_rows(metrics: dict[str, float], baseline: dict[str, float]) -> list[dict[str, Any]]:
    """Rows ``metric | model | random`` for :func:`medcore.cli.format_table`."""
    return [{"metric": k, "model": v, "random": baseline.get(k, "")} for k, v in metrics.items()]


def load_model(path: str | Path, device: torch.device) -> tuple[Proximity100x100, dict[str, Any]]:
    """The model of a ctretrieval checkpoint (rebuilt from its stored config) and the checkpoint."""
    state = load_checkpoint(path, map_location="cpu")
    kind = str(state.get("kind", ""))
    if not kind.startswith("ctretrieval."):
        raise CheckpointError(path, f"not a ctretrieval checkpoint (kind {kind or 'missing'})")
    if "model_config" not in state or "model" not in state:
        raise CheckpointError(
            path, "has no model_config/model (was it written by ctretrieval-train?)"
        )
    mcfg = from_dict(
        ModelConfig, {**state["model_config"], "pretrained_weights": None, "pretrained": False}
    )
    model = build_model(mcfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not match the stored config ({str(exc).splitlines()[0][:120]})"
        ) from None
    return model.to(device).eval(), state


def study_table_from_checkpoint(
    state: dict[str, Any], data_dir: Path | None
) -> tuple[StudyTable, DataConfig, PreprocessConfig]:
    """The studies a checkpoint was trained on (or those of ``data_dir``), read with its data settings."""
    dcfg = from_dict(DataConfig, state.get("data_config", {}))
    pcfg = from_dict(PreprocessConfig, state.get("preprocess_config", {}))
    if data_dir is not None:
        dcfg.data_dir = str(data_dir)
    return load_studies(dcfg, pcfg), dcfg, pcfg


def _split_rows(
    table: StudyTable, checkpoint: Path, split: str, splits_path: Path | None
) -> dict[str, np.ndarray]:
    if split == "all":
        return {"all": np.arange(len(table.keys))}
    path = splits_path or checkpoint.parent.parent / "splits.json"
    if not path.is_file():
        raise DataError(
            path, f"no splits file for --split {split} (pass --splits or use --split all)"
        )
    try:
        return load_splits(path, ids=table.labels.ids)
    except ValueError as exc:
        raise DataError(path, str(exc).split(": ", 1)[-1]) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctretrieval-eval", description="Metric table of a checkpoint on a split"
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a .pt written by ctretrieval-train"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "train", "train_eval", "all"],
        help="queries; test is ranked against train (the archive), the others against themselves",
    )
    parser.add_argument(
        "--splits", type=Path, help="splits.json (default: the one in the checkpoint's run dir)"
    )
    add_common_args(parser, train=False)
    args = parser.parse_args(argv)

    device = resolve_device(args.device or "auto")
    model, state = load_model(args.checkpoint, device)
    table, _, _ = study_table_from_checkpoint(state, args.data_dir)
    ecfg = from_dict(EvalConfig, state.get("eval_config", {}))
    rows = _split_rows(table, args.checkpoint, args.split, args.splits)
    if args.split not in rows:
        raise DataError(
            args.splits or "splits.json", f"has no split {args.split!r} ({', '.join(rows)})"
        )
    query = extract(
        model,
        table.dataset(rows[args.split]),
        device,
        ecfg.batch_size,
        show_progress=True,
        desc=args.split,
    )
    if args.split == "test":
        db = extract(
            model,
            table.dataset(rows["train"]),
            device,
            ecfg.batch_size,
            show_progress=True,
            desc="train",
        )
        metrics, baseline, _ = compute_metrics(
            query, db, ecfg, table.labels.class_names, exclude_self=False
        )
    else:
        metrics, baseline, _ = compute_metrics(
            query, query, ecfg, table.labels.class_names, exclude_self=True
        )

    out_dir = args.output_dir or args.checkpoint.parent.parent / f"eval_{args.split}"
    atomic_write_json(
        out_dir / "metrics.json",
        {
            "checkpoint": str(args.checkpoint),
            "split": args.split,
            "n_queries": len(query.emb),
            "metrics": metrics,
            "random": baseline,
        },
    )
    atomic_write_csv(out_dir / "metrics.csv", pd.DataFrame(metric_rows(metrics, baseline)))
    print(format_table(metric_rows(metrics, baseline)))
    print(f"wrote {out_dir / 'metrics.json'}")
    return 0
