"""``ctretrieval-train``: fit the embedding in microf1 or triplet mode, then evaluate on the test split.

Each epoch has two phases: gradient steps on the training split with GPU augmentation, then
embedding extraction on ``train_eval`` (a stratified subset of train, no augmentation) for the
retrieval and F1 metrics that choose the best checkpoint (micro-F1 first, then mAP@10).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ctretrieval.augment import VolumeAugmentation
from ctretrieval.config import CTRetrievalConfig
from ctretrieval.data import StudyTable, load_studies, make_splits
from ctretrieval.evaluate import compute_metrics, extract, metric_rows
from ctretrieval.losses import GradedMicroF1Loss, OnlineTripletLoss
from ctretrieval.model import build_model
from ctretrieval.sampler import BalancedBatchSampler
from medcore.checkpoint import export_safetensors, load_checkpoint
from medcore.cli import RunContext, add_common_args, format_table, setup_run
from medcore.config import to_dict
from medcore.distributed import barrier
from medcore.errors import ConfigError
from medcore.io import RunLock, atomic_write_csv
from medcore.logging import RunLogger
from medcore.plots import plot_roc_curves, plot_training_curves
from medcore.splits import load_splits, save_splits
from medcore.trainer import EvalContext, Trainer

# --smoke on the demo: a smaller demo at a smaller size, so a cold cache still finishes in seconds.
SMOKE_DEMO_OVERRIDES = [
    "data.demo_studies=24",
    "preprocess.target_shape=[6,32,32]",
    "model.num_slices=6",
    "model.image_size=[32,32]",
]


def _splits(cfg: CTRetrievalConfig, table: StudyTable, run: RunContext) -> dict[str, np.ndarray]:
    """The run's splits: reloaded when resuming (same studies, same order), else made and saved."""
    path = run.run_dir / "splits.json"
    if run.resume is not None and path.is_file():
        try:
            return load_splits(path, ids=table.labels.ids)
        except ValueError as exc:
            raise ConfigError(
                path, f"cannot resume with these data ({str(exc).split(': ', 1)[-1]})"
            ) from None
    splits = make_splits(table.labels.y, cfg.data.test_frac, cfg.data.train_eval_frac, cfg.seed)
    if run.dist.is_main:
        save_splits(
            path,
            splits,
            meta={
                "seed": cfg.seed,
                "test_frac": cfg.data.test_frac,
                "train_eval_frac": cfg.data.train_eval_frac,
            },
            ids=table.labels.ids,
        )
    return splits


