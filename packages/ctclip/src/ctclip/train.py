"""ctclip-train: contrastive training of the 3D CT CLIP model on the medcore Trainer.

Without ``--data-dir`` the built-in demo runs: synthetic CT-RATE-format data is generated once
(cached), preprocessed to HDF5 (resumable, cached beside it), trained on and evaluated zero-shot.
"""

from __future__ import annotations

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
from ctclip.evaluate import (
    KIND,
    auc_per_finding,
    format_summary,
    json_safe,
    summarize,
    write_report,
)
from ctclip.findings import FINDINGS
from ctclip.losses import ClipLoss
from ctclip.model import CTCLIP
from ctclip.preprocess import run_preprocess, volume_shape
from ctclip.synthetic import generate_demo
from ctclip.text import Tokenizer
from ctclip.zeroshot import predict
from medcore.checkpoint import export_safetensors, load_checkpoint
from medcore.cli import RunContext
from medcore.config import to_dict
from medcore.demo import ensure_demo_data
from medcore.distributed import barrier
from medcore.errors import DataError, UserError
from medcore.splits import save_splits
from medcore.trainer import EvalContext, Trainer

DEMO_SEED = 0  # the demo data does not depend on --seed, so every run shares one cache


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


def make_validation_fn(val_ds: CTVolumeDataset, tokenizer: Tokenizer, batch_size: int):
    """Zero-shot AUC per finding, logged as ``val/auc/<finding>`` and ``val/mean_auc``."""

    def evaluate_fn(model: CTCLIP, ctx: EvalContext) -> dict[str, float]:
        probs, labels = predict(model, val_ds, tokenizer, ctx.device, ctx.amp, batch_size)
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


def run_train(ctx: RunContext) -> dict[str, Any]:
    cfg: CTClipConfig = ctx.cfg
    if cfg.use_ddp and not ctx.dist.enabled:
        raise UserError(
            "--use-ddp", "no process group: start the command with torchrun --nproc_per_node=N"
        )
    demo = cfg.data.data_dir is None
    if demo:
        cfg = prepare_demo(cfg, ctx.dist.is_main)
    paths = resolve_paths(cfg.data)
    tokenizer = Tokenizer(cfg.model.context_length)
    reports = read_reports(paths.txt_filepath, cfg.data.text_column)
    train_names = match_names(
        sorted(reports), paths.ct_filepath, paths.txt_filepath, cfg.data.allow_missing
    )
    check_volume_shape(paths.ct_filepath, cfg.model.image_size)
    check_store(paths.ct_filepath, cfg.data)
    train_ds = CTReportDataset(
        paths.ct_filepath, reports, train_names, tokenizer, cfg.data.sentence_sampling
    )

    val_ds = None
    if cfg.validation.do_validate:
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

    model = CTCLIP.from_config(cfg.model)
    loss_fn = ClipLoss()

    def step_fn(train_model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        image, text, scale = train_model(batch["volume"], batch["tokens"])
        return loss_fn(image, text, scale), {"logit_scale": float(scale.detach())}

    trainer = Trainer(
        model,
        cfg.trainer,
        train_data=train_ds,
        step_fn=step_fn,
        run_dir=ctx.run_dir,
        device=ctx.device,
        kind=KIND,
        seed=cfg.seed,
        evaluate_fn=make_validation_fn(val_ds, tokenizer, cfg.validation.batch_size)
        if val_ds
        else None,
        param_groups=model.param_groups(
            cfg.trainer.lr, cfg.backbone_lr_scale, cfg.trainer.weight_decay
        ),
        extra_state={
            "model_config": to_dict(cfg.model),
            "text_column": cfg.data.text_column,
            "findings": list(FINDINGS),
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
    export_safetensors(
        model.state_dict(),
        ctx.run_dir / "checkpoints" / "final.safetensors",
        metadata={"kind": KIND},
    )
    if val_ds is not None:
        weights = (
            result.best_path
            if result.best_path and result.best_path.is_file()
            else result.final_path
        )
        model.load_state_dict(load_checkpoint(weights, kind=KIND)["model"])
        probs, labels = predict(
            model, val_ds, tokenizer, ctx.device, trainer.amp, cfg.validation.batch_size
        )
        report = summarize(
            probs.numpy(), labels.numpy(), n_boot=cfg.validation.n_boot, seed=cfg.seed
        )
        write_report(ctx.run_dir, val_ds.names, probs.numpy(), labels.numpy(), report)
        print(
            f"\nzero-shot on {len(val_ds)} validation volumes ({Path(weights).name}):",
            file=sys.stderr,
        )
        print(format_summary(report))
        summary.update(
            {
                "checkpoint": str(weights),
                "mean_auc": report["mean"]["auc"],
                "num_evaluated_findings": report["num_evaluated"],
                "zero_shot": report["mean"],
                "auc_per_finding": {
                    r["finding"]: r["auc"] for r in report["per_finding"] if np.isfinite(r["auc"])
                },
            }
        )
    trainer.logger.write_final(json_safe(summary))
    trainer.logger.close()
    return summary
