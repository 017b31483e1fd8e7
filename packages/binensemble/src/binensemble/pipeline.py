"""``binensemble-train``: the research pipeline from data to voted predictions.

No ``--model`` (or ``--model both``): train the metric model (triplet loss, KNN with automatic
k) and the baseline (cross-entropy), predict the validation split and ``TestSet/`` with 4-view
TTA, soft-vote the two, analyse their agreement and print the accuracy table. ``--model
metric|baseline`` trains one model. With ``selection.cv_folds >= 2`` a cross-validation stage
(:mod:`binensemble.crossval`) chooses the epoch count and k first.

Run directory (``--model both``; with one model the model directory is the run directory)::

    config.yaml  metrics.json
    metric/    a model directory (binensemble.train)
    baseline/  the same, without the KNN files
    cv/        the cross-validation stage, when asked for
    predictions/  metric.csv metric_probs.csv baseline.csv ... vote.csv vote_probs.csv
                  *_val_probs.csv (validation split, with targets)
    analysis/  <split>/analysis.json disagreements.csv analysis.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np

from binensemble.config import BinEnsembleConfig
from binensemble.data import ImageSet, data_root, read_labels, scan_labelled, scan_unlabelled
from binensemble.model import MODEL_CLASSES, build_model, check_pretrained, weight_sources
from binensemble.predict import BUNDLE_NAME
from binensemble.report import predict_vote_report
from binensemble.train import train_one
from medcore.cli import SMOKE_OVERRIDES as COMMON_SMOKE
from medcore.cli import (
    RunContext,
    common_overrides,
    continue_run,
    find_run,
    resolve_config_arg,
    setup_run,
)
from medcore.config import load_config, packaged_config_path
from medcore.errors import DataError, UserError
from medcore.io import RunLock
from medcore.summary import build_on_meta, count_parameters, dry_run
from medcore.trainer import seed_everything

PACKAGE = "binensemble"
SMOKE_OVERRIDES = ["data.demo=small", "trainer.batch_size=8"]


def run_train(args: argparse.Namespace) -> int:
    resume_mode, resume_path = _resume_plan(args)
    args.resume = None  # resolved above; setup_run must not look for a run layout of its own
    if not args.dry_run:
        cfg = _resolve_config(args)
        check_pretrained(cfg.model)
        if args.from_scratch and any(weight_sources(cfg.model).values()):
            raise UserError("--from-scratch", "contradicts the pretrained weights also given")
    ctx = setup_run(args, BinEnsembleConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES)
    try:
        if args.dry_run:
            return _dry_run(ctx, args.model)
        return _train_models(ctx, args.model, resume_mode, resume_path)
    finally:
        ctx.release()


def _resolve_config(args: argparse.Namespace) -> BinEnsembleConfig:
    """The config exactly as ``setup_run`` will resolve it, to check it before any file exists."""
    resolve_config_arg(args, PACKAGE)
    source = args.config if args.config is not None else packaged_config_path(PACKAGE, "default")
    overrides = list(args.overrides or [])
    if args.smoke:
        overrides = [*COMMON_SMOKE, *SMOKE_OVERRIDES, *overrides]
    return load_config(BinEnsembleConfig, source, overrides=[*overrides, *common_overrides(args)])


def _dry_run(ctx: RunContext, model: str) -> int:
    """Build the model(s) on the meta device: config.yaml, model_summary.json, the table."""
    cfg: BinEnsembleConfig = ctx.cfg
    names = list(MODEL_CLASSES) if model == "both" else [model]

    def build(name: str):
        return build_model(
            dataclasses.replace(cfg.model, kind=name), cfg.data.img_size, load_weights=False
        )

    first = build_on_meta(lambda: build(names[0]))
    extra = {
        "img_size": cfg.data.img_size,
        "normalisation": first.backbone.normalisation(),
        "branches": {
            cfg.model.convnext_name: count_parameters(first.backbone.convnext)["total"],
            cfg.model.vit_name: count_parameters(first.backbone.vit)["total"],
        },
        **{
            f"{n}_parameters": count_parameters(build_on_meta(lambda n=n: build(n)))
            for n in names[1:]
        },
    }
    dry_run(lambda: build(names[0]), ctx.run_dir, extra=extra)
    return 0


def _newest_run(output_dir: Path | None) -> Path:
    """``--resume latest``: the given output directory, or the newest run that has a latest.pt."""
    if output_dir is not None:
        if not (Path(output_dir) / "config.yaml").is_file():
            raise UserError(
                "--resume latest", f"no {PACKAGE} run to continue in {output_dir} (no config.yaml)"
            )
        return Path(output_dir)
    # One model's run keeps checkpoints/ itself, a --model both run one folder per model.
    patterns = ("checkpoints/latest.pt", "*/checkpoints/latest.pt", "cv/*/*/checkpoints/latest.pt")
    return find_run(PACKAGE, None, patterns)[0]


def _trained_models(run_dir: Path) -> str:
    """Which ``--model`` a run directory was made by: a single model lives in the run itself."""
    if not any((run_dir / n).exists() for n in ("splits.json", "checkpoints", BUNDLE_NAME)):
        return "both"
    saved = load_config(BinEnsembleConfig, run_dir / "config.yaml")
    return saved.model.kind


def _resume_plan(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """(mode, checkpoint): ``latest`` resumes every unfinished model of the run; a path, one model.

    The run's own ``config.yaml`` is the base config of the resumed run (unless ``--config`` is
    given; ``--set`` still applies on top), so the flags of the first run need not be repeated.
    """
    if not args.resume:
        args.model = args.model or "both"
        return None, None
    if args.resume == "latest":
        run_dir = _newest_run(args.output_dir)
        continue_run(args, run_dir)
        trained = _trained_models(run_dir)
        if args.model not in (None, trained):
            raise UserError(
                "--model", f"{run_dir} holds a --model {trained} run; resume it with that choice"
            )
        args.model = trained
        return "latest", None
    path = Path(args.resume)
    if not path.is_file():
        raise UserError(path, "checkpoint not found")
    if args.model in (None, "both"):
        raise UserError(
            "--resume PATH",
            "resumes one model: add --model metric|baseline (or use --resume latest)",
        )
    if args.output_dir is not None:
        continue_run(args, Path(args.output_dir))
    elif path.parent.name == "checkpoints":
        continue_run(args, path.parent.parent)
    return "path", path


def _test_images(root: Path, cfg: BinEnsembleConfig) -> tuple[ImageSet | None, np.ndarray | None]:
    """``TestSet/`` and its optional labels, checked before any training.

    A test folder without a usable image is named and left out (the models are still trained);
    a broken label file is an error.
    """
    if not (root / cfg.data.test_dir).is_dir():
        return None, None
    try:
        test_set = scan_unlabelled(root, cfg.data)
    except DataError as exc:
        print(f"warning: {exc.what}: {exc.why}; no test predictions", file=sys.stderr)
        return None, None
    labels_path = root / cfg.data.test_labels
    if not labels_path.is_file():
        return test_set, None
    test_labels = read_labels(labels_path)
    missing = [i for i in test_set.ids if i not in test_labels]
    if missing:
        raise DataError(
            labels_path, f"no label for {len(missing)} test image(s) (e.g. {missing[0]!r})"
        )
    return test_set, np.asarray([test_labels[i] for i in test_set.ids])


def _train_models(
    ctx: RunContext, model: str, resume_mode: str | None, resume_path: Path | None
) -> int:
    cfg: BinEnsembleConfig = ctx.cfg
    names = list(MODEL_CLASSES) if model == "both" else [model]
    root = data_root(cfg.data)
    labelled = scan_labelled(root, cfg.data)
    test_set, test_y = _test_images(root, cfg) if ctx.dist.is_main else (None, None)
    with RunLock(ctx.run_dir) if ctx.dist.is_main else contextlib.nullcontext():
        cv_lines: list[str] = []
        chosen: dict[str, tuple[int, int | None]] = {}
        if cfg.selection.cv_folds:
            from binensemble.crossval import cross_validate

            chosen, cv_lines = cross_validate(
                cfg, labelled, ctx.run_dir, ctx.device, names, resume_mode == "latest"
            )
        bundles: dict[str, Path] = {}
        for name in names:
            model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=name))
            weights = "best"
            if name in chosen:  # the cross-validated epoch count (and k) replace validation's
                epochs, k = chosen[name]
                model_cfg = dataclasses.replace(
                    model_cfg,
                    trainer=dataclasses.replace(cfg.trainer, epochs=epochs),
                    knn=dataclasses.replace(cfg.knn, ks=[k] if k is not None else cfg.knn.ks),
                )
                weights = "final"
            model_dir = ctx.run_dir / name if len(names) > 1 else ctx.run_dir
            bundle = model_dir / BUNDLE_NAME
            resume = resume_path
            if resume_mode == "latest":
                if bundle.is_file():
                    print(f"{name}: finished earlier ({bundle}); not retrained", file=sys.stderr)
                    bundles[name] = bundle
                    continue
                latest = model_dir / "checkpoints" / "latest.pt"
                resume = latest if latest.is_file() else None
            # Each model's result independent of the order.
            seed_everything(cfg.seed + ctx.dist.rank)
            bundles[name] = train_one(
                model_cfg, labelled, model_dir, ctx.device, resume, weights=weights
            )
        if not ctx.dist.is_main:
            return 0
        report = predict_vote_report(
            cfg, labelled, test_set, test_y, bundles, ctx.run_dir, ctx.device, cv_lines
        )
    print(report)
    return 0
