"""The 4-phase training: frozen trunk -> full fine-tune -> + symmetry -> + distance.

Each phase is one medcore Trainer run in ``<run_dir>/<phase>/`` (its own latest/final
checkpoints, metrics.jsonl and TensorBoard events, so an interrupted chain resumes inside the
phase it stopped in). The best checkpoint of a phase (lowest validation mean pixel error) is
copied to ``<run_dir>/checkpoints/`` under the spec's name (phase1_best.pt, phase2_best.pt,
geometric_symmetry.pt, geometric_complete.pt) and the next phase starts from it.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlandmarks.config import PHASES, CxrConfig, PhaseConfig
from cxrlandmarks.data import LandmarkDataset, LandmarkRecord, load_records, split_records
from cxrlandmarks.evaluate import (
    REFERENCE_SIZE,
    error_report,
    predict_dataset,
    summary_row,
    write_report,
)
from cxrlandmarks.losses import build_loss
from cxrlandmarks.model import KIND, ResNetLandmarkRegressor, build_model
from cxrlandmarks.synthetic import write_dataset
from medcore.checkpoint import export_safetensors, load_checkpoint
from medcore.cli import RunContext, find_run, format_table
from medcore.config import to_dict
from medcore.demo import ensure_demo_data
from medcore.distributed import barrier
from medcore.errors import UserError
from medcore.io import atomic_path, atomic_write_json
from medcore.logging import RunLogger
from medcore.metrics import landmark_errors
from medcore.plots import plot_training_curves
from medcore.splits import load_splits, save_splits
from medcore.trainer import EvalContext, Trainer

PACKAGE = "cxrlandmarks"
DEMO_VERSION = "v1"


def resolve_data_dir(cfg: CxrConfig) -> Path:
    """The user's data directory, or the cached synthetic demo (generated on first use)."""
    if cfg.data.data_dir is not None:
        path = Path(cfg.data.data_dir)
        if not path.is_dir():
            raise UserError(path, "data directory not found")
        return path
    n = cfg.data.demo_images_per_category
    return ensure_demo_data(
        PACKAGE, lambda root: write_dataset(root, n, seed=0), version=f"{DEMO_VERSION}-{n}"
    )


def prepare_splits(
    cfg: CxrConfig, run_dir: Path
) -> tuple[list[LandmarkRecord], dict[str, np.ndarray]]:
    """Records and the stratified split (reused from ``data.splits_file`` or the run dir)."""
    records = load_records(cfg.data, resolve_data_dir(cfg))
    names = [r.name for r in records]
    saved = Path(cfg.data.splits_file) if cfg.data.splits_file else run_dir / "splits.json"
    if saved.is_file():
        try:
            splits = load_splits(saved, ids=names)
        except ValueError as exc:
            raise UserError(saved, str(exc)) from None
    else:
        splits = split_records(records, cfg.data.split_ratios, cfg.data.split_seed)
        save_splits(
            run_dir / "splits.json",
            splits,
            ids=names,
            meta={
                "seed": cfg.data.split_seed,
                "ratios": cfg.data.split_ratios,
                "stratify": "category",
            },
        )
    for name in ("train", "val", "test"):
        if name not in splits or len(splits[name]) == 0:
            raise UserError(
                "data.split_ratios", f"the {name!r} split is empty ({len(records)} usable images)"
            )
    return records, splits


