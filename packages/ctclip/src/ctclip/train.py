"""ctclip-train: contrastive training of the 3D CT CLIP model on the medcore Trainer.

Without ``--data-dir`` the built-in demo runs: synthetic CT-RATE-format data is generated once
(cached), preprocessed to HDF5 (resumable, cached beside it), trained on and evaluated zero-shot.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctclip.config import CTClipConfig
from ctclip.data import (
    CTReportDataset,
    CTVolumeDataset,
    check_store,
    match_names,
    read_labels,
    read_reports,
    resolve_paths,
)
from ctclip.evaluate import auc_per_finding, final_report, json_safe
from ctclip.findings import FINDINGS
from ctclip.gradcache import cached_embeddings
from ctclip.impressions import fill_impressions
from ctclip.losses import ClipLoss
from ctclip.model import (
    CTCLIP,
    KIND,
    build_model,
    check_weights,
    component_counts,
    init_line,
    timm_backbone_name,
)
from ctclip.predict import predict
from ctclip.preprocess import run_preprocess, volume_shape
from ctclip.synthetic import generate_demo
from ctclip.text import Tokenizer
from medcore.cli.dry_run import build_on_meta, dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.config import to_dict
from medcore.data.demo_cache import ensure_demo_data
from medcore.data.splits import save_splits
from medcore.engine.task import EvalContext
from medcore.engine.trainer import Trainer
from medcore.errors import ConfigError, DataError, UserError
from medcore.runtime.distributed import barrier, launched_world
from medcore.weights.checkpoint import load_checkpoint

DEMO_SEED = 0  # the demo data does not depend on --seed, so every run shares one cache
SMOKE = [  # a smaller demo, so that --smoke is quick even with a cold cache
    "data.demo_train_volumes=24",
    "data.demo_valid_volumes=12",
    "trainer.batch_size=8",
    "validation.n_boot=50",
]


def processes(cfg: CTClipConfig) -> int:
    """How many ranks the run will have: what torchrun/SLURM started, else ``--devices``."""
    world = launched_world()[0]
    return world if world > 1 else cfg.trainer.devices or 1


def check_config(cfg: CTClipConfig) -> None:
    """Settings that contradict each other or that the run would ignore are errors."""
    if cfg.data.completed_impressions and cfg.data.text_column == "findings":
        raise ConfigError(
            "data.completed_impressions",
            "the texts are the findings only (data.text_column=findings): set text_column "
            "to impressions or both to train on the generated impressions",
        )
    if cfg.grad_cache_chunk_size < 0:
        raise ConfigError("grad_cache_chunk_size", "must be >= 0 (0: no gradient cache)")
    if cfg.grad_cache_chunk_size and cfg.trainer.grad_accum_steps > 1:
        raise ConfigError(
            "grad_cache_chunk_size",
            "use either the gradient cache or trainer.grad_accum_steps, not both (the cache "
            "already runs the batch in chunks; accumulation would split its negatives)",
        )
    if cfg.use_ddp and processes(cfg) < 2:
        raise UserError(
            "--use-ddp", "no process group: start the command with torchrun --nproc_per_node=N"
        )
    if cfg.grad_cache_chunk_size and processes(cfg) > 1:
        raise ConfigError(
            "grad_cache_chunk_size",
            "the gradient cache runs in one process only; under DDP every rank's batch already "
            "meets all ranks' negatives (set it to 0)",
        )


def main(args: argparse.Namespace) -> int:
    """ctclip-train: the config is checked before a run directory is made; ``--dry-run`` then
    builds the model on the meta device, otherwise it trains."""
    if args.from_scratch and args.pretrained_weights:
        raise UserError("--from-scratch", "given together with --pretrained-weights: choose one")
    request = resolve_run(args, CTClipConfig, "ctclip", "default", smoke_overrides=SMOKE)
    cfg = request.cfg
    check_config(cfg)
    if not args.dry_run and not args.resume:  # a resumed run has its checkpoint's weights
        # The text activation is written to config.yaml: a resumed run rebuilds the same tower.
        cfg.model.text_quick_gelu = check_weights(cfg.model).quick_gelu
    with start_run(request) as ctx:
        if not args.dry_run:
            _train(ctx)
            return 0
        return _dry_run(ctx)


def _dry_run(ctx: RunContext) -> int:
    cfg: CTClipConfig = ctx.cfg

    def build() -> CTCLIP:
        return build_model(cfg, load_weights=False)

    extra = {
        "backbone": timm_backbone_name(cfg.model.dinov2_model_name),
        "components": component_counts(build_on_meta(build)),
    }
    dry_run(build, ctx.run_dir, extra=extra)
    return 0


def prepare_demo(cfg: CTClipConfig, is_main: bool) -> CTClipConfig:
    """Generate (once) and preprocess (resumable) the demo data; point ``cfg.data`` at it."""
    d = cfg.data
    version = f"v5-{d.demo_train_volumes}-{d.demo_valid_volumes}"

    def generate(root: Path) -> None:
        generate_demo(root, d.demo_train_volumes, d.demo_valid_volumes, seed=DEMO_SEED)

    shape = tuple(d.demo_target_shape)
    h5_name = "ct_volumes_{}x{}x{}.store1.h5".format(*shape)  # store1: medcore volume store
    root = ensure_demo_data("ctclip", generate, version=version) if is_main else None
    if is_main:
        csv = root / "ct_rate"
        run_preprocess(
            root / "ct_volumes",
            root / h5_name,
            [csv / "train_metadata.csv", csv / "validation_metadata.csv"],
            shape,
            num_workers=0,
            show_progress=True,
        )
    barrier()
    if root is None:
        root = ensure_demo_data("ctclip", generate, version=version)
    data = dataclasses.replace(d, data_dir=str(root), ct_filepath=h5_name, val_ct_filepath=None)
    return dataclasses.replace(cfg, data=data)


def check_volume_shape(h5_path: Path, image_size: int) -> None:
    shape = volume_shape(h5_path)
    if shape[1:] != (image_size, image_size):
        raise DataError(
            h5_path,
            f"holds {shape[1]}x{shape[2]} slices but model.image_size is {image_size} "
            f"(set model.image_size={shape[1]} or preprocess with a matching --target-shape)",
        )


def make_evaluate_fn(
    val_ds: CTVolumeDataset, tokenizer: Tokenizer, batch_size: int, num_workers: int | None
):
    """Zero-shot AUC per finding, logged as ``val/auc/<finding>`` and ``val/mean_auc``; under
    DDP each rank embeds its shard of the validation volumes (medcore.engine.inference.predict)."""

    def evaluate_fn(model: CTCLIP, ctx: EvalContext) -> dict[str, float]:
        probs, labels = predict(
            model, val_ds, tokenizer, ctx.device, ctx.amp, batch_size, num_workers
        )
        aucs = auc_per_finding(probs.numpy(), labels.numpy())
        metrics = {
            f"val/auc/{f.replace(' ', '_')}": float(a)
            for f, a in zip(FINDINGS, aucs, strict=True)
            if np.isfinite(a)
        }
        metrics["val/mean_auc"] = (
            float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
        )
        metrics["val/logit_scale"] = float(model.scale())
        return metrics

    return evaluate_fn


def make_step_fn(model: CTCLIP, chunk_size: int):
    """The Trainer's step: the contrastive loss of a batch, through the gradient cache when
    ``chunk_size`` is smaller than the batch, and its terms and the logit scale to log (device
    tensors: the trainer reads them at logging steps only)."""
    loss_fn = ClipLoss()

    def step_fn(train_model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        volume, tokens = batch["volume"], batch["tokens"]
        if chunk_size and chunk_size < len(volume):
            image, text = cached_embeddings(
                lambda v, t: train_model(v, t)[:2], volume, tokens, chunk_size, model.logit_scale
            )
            scale = model.scale()
        else:
            image, text, scale = train_model(volume, tokens)
        loss, terms = loss_fn(image, text, scale)
        return loss, {**terms, "logit_scale": scale.detach()}

    return step_fn


def training_reports(cfg: CTClipConfig, txt_filepath: Path, ctx: RunContext) -> Path:
    """The reports table to train on: with ``data.completed_impressions``, a copy in the run
    directory whose missing impressions are filled from ctclip-impressions' JSON."""
    if not cfg.data.completed_impressions:
        return txt_filepath
    completed = Path(cfg.data.completed_impressions).expanduser()
    if not completed.is_absolute() and cfg.data.data_dir:
        completed = Path(cfg.data.data_dir) / completed
    filled = ctx.run_dir / "train_reports_completed.csv"
    if ctx.dist.is_main:
        fill_impressions(txt_filepath, completed, filled)
    barrier()
    return filled


