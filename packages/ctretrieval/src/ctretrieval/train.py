"""``ctretrieval-train``: fit the embedding in microf1 or triplet mode, then evaluate on the test split.

Each epoch has two phases: gradient steps on the training split with GPU augmentation, then
embedding extraction on ``train_eval`` (a stratified subset of train, no augmentation) for the
retrieval and F1 metrics that choose the best checkpoint (micro-F1 first, then mAP@10).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ctretrieval.augment import VolumeAugmentation
from ctretrieval.config import CTRetrievalConfig, ModelConfig
from ctretrieval.data import StudyTable, balanced_sampler, load_studies, make_splits
from ctretrieval.losses import GradedMicroF1Loss, OnlineTripletLoss, graded_targets
from ctretrieval.metrics import embed, metric_rows, score
from ctretrieval.model import (
    RESNET18_HINT,
    build_model,
    model_kind,
    with_weights_normalisation,
)
from ctretrieval.predict import load_model
from medcore.cli.dry_run import dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.config import to_dict
from medcore.data.splits import load_or_make_splits
from medcore.engine.inference import PredictOptions
from medcore.engine.run_log import RunLogger
from medcore.engine.task import EvalContext, TrainResult
from medcore.engine.trainer import Trainer
from medcore.errors import CheckpointError, ConfigError
from medcore.io import atomic_write_csv
from medcore.report.plots import plot_roc_curves, plot_training_curves
from medcore.report.tables import format_table
from medcore.runtime.device import AmpPolicy
from medcore.runtime.distributed import barrier
from medcore.weights.pretrained import require_pretrained

# --smoke on the demo: a smaller demo at a smaller size, so a cold cache still finishes in seconds.
# Proximity300x300 is Proximity100x100 held at 300 slices of 300 x 300 (triplet.yaml): the smoke
# runs the same network at the demo's size.
SMOKE_DEMO_OVERRIDES = [
    "data.demo_studies=24",
    "preprocess.target_shape=[6,32,32]",
    "model.name=Proximity100x100",
    "model.num_slices=6",
    "model.image_size=[32,32]",
]


def _splits(cfg: CTRetrievalConfig, table: StudyTable, run: RunContext) -> dict[str, np.ndarray]:
    """The run's splits: reloaded from the run directory when there (same studies, same
    order), else made (seeded, on every rank) and saved by rank 0."""
    meta = {
        "seed": cfg.seed,
        "test_frac": cfg.data.test_frac,
        "train_eval_frac": cfg.data.train_eval_frac,
    }
    return load_or_make_splits(  # type: ignore[return-value]
        run.run_dir / "splits.json",
        lambda: make_splits(table.labels.y, cfg.data.test_frac, cfg.data.train_eval_frac, cfg.seed),
        ids=table.labels.ids,
        meta=meta,
        is_main=run.dist.is_main,
    )


def model_config(cfg: CTRetrievalConfig) -> ModelConfig:
    """The model section with the head sized for the mode: one logit per label slot (the
    findings and the derived "no finding" slot) in microf1 mode, none in triplet mode."""
    n_slots = len(cfg.data.finding_columns) + 1
    return dataclasses.replace(cfg.model, num_classes=n_slots if cfg.mode == "microf1" else 0)


def make_step_fn(cfg: CTRetrievalConfig, augment: nn.Module | None):
    """The training step of ``cfg.mode``: a batch -> ``(loss, terms)`` (:mod:`ctretrieval.losses`)."""
    f1_loss = GradedMicroF1Loss(cfg.loss.f1_average, cfg.loss.bce_weight)
    graded = cfg.loss.targets == "jaccard"
    triplet_loss = OnlineTripletLoss(cfg.loss.margin, cfg.loss.mining)

    def step(
        model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["volume"].float() / 255.0  # normalised on the device; uint8 on the way there
        if augment is not None:
            x = augment(x)
        out = model(x)
        # (loss, terms): the terms stay on the device, the trainer reads them at logging steps.
        if cfg.mode == "microf1":
            targets = graded_targets(batch["labels"]) if graded else batch["labels"]
            return f1_loss(out["logits"], targets)
        return triplet_loss(out["embedding"], batch["labels"], batch["label_id"])

    return step


def make_evaluate_fn(cfg: CTRetrievalConfig, table: StudyTable, rows: np.ndarray):
    """The per-epoch evaluation: retrieval and F1 metrics of the studies ``rows`` of ``table``
    ranked against themselves (``train_eval``), as ``val/<name>``."""
    data = table.dataset(rows)
    names = table.labels.class_names

    def evaluate(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        # Distributed evaluation: each rank embeds its shard, every rank gets all embeddings.
        options = PredictOptions(ctx.device, ctx.amp, cfg.eval.batch_size, cfg.trainer.num_workers)
        emb = embed(model, data, options.but(desc="train_eval embeddings"))
        metrics, _, scores = score(emb, emb, cfg, names, exclude_self=True)
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
    run: RunContext,
    logger: RunLogger,
    result: TrainResult,
    amp: AmpPolicy,
) -> dict[str, Any]:
    """Test split ranked against the train archive with the best weights; tables, plots, JSON.
    Rank 0 only, so the embedding is not sharded.

    The model is the best checkpoint's (the final one's when no best was kept), rebuilt as
    ctretrieval-eval rebuilds it: that checkpoint is the run's one copy of those weights.
    """
    kept = [p for p in (result.best_path, result.final_path) if p is not None and p.is_file()]
    if not kept:
        raise CheckpointError(run.run_dir, "training kept neither a best nor a final checkpoint")
    weights = kept[0]
    model, _ = load_model(weights, run.device)
    options = PredictOptions(
        run.device, amp, cfg.eval.batch_size, cfg.trainer.num_workers, shard=False
    )
    query, db = (
        embed(model, table.dataset(splits[split]), options.but(desc=split))
        for split in ("test", "train")
    )
    names = table.labels.class_names
    metrics, baseline, scores = score(query, db, cfg, names, exclude_self=False, intervals=True)
    for c, name in enumerate(names):
        logger.log_pr_curve(f"test_pr/{name}", query.labels[:, c] > 0, scores[:, c], 0)
    rows = metric_rows(metrics, baseline)
    atomic_write_csv(run.run_dir / "test_metrics.csv", pd.DataFrame(rows))
    curves = {
        name: (query.labels[:, c].numpy() > 0, scores[:, c].numpy()) for c, name in enumerate(names)
    }
    plot_roc_curves(curves, run.run_dir / "plots" / "test_roc.png", title="test findings")
    history = result.history
    if history:
        keys = [
            k for k in ("val/micro_f1", "val/map@10", "val/ndcg@10") if any(k in r for r in history)
        ]
        plot_training_curves(history, keys, run.run_dir / "plots" / "train_eval_curves.png")
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
        "n_boot": cfg.eval.n_boot,
        "test": metrics,
        "random": baseline,
    }
    logger.write_final(summary)
    return summary


def main(args: argparse.Namespace) -> int:
    """``ctretrieval-train`` with parsed arguments (see :mod:`ctretrieval.cli`)."""
    request = resolve_run(
        args,
        CTRetrievalConfig,
        "ctretrieval",
        "default",
        smoke_overrides=SMOKE_DEMO_OVERRIDES if args.data_dir is None else (),
    )
    cfg: CTRetrievalConfig = request.cfg
    if cfg.mode == "triplet" and (cfg.sampler.n_classes < 2 or cfg.sampler.n_samples < 1):
        raise ConfigError(
            "sampler",
            "a triplet batch needs n_classes >= 2 (for negatives) and n_samples >= 1 "
            f"(got {cfg.sampler.n_classes} x {cfg.sampler.n_samples})",
        )
    if not args.dry_run:  # a dry run builds the architecture only: no weights are read
        require_pretrained(
            cfg.model.pretrained, cfg.model.pretrained_weights, "model.pretrained", RESNET18_HINT
        )
        with_weights_normalisation(cfg.model, report=False)  # weights that cannot be found
    with start_run(request) as run:
        if not args.dry_run:
            return _train(run.cfg, run)
        # The architecture only: random initialisation on the meta device, no weights read.
        scratch = dataclasses.replace(
            model_config(run.cfg), pretrained=False, pretrained_weights=None
        )
        dry_run(
            lambda: build_model(dataclasses.replace(run.cfg, model=scratch)),
            run.run_dir,
            extra={
                "mode": cfg.mode,
                "backbone": "torchvision resnet18 trunk",
                "input": {"slices": scratch.num_slices, "image_size": list(scratch.image_size)},
                # As configured; training takes them from the weights' config when it has one.
                "normalisation": {"mean": list(scratch.mean), "std": list(scratch.std)},
            },
        )
        return 0


def _train(cfg: CTRetrievalConfig, run: RunContext) -> int:
    # First, so that weights that cannot be found stop the run before any data is read.
    model_cfg = with_weights_normalisation(model_config(cfg), report=run.dist.is_main)
    cfg = dataclasses.replace(cfg, model=model_cfg)  # what the checkpoint stores and rebuilds
    if run.dist.is_main:  # the demo is generated and preprocessed once, by rank 0
        table = load_studies(cfg.data, cfg.preprocess)
    barrier()
    if not run.dist.is_main:
        table = load_studies(cfg.data, cfg.preprocess, show_progress=False)
    splits = _splits(cfg, table, run)
    _warn_graded_threshold(cfg, table.labels.y[:, :-1])
    model = build_model(cfg)
    if run.dist.is_main:
        source = model_cfg.pretrained_weights
        print(f"init: ResNet-18 trunk {'pretrained from ' + source if source else 'from scratch'}")

    tcfg = cfg.trainer
    if tcfg.checkpoint_prefix == "model":
        tcfg = dataclasses.replace(tcfg, checkpoint_prefix=cfg.mode)

    train_rows = splits["train"]
    sampler = None
    if cfg.mode == "triplet":
        sampler = balanced_sampler(
            table.labels.y[train_rows],
            table.labels.label_ids[train_rows],
            cfg.sampler,
            cfg.seed,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
            batches_per_epoch=tcfg.max_steps_per_epoch
            and tcfg.max_steps_per_epoch * tcfg.grad_accum_steps,
        )
    augment = VolumeAugmentation(cfg.augment).to(run.device) if cfg.augment.enabled else None
    logger = RunLogger(run.run_dir, enabled=run.dist.is_main)
    trainer = Trainer(
        model,
        tcfg,
        train_data=table.dataset(train_rows),
        fabric=run.fabric,
        step_fn=make_step_fn(cfg, augment),
        run_dir=run.run_dir,
        kind=model_kind(cfg),
        seed=cfg.seed,
        batch_sampler=sampler,
        evaluate_fn=make_evaluate_fn(cfg, table, splits["train_eval"]),
        logger=logger,
        extra_state={
            "model_config": to_dict(model_cfg),
            "data_config": to_dict(cfg.data),
            "preprocess_config": to_dict(cfg.preprocess),
            "eval_config": to_dict(cfg.eval),
            "trainer_config": to_dict(tcfg),
            "class_names": table.labels.class_names,
            "mode": cfg.mode,
        },
    )
    result = trainer.fit(resume=run.resume)
    if run.dist.is_main:
        _final_report(cfg, table, splits, run, logger, result, trainer.amp)
        print(f"run directory: {run.run_dir}")
    logger.close()
    return 0


def _warn_graded_threshold(cfg: CTRetrievalConfig, findings: np.ndarray) -> None:
    """Graded targets cap a slot's target at 1/|L|: say so when the threshold cannot reach it."""
    if cfg.mode != "microf1" or cfg.loss.targets != "jaccard" or not len(findings):
        return
    most = int((findings > 0).sum(1).max())
    if most > 1 and cfg.eval.threshold > 1 / most:
        n = int(((findings > 0).sum(1) * cfg.eval.threshold > 1).sum())
        print(
            f"warning: loss.targets=jaccard asks 1/{most} of each finding of a study with {most}; "
            f"at eval.threshold={cfg.eval.threshold} the findings of {n} studies cannot be "
            f"predicted (set eval.threshold <= {1 / most:.2f})",
            file=sys.stderr,
        )