def _copy_atomic(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def phase_trainer_config(cfg: CxrConfig, phase: PhaseConfig):
    return dataclasses.replace(
        cfg.trainer,
        epochs=phase.epochs,
        batch_size=phase.batch_size,
        lr=phase.head_lr,
        weight_decay=phase.weight_decay,
        best_name=phase.checkpoint,
        max_steps_per_epoch=phase.max_steps_per_epoch or cfg.trainer.max_steps_per_epoch,
    )


def build_phase_model(
    cfg: CxrConfig, phase: PhaseConfig, init_path: Path | None
) -> ResNetLandmarkRegressor:
    model = build_model(cfg.model)
    if init_path is not None:
        state = load_checkpoint(init_path, kind=KIND)
        model.load_state_dict(state["model"])
    elif cfg.model.pretrained_weights is not None:
        model.load_pretrained_trunk(cfg.model.pretrained_weights)
    model.freeze_trunk(phase.freeze_trunk)
    return model


def run_phase(
    name: str,
    ctx: RunContext,
    records: list[LandmarkRecord],
    splits: dict[str, np.ndarray],
    init_path: Path | None,
    resume: Path | None = None,
) -> Path:
    """Train one phase; returns the path of its best checkpoint in ``<run_dir>/checkpoints``."""
    cfg: CxrConfig = ctx.cfg
    phase: PhaseConfig = getattr(cfg.phases, name)
    model = build_phase_model(cfg, phase, init_path)
    criterion = build_loss(
        phase.loss,
        w=cfg.loss.wing_w,
        epsilon=cfg.loss.wing_epsilon,
        pixel_scale=cfg.loss.pixel_scale,
        symmetry_weight=cfg.loss.symmetry_weight,
        distance_weight=cfg.loss.distance_weight,
        symmetry_reference=cfg.loss.symmetry_reference,
    )
    size = cfg.data.image_size
    train_set = LandmarkDataset(
        [records[i] for i in splits["train"]], size, cfg.augment, cache=cfg.data.cache_images
    )
    val_records = [records[i] for i in splits["val"]]
    val_set = LandmarkDataset(val_records, size, cache=cfg.data.cache_images)
    val_target = np.stack([r.normalised for r in val_records])

    def step_fn(
        net: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pred = net(batch["image"])
        loss = criterion(pred, batch["target"])
        return loss, dict(getattr(criterion, "last", {}))

    def evaluate_fn(net: torch.nn.Module, ectx: EvalContext) -> dict[str, float]:
        pred = predict_dataset([net], val_set, ectx.device, cfg.data.eval_batch_size)
        e = landmark_errors(pred, val_target, scale=REFERENCE_SIZE)
        return {
            "val/mean_px": e["mean"],
            "val/median_px": e["median"],
            "val/under_8.5px": e["under_8.5px"],
        }

    groups = [
        {"params": list(model.trunk_parameters()), "lr": phase.trunk_lr, "name": "trunk"},
        {"params": list(model.head_parameters()), "lr": phase.head_lr, "name": "head"},
    ]
    trainer = Trainer(
        model,
        phase_trainer_config(cfg, phase),
        train_data=train_set,
        step_fn=step_fn,
        run_dir=ctx.run_dir / name,
        device=ctx.device,
        kind=KIND,
        evaluate_fn=evaluate_fn,
        param_groups=groups,
        seed=cfg.seed,
        extra_state={
            "model_config": to_dict(cfg.model),
            # Absolute, so that cxrlandmarks-eval finds the data from any working directory.
            "data_config": {
                **to_dict(cfg.data),
                "data_dir": str(Path(cfg.data.data_dir).resolve()) if cfg.data.data_dir else None,
            },
            "phase": name,
            "loss": phase.loss,
            "init_from": str(init_path) if init_path else None,
        },
    )
    print(
        f"[{name}] loss={phase.loss} epochs={phase.epochs} trunk_lr={phase.trunk_lr if not phase.freeze_trunk else 'frozen'} "
        f"head_lr={phase.head_lr} batch={trainer.batch_size} input={size}px init={init_path or 'scratch'}"
    )
    result = trainer.fit(resume=resume)
    trainer.logger.close()
    if ctx.dist.is_main and result.history:
        plot_training_curves(
            result.history,
            ["val/mean_px", "val/median_px"],
            ctx.run_dir / "plots" / f"{name}_val_px.png",
        )
    best = result.best_path or result.final_path
    if best is None:
        raise UserError(name, "training wrote no checkpoint")
    target = ctx.run_dir / "checkpoints" / phase.checkpoint
    if ctx.dist.is_main:
        _copy_atomic(best, target)
    barrier()  # the next phase starts from this file on every rank
    return target


def phases_to_run(selection: str) -> list[str]:
    return list(PHASES) if selection == "all" else [f"phase{selection}"]


def run_training(
    ctx: RunContext, selection: str, init_from: Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the selected phase(s), then evaluate every finished phase on the test split."""
    cfg: CxrConfig = ctx.cfg
    records, splits = prepare_splits(cfg, ctx.run_dir)
    print(f"data: {len(records)} images ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})")
    ckpt_dir = ctx.run_dir / "checkpoints"
    selected = phases_to_run(selection)
    for name in selected:
        phase: PhaseConfig = getattr(cfg.phases, name)
        phase_dir = ctx.run_dir / name / "checkpoints"
        if (
            resume
            and (phase_dir / "final.pt").is_file()
            and (ckpt_dir / phase.checkpoint).is_file()
        ):
            print(f"[{name}] already finished in this run: kept {ckpt_dir / phase.checkpoint}")
            continue
        init = None
        if phase.init_from is not None:
            previous: PhaseConfig = getattr(cfg.phases, phase.init_from)
            init = (
                init_from
                if (init_from is not None and name == selected[0])
                else ckpt_dir / previous.checkpoint
            )
            if not init.is_file():
                raise UserError(
                    f"--phase {name[-1]}",
                    f"starts from {phase.init_from}'s best checkpoint {init}, which does not exist: run "
                    f"--phase {phase.init_from[-1]} first with the same --output-dir, or pass --init-from PATH",
                )
        latest = ctx.run_dir / name / "checkpoints" / "latest.pt"
        run_phase(
            name, ctx, records, splits, init, resume=latest if resume and latest.is_file() else None
        )
    if not ctx.dist.is_main:
        return {}
    final_name = getattr(cfg.phases, selected[-1]).checkpoint
    export_safetensors(
        load_checkpoint(ckpt_dir / final_name, kind=KIND)["model"],
        ckpt_dir / (Path(final_name).stem + ".safetensors"),
        metadata={"kind": KIND},
    )
    return report_phases(ctx, records, splits)


def report_phases(
    ctx: RunContext, records: list[LandmarkRecord], splits: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Test-split evaluation of every phase checkpoint present; full report for the last one."""
    from cxrlandmarks.evaluate import load_model

    cfg: CxrConfig = ctx.cfg
    test_records = [records[i] for i in splits["test"]]
    rows, reports = [], {}
    last = None
    for name in PHASES:
        path = ctx.run_dir / "checkpoints" / getattr(cfg.phases, name).checkpoint
        if not path.is_file():
            continue
        model, _ = load_model(path, ctx.device)
        pred = predict_dataset(
            [model],
            LandmarkDataset(test_records, cfg.data.image_size),
            ctx.device,
            cfg.data.eval_batch_size,
        )
        reports[name] = error_report(pred, test_records)
        rows.append(summary_row(f"{name} ({path.name})", reports[name]))
        last = (name, pred)
    assert last is not None
    name, pred = last
    write_report(reports[name], pred, test_records, ctx.run_dir / "eval", cfg.eval.grid_images)
    print_phase_table(rows)
    write_phase_table(rows, ctx.run_dir / "eval")
    metrics = {
        "final_phase": name,
        **{k: v for k, v in rows[-1].items() if k != "model"},
        "phases": {n: summary_row(n, r) for n, r in reports.items()},
    }
    logger = RunLogger(ctx.run_dir)
    for step, (n, r) in enumerate(reports.items(), start=1):
        logger.log_scalars(
            {f"test/{k}": v for k, v in summary_row(n, r).items() if isinstance(v, float)}, step
        )
    logger.write_final(metrics)
    logger.close()
    return metrics


def print_phase_table(rows: Sequence[dict[str, Any]]) -> None:
    print("\ntest split, errors in px at 224 (shares are of images under the threshold)")
    print(format_table(rows, floatfmt=".3f"))


def write_phase_table(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    import pandas as pd

    from medcore.io import atomic_write_csv

    atomic_write_csv(out_dir / "phase_comparison.csv", pd.DataFrame(rows))
    atomic_write_json(out_dir / "phase_comparison.json", list(rows))


def _run_dir_for_resume(resume: str, output_dir: Path | None) -> Path:
    """The run directory that ``--resume latest|PATH`` continues."""
    if resume == "latest":
        return find_run(PACKAGE, output_dir, "phase*/checkpoints/latest.pt")[0]
    path = Path(resume)
    if not path.is_file():
        raise UserError(path, "checkpoint not found")
    if path.parent.name != "checkpoints" or path.parents[1].name not in PHASES:
        raise UserError(
            path, "expected <run_dir>/phaseN/checkpoints/latest.pt (or use --resume latest)"
        )
    return path.parents[2]


def train_command(args: Any) -> int:
    """``cxrlandmarks-train``: the demo with no arguments, real data with ``--data-dir``."""
    import contextlib

    from medcore.cli import continue_run, setup_run
    from medcore.io import RunLock

    preset = args.preset or ("paper" if args.data_dir is not None else "default")
    resume = args.resume
    args.resume = None  # phases resume themselves (one latest.pt per phase)
    if resume:  # continue with the interrupted run's settings and data
        continue_run(args, _run_dir_for_resume(resume, args.output_dir))
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        # Checked before setup_run creates the run directory: nothing is left behind.
        raise UserError(args.data_dir, "data directory not found")
    if args.epochs is not None:
        args.overrides = [*(f"phases.{p}.epochs={args.epochs}" for p in PHASES), *args.overrides]
    smoke = [
        *(f"phases.{p}.epochs=1" for p in PHASES),
        *(f"phases.{p}.max_steps_per_epoch=2" for p in PHASES),
        "data.demo_images_per_category=20",
        "eval.grid_images=4",
    ]
    ctx = setup_run(args, CxrConfig, PACKAGE, preset, smoke_overrides=smoke)
    print(f"cxrlandmarks-train: preset={preset} device={ctx.device} run_dir={ctx.run_dir}")
    lock = RunLock(ctx.run_dir) if ctx.dist.is_main else contextlib.nullcontext()
    try:
        with lock:
            metrics = run_training(ctx, args.phase, args.init_from, resume=bool(resume))
    finally:
        ctx.release()  # the run directory is free again once this job ends, even in-process
    if ctx.dist.is_main:
        print(
            f"\nfinal ({metrics['final_phase']}): mean {metrics['mean_px']:.2f} px at 224, "
            f"{100 * metrics['<8.5px']:.0f}% of test images under 8.5 px; outputs in {ctx.run_dir}"
        )
    return 0