def _step_fn(cfg: CTRetrievalConfig, augment: nn.Module | None):
    f1_loss = GradedMicroF1Loss(cfg.loss.f1_average, cfg.loss.bce_weight)
    triplet_loss = OnlineTripletLoss(cfg.loss.margin, cfg.loss.mining)

    def step(
        model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["volume"].float() / 255.0  # normalised on the device; uint8 on the way there
        if augment is not None:
            x = augment(x)
        out = model(x)
        if cfg.mode == "microf1":
            return f1_loss(out["logits"], batch["labels"]), {}
        loss, n_triplets = triplet_loss(out["embedding"], batch["labels"], batch["label_id"])
        return loss, {"triplets": float(n_triplets)}

    return step


def _evaluate_fn(cfg: CTRetrievalConfig, table: StudyTable, rows: np.ndarray):
    data = table.dataset(rows)
    names = table.labels.class_names

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        emb = extract(model, data, ctx.device, cfg.eval.batch_size, desc="train_eval embeddings")
        metrics, _, scores = compute_metrics(emb, emb, cfg.eval, names, exclude_self=True)
        for c, name in enumerate(names):
            ctx.logger.log_pr_curve(
                f"pr/{name}", emb.labels[:, c] > 0, scores[:, c], ctx.global_step
            )
        out = {f"val/{k}": v for k, v in metrics.items()}
        if "map@10" in metrics:
            # Best checkpoint by micro-F1, ties (frequent on small sets) broken by mAP@10.
            out["val/micro_f1_then_map@10"] = metrics["micro_f1"] + 1e-3 * metrics["map@10"]
        return out

    return evaluate


def _final_report(
    cfg: CTRetrievalConfig,
    table: StudyTable,
    splits: dict[str, np.ndarray],
    model: nn.Module,
    run: RunContext,
    logger: RunLogger,
    weights: Path | None,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    """Test split ranked against the train archive with the best weights; tables, plots, JSON."""
    if weights is not None:
        model.load_state_dict(
            load_checkpoint(weights, kind=f"ctretrieval.{cfg.model.name}")["model"]
        )
    device = run.device
    query = extract(
        model,
        table.dataset(splits["test"]),
        device,
        cfg.eval.batch_size,
        show_progress=True,
        desc="test",
    )
    db = extract(
        model,
        table.dataset(splits["train"]),
        device,
        cfg.eval.batch_size,
        show_progress=True,
        desc="train",
    )
    names = table.labels.class_names
    metrics, baseline, scores = compute_metrics(query, db, cfg.eval, names, exclude_self=False)
    for c, name in enumerate(names):
        logger.log_pr_curve(f"test_pr/{name}", query.labels[:, c] > 0, scores[:, c], 0)
    rows = metric_rows(metrics, baseline)
    atomic_write_csv(run.run_dir / "test_metrics.csv", pd.DataFrame(rows))
    curves = {
        name: (query.labels[:, c].numpy() > 0, scores[:, c].numpy()) for c, name in enumerate(names)
    }
    plot_roc_curves(curves, run.run_dir / "plots" / "test_roc.png", title="test findings")
    if history:
        keys = [
            k for k in ("val/micro_f1", "val/map@10", "val/ndcg@10") if any(k in r for r in history)
        ]
        plot_training_curves(history, keys, run.run_dir / "plots" / "train_eval_curves.png")
    export_safetensors(
        model.state_dict(),
        run.run_dir / "checkpoints" / "model.safetensors",
        metadata={"kind": f"ctretrieval.{cfg.model.name}", "source": str(weights)},
    )
    print(
        f"\n{cfg.mode} mode, test split: {len(query.emb)} queries ranked against {len(db.emb)} training studies "
        f"(relevance: {cfg.eval.relevance})"
    )
    print(format_table(rows))
    summary = {
        "mode": cfg.mode,
        "checkpoint": str(weights),
        "n_test": len(query.emb),
        "n_archive": len(db.emb),
        "test": metrics,
        "random": baseline,
    }
    logger.write_final(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctretrieval-train", description="Train the CT retrieval embedding"
    )
    parser.add_argument(
        "--mode", choices=["microf1", "triplet"], help="training mode (default: the config's)"
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.mode:
        args.overrides = [f"mode={args.mode}", *args.overrides]
    run = setup_run(
        args,
        CTRetrievalConfig,
        "ctretrieval",
        "default",
        smoke_overrides=SMOKE_DEMO_OVERRIDES if args.data_dir is None else (),
    )
    cfg: CTRetrievalConfig = run.cfg
    with RunLock(run.run_dir) if run.dist.is_main else contextlib.nullcontext():
        return _train(cfg, run)


def _train(cfg: CTRetrievalConfig, run: RunContext) -> int:
    if run.dist.is_main:  # the demo is generated and preprocessed once, by rank 0
        table = load_studies(cfg.data, cfg.preprocess)
    barrier()
    if not run.dist.is_main:
        table = load_studies(cfg.data, cfg.preprocess, show_progress=False)
    splits = _splits(cfg, table, run)
    n_slots = table.labels.y.shape[1]
    model_cfg = dataclasses.replace(cfg.model, num_classes=n_slots if cfg.mode == "microf1" else 0)
    model = build_model(model_cfg)

    tcfg = cfg.trainer
    if tcfg.monitor == ["val/loss"]:
        tcfg = dataclasses.replace(
            tcfg,
            monitor=["val/micro_f1_then_map@10", "val/micro_f1", "val/map@10"],
            monitor_mode="max",
        )
    if tcfg.checkpoint_prefix == "model":
        tcfg = dataclasses.replace(tcfg, checkpoint_prefix=cfg.mode)

    train_rows = splits["train"]
    sampler = None
    if cfg.mode == "triplet":
        y = table.labels.y[train_rows]
        try:
            sampler = BalancedBatchSampler(
                y,
                table.labels.label_ids[train_rows],
                cfg.sampler.n_classes,
                cfg.sampler.n_samples,
                seed=cfg.seed,
                rank=run.dist.rank,
                world_size=run.dist.world_size,
                batches_per_epoch=tcfg.max_steps_per_epoch
                and tcfg.max_steps_per_epoch * tcfg.grad_accum_steps,
            )
        except ValueError as exc:
            raise ConfigError("sampler", str(exc)) from None
    augment = VolumeAugmentation(cfg.augment).to(run.device) if cfg.augment.enabled else None
    logger = RunLogger(run.run_dir, enabled=run.dist.is_main)
    trainer = Trainer(
        model,
        tcfg,
        train_data=table.dataset(train_rows),
        step_fn=_step_fn(cfg, augment),
        run_dir=run.run_dir,
        device=run.device,
        kind=f"ctretrieval.{model_cfg.name}",
        seed=cfg.seed,
        batch_sampler=sampler,
        evaluate_fn=_evaluate_fn(cfg, table, splits["train_eval"]),
        logger=logger,
        extra_state={
            "model_config": to_dict(model_cfg),
            "data_config": to_dict(cfg.data),
            "preprocess_config": to_dict(cfg.preprocess),
            "eval_config": to_dict(cfg.eval),
            "class_names": table.labels.class_names,
            "mode": cfg.mode,
        },
    )
    result = trainer.fit(resume=run.resume)
    if run.dist.is_main:
        weights = (
            result.best_path
            if result.best_path and result.best_path.is_file()
            else result.final_path
        )
        _final_report(cfg, table, splits, model, run, logger, weights, result.history)
        print(f"run directory: {run.run_dir}")
    logger.close()
    return 0