def _train(ctx: RunContext) -> dict[str, Any]:
    """Train on the run's data (the demo's without ``data.data_dir``), export the best weights
    and write the zero-shot report of the validation set; returns the summary written to
    ``metrics.json``."""
    cfg: CTClipConfig = ctx.cfg  # checked by check_config before the run started
    if cfg.trainer.grad_accum_steps > 1:
        print(
            f"note: trainer.grad_accum_steps={cfg.trainer.grad_accum_steps} averages gradients, "
            f"but each contrastive loss sees only its own {cfg.trainer.batch_size} pairs; "
            "grad_cache_chunk_size enlarges the contrastive batch itself",
            file=sys.stderr,
        )
    demo = cfg.data.data_dir is None
    if demo:
        cfg = prepare_demo(cfg, ctx.dist.is_main)
    paths = resolve_paths(cfg.data)
    tokenizer = Tokenizer(cfg.model.context_length)
    reports = read_reports(training_reports(cfg, paths.txt_filepath, ctx), cfg.data.text_column)
    train_names = match_names(
        sorted(reports), paths.ct_filepath, paths.txt_filepath, cfg.data.allow_missing
    )
    check_volume_shape(paths.ct_filepath, cfg.model.image_size)
    # The store's settings (target shape, slice order, HU window, orientation) travel in the
    # checkpoint: ctclip.load preprocesses raw volumes with them.
    preprocessing = check_store(paths.ct_filepath, cfg.data)
    train_ds = CTReportDataset(
        paths.ct_filepath, reports, train_names, tokenizer, cfg.data.sentence_sampling
    )

    val_ds = None
    if cfg.validation.do_validate:
        if paths.unsplit_validation:
            print(
                f"note: validating on {paths.val_label_path}, all of CT-RATE's validation "
                "volumes; for a patient-wise validation/test split run ctclip-split and pass "
                "--val-label-path <its output>/valid_predicted_labels.csv",
                file=sys.stderr,
            )
        labels = read_labels(paths.val_label_path)
        val_names = match_names(
            list(labels.index), paths.val_ct_filepath, paths.val_label_path, cfg.data.allow_missing
        )
        check_volume_shape(paths.val_ct_filepath, cfg.model.image_size)
        check_store(paths.val_ct_filepath, cfg.data)
        val_ds = CTVolumeDataset(paths.val_ct_filepath, labels, val_names)
    if ctx.dist.is_main:
        # The split is given by the files; recording the member names makes the run reproducible.
        names = [*train_names, *(val_ds.names if val_ds else [])]
        splits = {"train": np.arange(len(train_names))}
        if val_ds:
            splits["val"] = np.arange(len(train_names), len(names))
        save_splits(
            ctx.run_dir / "splits.json",
            splits,
            meta={"source": "files", "data": to_dict(cfg.data)},
            ids=names,
        )

    model = build_model(cfg, load_weights=ctx.resume is None)
    print(
        f"init: resumed from {ctx.resume}"
        if ctx.resume
        else init_line(cfg.model, model.text_activation),
        file=sys.stderr,
    )
    # The normalisation and text activation the model was built with travel in the checkpoint.
    built = {**model.visual.normalization(), "text_quick_gelu": model.text_activation.quick_gelu}
    model_config = to_dict(dataclasses.replace(cfg.model, **built))
    trainer = Trainer(
        model,
        cfg.trainer,
        train_data=train_ds,
        fabric=ctx.fabric,
        step_fn=make_step_fn(model, cfg.grad_cache_chunk_size),
        run_dir=ctx.run_dir,
        kind=KIND,
        seed=cfg.seed,
        evaluate_fn=make_evaluate_fn(
            val_ds, tokenizer, cfg.validation.batch_size, cfg.trainer.num_workers
        )
        if val_ds
        else None,
        param_groups=model.param_groups(
            cfg.trainer.lr, cfg.backbone_lr_scale, cfg.trainer.weight_decay
        ),
        extra_state={
            "model_config": model_config,
            "text_column": cfg.data.text_column,
            "findings": list(FINDINGS),
            "preprocessing": preprocessing,
        },
    )
    result = trainer.fit(resume=ctx.resume)
    summary: dict[str, Any] = {
        "global_step": result.global_step,
        "epochs": result.epochs_completed,
        "best_metric": result.best_metric,
        "best_metric_name": result.best_metric_name,
    }
    if not ctx.dist.is_main or result.final_path is None:
        trainer.logger.close()
        return summary
    if val_ds is not None:
        # The report is of the run's model: its best checkpoint (else the final one), the one
        # ctclip-eval, ctclip-export and ctclip.load read from the run directory.
        weights = result.best_path or result.final_path
        model.load_state_dict(load_checkpoint(weights, map_location="cpu")["model"])
        summary.update(final_report(model, weights, val_ds, tokenizer, trainer.amp, ctx))
    trainer.logger.write_final(json_safe(summary))
    trainer.logger.close()
    return summary
