"""Embedding extraction and the metric table: retrieval (P/R/mAP/NDCG@k) and finding F1.

Shape notation: ``q`` queries, ``n`` database studies, ``c`` label slots, ``e`` embedding size.

Findings are predicted by the classification head (microf1 mode) or, for a model without a
head (triplet mode), by a vote of the ``knn_k`` nearest database studies: a slot is positive
when at least ``threshold`` of the neighbours have it. The pooled F1 scores (micro, macro,
weighted) cover the real findings only: the derived "no finding" slot is set for every study
without one, so it is easy to get right and would inflate them; its F1 is reported beside them.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ctretrieval.config import (
    CTRetrievalConfig,
    EvalConfig,
    ModelConfig,
)
from ctretrieval.data import StudyTable, load_studies
from ctretrieval.model import Proximity100x100, build_model
from medcore.checkpoint import load_checkpoint
from medcore.cli import common_overrides, format_table, resolve_config_arg
from medcore.config import from_dict, load_config, read_yaml, to_dict
from medcore.device import AmpPolicy, amp_policy, resolve_device
from medcore.errors import CheckpointError, ConfigError, DataError
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
    amp: AmpPolicy | None = None,
    num_workers: int = 0,
    show_progress: bool = False,
    desc: str = "embedding",
) -> Embedded:
    """Embeddings (and head probabilities) of every study of ``data``, in order, no augmentation.

    ``amp``: the precision of the training run (see :meth:`Proximity100x100.get_embeddings`).
    """
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
    query: Embedded,
    db: Embedded,
    cfg: EvalConfig,
    class_names: list[str],
    exclude_self: bool,
    no_finding: str | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """(model metrics, random-ranking baseline, finding scores ``[q, c]``) for ``query`` against ``db``.

    ``no_finding``: the name of the derived "no finding" slot in ``class_names``, left out of
    ``micro_f1`` / ``macro_f1`` / ``weighted_f1`` and reported as ``f1/<name>`` only.
    ``seed``: the random ranking of the baseline.
    """
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
        query.labels,
        db.labels,
        ks=ks,
        relevance=cfg.relevance,
        exclude_self=exclude_self,
        seed=seed,
    )
    if query.probs is not None:
        scores = query.probs
    else:
        scores = knn_label_scores(query.emb, db.emb, db.labels, cfg.knn_k, exclude_self)
    truth, predicted = query.labels.numpy() > 0, scores.numpy() >= cfg.threshold
    findings = [c for c, name in enumerate(class_names) if name != no_finding]
    pooled = multilabel_f1(truth[:, findings], predicted[:, findings])
    metrics.update(
        micro_f1=pooled["micro_f1"], macro_f1=pooled["macro_f1"], weighted_f1=pooled["weighted_f1"]
    )
    per_class = multilabel_f1(truth, predicted)["per_class_f1"]
    metrics.update({f"f1/{name}": v for name, v in zip(class_names, per_class, strict=True)})
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
    stored = {**state["model_config"], "pretrained_weights": None, "pretrained": False}
    if stored.get("name") == "Proximity300x300":  # fixed input; older checkpoints stored others
        stored.update(num_slices=300, image_size=[300, 300])
    mcfg = from_dict(ModelConfig, stored)
    model = build_model(mcfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            path, f"weights do not match the stored config ({str(exc).splitlines()[0][:120]})"
        ) from None
    return model.to(device).eval(), state


def checkpoint_amp(state: dict[str, Any], device: torch.device) -> AmpPolicy:
    """The precision a checkpoint was trained in (its trainer settings), as it runs on ``device``."""
    tcfg = state.get("trainer_config")
    if not isinstance(tcfg, dict):
        policy = amp_policy(device)
        print(
            f"note: the checkpoint records no training precision; embedding in {policy.name}",
            file=sys.stderr,
        )
        return policy
    return amp_policy(device, bool(tcfg.get("amp", True)), str(tcfg.get("amp_dtype", "auto")))


# What ctretrieval-eval takes from --config / --set: the model is the checkpoint's.
_EVAL_SECTIONS = ("eval", "data", "seed")


def eval_config(args: argparse.Namespace, state: dict[str, Any]) -> CTRetrievalConfig:
    """The evaluation's config: the checkpoint's data, preprocess and eval settings, then the
    eval and data sections of ``--config``, then ``--set`` and the common flags."""
    base = {
        "data": state.get("data_config", {}),
        "preprocess": state.get("preprocess_config", {}),
        "eval": state.get("eval_config", {}),
    }
    layer: dict[str, Any] = {}
    if args.config is not None:
        resolve_config_arg(args, "ctretrieval")
        layer = read_yaml(args.config)
        unused = sorted(set(layer) - set(_EVAL_SECTIONS))
        if unused:
            print(
                f"note: {args.config}: not used by ctretrieval-eval (it evaluates the "
                f"checkpoint's model): {', '.join(unused)}",
                file=sys.stderr,
            )
        layer = {k: v for k, v in layer.items() if k in _EVAL_SECTIONS}
    for item in args.overrides:
        if item.split("=", 1)[0].strip().split(".")[0] not in _EVAL_SECTIONS:
            raise ConfigError(
                f"--set {item}",
                "ctretrieval-eval takes eval.*, data.* and seed (the model is the checkpoint's)",
            )
    return load_config(
        CTRetrievalConfig, base, layer, overrides=[*args.overrides, *common_overrides(args)]
    )


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


def run(args: argparse.Namespace) -> int:
    """``ctretrieval-eval``: the metric table of ``args.checkpoint`` on ``args.split``."""
    model, state = load_model(args.checkpoint, torch.device("cpu"))
    cfg = eval_config(args, state)
    device = resolve_device(cfg.device)
    model = model.to(device)
    amp = checkpoint_amp(state, device)
    table = load_studies(cfg.data, cfg.preprocess)
    rows = _split_rows(table, args.checkpoint, args.split, args.splits)
    if args.split not in rows:
        raise DataError(
            args.splits or "splits.json", f"has no split {args.split!r} ({', '.join(rows)})"
        )

    def embed(split: str) -> Embedded:
        data = table.dataset(rows[split])
        return extract(
            model, data, device, cfg.eval.batch_size, amp, show_progress=True, desc=split
        )

    query = embed(args.split)
    # Test queries are ranked against the train archive, the other splits against themselves.
    db = embed("train") if args.split == "test" else query
    metrics, baseline, _ = compute_metrics(
        query,
        db,
        cfg.eval,
        table.labels.class_names,
        exclude_self=args.split != "test",
        no_finding=cfg.data.no_finding_name,
        seed=cfg.seed,
    )

    out_dir = args.output_dir or args.checkpoint.parent.parent / f"eval_{args.split}"
    atomic_write_json(
        out_dir / "metrics.json",
        {
            "checkpoint": str(args.checkpoint),
            "split": args.split,
            "n_queries": len(query.emb),
            "seed": cfg.seed,
            "eval_config": to_dict(cfg.eval),
            "metrics": metrics,
            "random": baseline,
        },
    )
    atomic_write_csv(out_dir / "metrics.csv", pd.DataFrame(metric_rows(metrics, baseline)))
    print(format_table(metric_rows(metrics, baseline)))
    print(f"wrote {out_dir / 'metrics.json'}")
    return 0
