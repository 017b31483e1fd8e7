"""``binensemble-train``: the research pipeline from data to voted predictions.

No ``--model`` (or ``--model both``): train the metric model (triplet loss, KNN with automatic
k) and the baseline (cross-entropy), predict the validation split and ``TestSet/`` with 4-view
TTA, soft-vote the two, analyse their agreement and print the accuracy table. ``--model
metric|baseline`` trains one model. With ``selection.cv_folds >= 2`` a cross-validation stage
(:mod:`binensemble.selection`) chooses the epoch count and k first.

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
from medcore.cli.dry_run import build_on_meta, count_parameters, dry_run
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.cli.stages import STAGE_FILE, Stage, run_stage
from medcore.engine.rng import seed_everything
from medcore.errors import DataError, UserError

PACKAGE = "binensemble"
SMOKE_OVERRIDES = ["data.demo=small", "trainer.batch_size=8"]


def run_train(args: argparse.Namespace) -> int:
    request = resolve_run(args, BinEnsembleConfig, PACKAGE, "default", SMOKE_OVERRIDES, staged=True)
    cfg: BinEnsembleConfig = request.cfg
    model = _model_choice(args, cfg)
    if not args.dry_run:
        check_pretrained(cfg.model)
        if args.from_scratch and any(weight_sources(cfg.model).values()):
            raise UserError("--from-scratch", "contradicts the pretrained weights also given")
    with start_run(request) as ctx:
        return _dry_run(ctx, model) if args.dry_run else _train_models(ctx, model)


def _model_choice(args: argparse.Namespace, cfg: BinEnsembleConfig) -> str:
    """``--model``; a resumed run keeps its own choice (one model lives in the run itself)."""
    if not args.resume:
        return args.model or "both"
    run_dir = Path(cfg.output_dir)
    single = ("splits.json", "checkpoints", BUNDLE_NAME, STAGE_FILE)
    trained = cfg.model.kind if any((run_dir / n).exists() for n in single) else "both"
    if args.model not in (None, trained):
        raise UserError(
            "--model", f"{run_dir} holds a --model {trained} run; resume it with that choice"
        )
    return trained


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


def _train_models(ctx: RunContext, model: str) -> int:
    """Each model (and each cross-validation fold) is a stage of the run: a resumed run skips
    the finished ones and continues the unfinished one from its ``checkpoints/latest.pt``."""
    cfg: BinEnsembleConfig = ctx.cfg
    names = list(MODEL_CLASSES) if model == "both" else [model]
    root = data_root(cfg.data)
    labelled = scan_labelled(root, cfg.data)
    test_set, test_y = _test_images(root, cfg) if ctx.dist.is_main else (None, None)
    cv_lines: list[str] = []
    chosen: dict[str, tuple[int, int | None]] = {}
    if cfg.selection.cv_folds:
        from binensemble.selection import cross_validate

        chosen, cv_lines = cross_validate(ctx, labelled, names)
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

        def train(stage: Stage, model_cfg=model_cfg, weights=weights) -> dict[str, str]:
            seed_everything(cfg.seed + ctx.dist.rank)  # each model's result independent of order
            bundle = train_one(
                model_cfg, labelled, stage.dir, ctx.fabric, stage.resume, weights=weights
            )
            return {"bundle": str(bundle)}

        # One model lives in the run directory itself: its stage is the run directory.
        result = run_stage(ctx, name if len(names) > 1 else ".", train)
        bundles[name] = Path(result["bundle"])
    if not ctx.dist.is_main:
        return 0
    report = predict_vote_report(
        cfg, labelled, test_set, test_y, bundles, ctx.run_dir, ctx.device, cv_lines
    )
    print(report)
    return 0
