"""The 4-phase training: frozen trunk -> full fine-tune -> + symmetry -> + distance.

Each phase is one medcore stage (:mod:`medcore.cli.stages`) and one Trainer run in
``<run_dir>/<phase>/`` (its own final checkpoint, its latest.pt until it finishes, metrics.jsonl
and TensorBoard events):
a resumed chain skips its finished phases and resumes inside the one it stopped in. The images
are decoded once into medcore's image store, shared by every phase, validation and test. The best checkpoint of a phase (lowest validation mean pixel error) is
copied to ``<run_dir>/checkpoints/`` under the spec's name (phase1_best.pt, phase2_best.pt,
geometric_symmetry.pt, geometric_complete.pt) and the next phase starts from it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlandmarks.augment import augment_batch
from cxrlandmarks.config import PHASES, CxrConfig, PhaseConfig
from cxrlandmarks.data import (
    PACKAGE,
    LandmarkDataset,
    LandmarkRecord,
    RunData,
    image_store,
    load_records,
    resolve_data_dir,
    split_records,
)
from cxrlandmarks.evaluate import report_phases
from cxrlandmarks.losses import build_loss
from cxrlandmarks.model import (
    KIND,
    PRETRAINED_HINT,
    ResNetLandmarkRegressor,
    build_model,
    input_normalisation,
    load_weights,
    read_model_checkpoint,
)
from cxrlandmarks.predict import REFERENCE_SIZE, predict_dataset
from medcore.cli.dry_run import dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.cli.stages import Stage, run_stage
from medcore.config import to_dict
from medcore.data.splits import load_or_make_splits
from medcore.engine.inference import PredictOptions
from medcore.engine.task import EvalContext, EvaluateFn, StepFn
from medcore.engine.trainer import Trainer
from medcore.errors import UserError
from medcore.metrics import landmark_errors
from medcore.report.plots import plot_training_curves
from medcore.runtime.distributed import barrier
from medcore.weights.checkpoint import copy_checkpoint
from medcore.weights.pretrained import require_pretrained, resolve_weights


def prepare_splits(
    cfg: CxrConfig, run_dir: Path, is_main: bool = True
) -> tuple[list[LandmarkRecord], dict[str, np.ndarray]]:
    """Records and the stratified split (reused from ``data.splits_file`` or the run dir; made
    and saved by the main rank otherwise)."""
    records = load_records(cfg.data, resolve_data_dir(cfg.data))
    names = [r.name for r in records]
    saved = Path(cfg.data.splits_file) if cfg.data.splits_file else run_dir / "splits.json"
    splits = load_or_make_splits(
        saved,
        lambda: split_records(records, cfg.data.split_ratios, cfg.data.split_seed),
        ids=names,
        meta={"seed": cfg.data.split_seed, "ratios": cfg.data.split_ratios, "stratify": "category"},
        is_main=is_main,
    )
    for name in ("train", "val", "test"):
        if name not in splits or len(splits[name]) == 0:
            raise UserError(
                "data.split_ratios", f"the {name!r} split is empty ({len(records)} usable images)"
            )
    return records, splits


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
) -> tuple[ResNetLandmarkRegressor, str]:
    """The phase's model and a truthful description of where its weights came from."""
    model = build_model(cfg)
    if init_path is not None:
        weights, _, state = read_model_checkpoint(init_path)
        load_weights(model, weights, init_path)
        origin = "" if state.get("kind") == KIND else " (original code's model_state_dict)"
        init = f"checkpoint {init_path}{origin}"
    elif cfg.model.pretrained_weights is not None:
        report = model.load_pretrained_trunk(cfg.model.pretrained_weights)
        init = (
            f"pretrained trunk from {report.source} ({report.matched}/{report.total} tensors; "
            f"{len(report.unexpected)} unexpected)"
        )
    else:
        init = "scratch (random initialisation)"
    model.freeze_trunk(phase.freeze_trunk)
    return model, init


def run_normalisation(cfg: CxrConfig, init_path: Path | None) -> dict[str, Any]:
    """The input normalisation of a run: the starting checkpoint's, else the pretrained
    weights' own configuration's, else that of torchvision's ImageNet weights (timm)."""
    if init_path is not None:
        norm = read_model_checkpoint(init_path)[2].get("input_norm")
        if norm is not None:
            return norm
    weights = cfg.model.pretrained_weights
    return input_normalisation(resolve_weights(weights).config if weights else None)


