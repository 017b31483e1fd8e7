"""``ctretrieval-eval``: the metric table of a checkpoint on a split.

The metrics themselves are :mod:`ctretrieval.metrics`; the checkpoint's model is rebuilt by
:func:`ctretrieval.predict.load_model`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctretrieval.config import CTRetrievalConfig
from ctretrieval.data import StudyTable, load_studies
from ctretrieval.metrics import Embedded, embed, metric_rows, score
from ctretrieval.predict import load_model
from medcore.cli.run_setup import load_run_config
from medcore.config import to_dict
from medcore.data.splits import load_splits
from medcore.engine import inference
from medcore.errors import DataError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table
from medcore.runtime.device import resolve_device

# What ctretrieval-eval takes from --config / --set: the model is the checkpoint's.
EVAL_SECTIONS = ("eval", "data", "seed")


def eval_config(args: argparse.Namespace, state: dict[str, Any]) -> CTRetrievalConfig:
    """The evaluation's config: the checkpoint's data, preprocess and eval settings, then the
    eval and data sections of ``--config``, then ``--set`` and the common flags."""
    base = {
        "data": state.get("data_config", {}),
        "preprocess": state.get("preprocess_config", {}),
        "eval": state.get("eval_config", {}),
    }
    return load_run_config(
        args, CTRetrievalConfig, "ctretrieval", sections=EVAL_SECTIONS, base=base
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


def main(args: argparse.Namespace) -> int:
    """``ctretrieval-eval``: the metric table of ``args.checkpoint`` on ``args.split``."""
    model, state = load_model(args.checkpoint, torch.device("cpu"))
    cfg = eval_config(args, state)
    device = resolve_device(cfg.device)
    model = model.to(device)
    precision = inference.checkpoint_precision(state, device)
    table = load_studies(cfg.data, cfg.preprocess)
    rows = _split_rows(table, args.checkpoint, args.split, args.splits)
    if args.split not in rows:
        raise DataError(
            args.splits or "splits.json", f"has no split {args.split!r} ({', '.join(rows)})"
        )

    options = inference.PredictOptions(
        device, precision, cfg.eval.batch_size, cfg.trainer.num_workers
    )

    def embed_split(split: str) -> Embedded:
        return embed(model, table.dataset(rows[split]), options.but(desc=split))

    query = embed_split(args.split)
    # Test queries are ranked against the train archive, the other splits against themselves.
    db = embed_split("train") if args.split == "test" else query
    metrics, baseline, _ = score(
        query,
        db,
        cfg,
        table.labels.class_names,
        exclude_self=args.split != "test",
        intervals=True,
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