def make_step_fn(cfg: CxrConfig, criterion: torch.nn.Module, norm: dict[str, Any]) -> StepFn:
    """One micro-batch: (batched augmentation on the device,) forward, the phase's loss.

    Returns the loss's ``(total, terms)``: the unweighted terms stay on the device, logged by
    the trainer (``train/<term>``) at logging steps only. ``norm``: the input normalisation the
    dataset applied, undone around the device-side augmentation (``augment.batched``).
    """
    batched = cfg.augment.enabled and cfg.augment.batched
    stats = torch.tensor([norm["mean"], norm["std"]]).view(2, 1, 3, 1, 1)
    on_device: dict[torch.device, torch.Tensor] = {}  # copied once, not per micro-batch

    def step_fn(
        net: torch.nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, target = batch["image"], batch["target"]
        if batched:  # on the device: back to [0, 1], augment, normalise again
            if images.device not in on_device:
                on_device[images.device] = stats.to(images.device)
            m, s = on_device[images.device]
            images, points = augment_batch(
                images * s + m, target.reshape(len(target), -1, 2), cfg.augment
            )
            images, target = (images - m) / s, points.reshape(len(target), -1)
        return criterion(net(images), target)

    return step_fn


def make_evaluate_fn(cfg: CxrConfig, val_set: LandmarkDataset) -> EvaluateFn:
    """Validation: mean and median pixel error at 224 and the share of images under 8.5 px."""
    val_target = np.stack([r.normalised for r in val_set.records])

    def evaluate_fn(net: torch.nn.Module, ectx: EvalContext) -> dict[str, float]:
        options = PredictOptions(
            ectx.device, ectx.amp, cfg.data.eval_batch_size, cfg.trainer.num_workers, desc=None
        )
        pred = predict_dataset([net], val_set, options)
        e = landmark_errors(pred, val_target, scale=REFERENCE_SIZE)
        return {
            "val/mean_px": e["mean"],
            "val/median_px": e["median"],
            "val/under_8.5px": e["under_8.5px"],
        }

    return evaluate_fn


def run_phase(
    stage: Stage,
    ctx: RunContext,
    data: RunData,
    init_path: Path | None,
    norm: dict[str, Any],
) -> dict[str, Any]:
    """Train one phase in its stage directory; its best checkpoint is copied to
    ``<run_dir>/checkpoints`` under the spec's name. Returns ``{"best", "phase_best",
    "phase_final"}`` (paths)."""
    name = stage.name
    cfg: CxrConfig = ctx.cfg
    phase: PhaseConfig = getattr(cfg.phases, name)
    model, init = build_phase_model(cfg, phase, init_path)
    size = cfg.data.image_size
    batched = cfg.augment.enabled and cfg.augment.batched
    train_set = data.dataset("train", size, norm, None if batched else cfg.augment)
    val_set = data.dataset("val", size, norm)
    groups = [
        {"params": list(model.trunk_parameters()), "lr": phase.trunk_lr, "name": "trunk"},
        {"params": list(model.head_parameters()), "lr": phase.head_lr, "name": "head"},
    ]
    trainer = Trainer(
        model,
        phase_trainer_config(cfg, phase),
        train_data=train_set,
        fabric=ctx.fabric,
        step_fn=make_step_fn(cfg, build_loss(phase.loss, cfg.loss), norm),
        run_dir=stage.dir,
        kind=KIND,
        evaluate_fn=make_evaluate_fn(cfg, val_set),
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
            "init": init,
            "input_norm": norm,
        },
    )
    trunk_lr = "frozen" if phase.freeze_trunk else phase.trunk_lr
    print(
        f"[{name}] loss={phase.loss} epochs={phase.epochs} trunk_lr={trunk_lr} "
        f"head_lr={phase.head_lr} batch={trainer.batch_size} input={size}px init={init}"
    )
    result = trainer.fit(resume=stage.resume)
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
        copy_checkpoint(best, target)
    barrier()  # the next phase starts from this file on every rank
    paths = {"best": target, "phase_best": result.best_path, "phase_final": result.final_path}
    return {k: str(Path(v).resolve()) if v is not None else None for k, v in paths.items()}


def phases_to_run(selection: str) -> list[str]:
    return list(PHASES) if selection == "all" else [f"phase{selection}"]


def phase_init(
    cfg: CxrConfig,
    name: str,
    first: bool,
    ckpt_dir: Path,
    init_from: Path | None,
    done: dict[str, dict[str, Any]],
) -> Path | None:
    """The checkpoint phase ``name`` starts from: ``--init-from`` for the first selected phase
    (any phase, phase 1 included), else the best checkpoint of the phase it follows (the
    result of that stage in this run, else its copy in ``ckpt_dir`` from an earlier run)."""
    if first and init_from is not None:
        if not Path(init_from).is_file():
            raise UserError(init_from, "checkpoint not found")
        return Path(init_from)
    phase: PhaseConfig = getattr(cfg.phases, name)
    if phase.init_from is None:
        return None
    if phase.init_from in done:
        return Path(done[phase.init_from]["best"])
    previous: PhaseConfig = getattr(cfg.phases, phase.init_from)
    init = ckpt_dir / previous.checkpoint
    if not init.is_file():
        raise UserError(
            f"--phase {name[-1]}",
            f"starts from {phase.init_from}'s best checkpoint {init}, which does not exist: run "
            f"--phase {phase.init_from[-1]} first with the same --output-dir, or pass --init-from PATH",
        )
    return init


def run_training(ctx: RunContext, selection: str, init_from: Path | None = None) -> dict[str, Any]:
    """Run the selected phase(s) as stages, then evaluate every finished phase on the test split."""
    cfg: CxrConfig = ctx.cfg
    records, splits = prepare_splits(cfg, ctx.run_dir, ctx.dist.is_main)
    print(f"data: {len(records)} images ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})")
    data = RunData(records, splits, image_store(records, cfg.data.image_size))
    ckpt_dir = ctx.run_dir / "checkpoints"
    selected = phases_to_run(selection)
    done: dict[str, dict[str, Any]] = {}
    norm: dict[str, Any] = {}
    ran: set[str] = set()  # the stages that ran in this job (the others finished earlier)

    def phase_fn(stage: Stage) -> dict[str, Any]:
        ran.add(stage.name)
        init = phase_init(cfg, stage.name, stage.name == selected[0], ckpt_dir, init_from, done)
        if not norm:  # one normalisation for every phase of the run
            norm.update(run_normalisation(cfg, init))
            print(f"input normalisation: mean {norm['mean']} std {norm['std']}")
        return run_phase(stage, ctx, data, init, norm)

    for name in selected:
        done[name] = run_stage(ctx, name, phase_fn, quiet=True)
        if name not in ran:
            print(f"[{name}] already finished in this run: kept {done[name]['best']}")
    if not ctx.dist.is_main:
        return {}
    return report_phases(ctx, data)


def check_pretrained(cfg: CxrConfig, from_scratch: bool, needs_trunk: bool) -> None:
    """Refuse a config that expects pretrained weights when none are given (unless the first
    phase starts from a checkpoint, which carries its trunk)."""
    if from_scratch and cfg.model.pretrained_weights is not None:
        raise UserError(
            "--from-scratch",
            "contradicts --pretrained-weights (model.pretrained_weights): give one",
        )
    if needs_trunk:
        require_pretrained(
            cfg.model.pretrained, cfg.model.pretrained_weights, "model.pretrained", PRETRAINED_HINT
        )


SMOKE = [  # besides one epoch of every phase: every phase runs, each a few steps
    *(f"phases.{p}.max_steps_per_epoch=2" for p in PHASES),
    "data.demo_images_per_category=20",
    "eval.grid_images=4",
]


def main(args: argparse.Namespace) -> int:
    """``cxrlandmarks-train``: the demo with no arguments, real data with ``--data-dir``."""
    config = "paper" if args.data_dir is not None else "default"  # without --config
    request = resolve_run(args, CxrConfig, PACKAGE, config, SMOKE, staged=True)
    cfg: CxrConfig = request.cfg
    # Checked before the run directory exists: a refusal leaves nothing behind.
    if cfg.data.data_dir is not None and not Path(cfg.data.data_dir).is_dir():
        raise UserError(cfg.data.data_dir, "data directory not found")
    if not args.dry_run and not args.resume:
        first = phases_to_run(args.phase)[0]
        needs_trunk = args.init_from is None and first == "phase1"
        check_pretrained(cfg, args.from_scratch, needs_trunk)
    with start_run(request) as ctx:  # the run directory is locked until the block ends
        if args.dry_run:
            dry_run(
                lambda: build_model(cfg),
                ctx.run_dir,
                extra={"input_size": cfg.data.image_size, "phases": list(PHASES)},
            )
            return 0
        name = args.config if args.config is not None else config
        print(f"cxrlandmarks-train: config={name} device={ctx.device} run_dir={ctx.run_dir}")
        metrics = run_training(ctx, args.phase, args.init_from)
    if ctx.dist.is_main:
        print(
            f"\nfinal ({metrics['final_phase']}): mean {metrics['mean_px']:.2f} px at 224, "
            f"{100 * metrics['<8.5px']:.0f}% of test images under 8.5 px; outputs in {ctx.run_dir}"
        )
    return 0
