"""Training of the metric and baseline models, then prediction, voting and scoring.

``binensemble-train`` (no ``--model``, or ``--model both``) runs the whole research pipeline:
train the metric model (triplet loss, KNN with automatic k) and the baseline (cross-entropy),
predict the validation split and ``TestSet/`` with 4-view TTA, soft-vote the two, analyse their
agreement and print the accuracy table. ``--model metric|baseline`` trains one model.

Run directory (``--model both``; with one model the model directory is the run directory)::

    config.yaml  metrics.json  splits.json
    metric/    config.yaml metrics.jsonl metrics.json tb/ checkpoints/ plots/ splits.json
               model.pt (best weights + k + KNN gallery) model.safetensors knn.json
    baseline/  (the same, without the KNN files)
    predictions/  metric.csv metric_probs.csv baseline.csv ... vote.csv vote_probs.csv
                  *_val_probs.csv (validation split, with targets)
    analysis/  analysis.json disagreements.csv analysis.png (validation split; test if labelled)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from binensemble.config import BinEnsembleConfig
from binensemble.data import (
    BalancedBatchSampler,
    ImageDataset,
    ImageSet,
    data_root,
    eval_transform,
    read_labels,
    scan_labelled,
    scan_unlabelled,
    train_transform,
)
from binensemble.ensemble import (
    analyse,
    disagreement_frame,
    plot_analysis,
    soft_vote,
    write_predictions,
)
from binensemble.evaluate import (
    baseline_evaluator,
    extract,
    images_loader,
    knn_select,
    metric_evaluator,
    summarise,
)
from binensemble.losses import BatchHardTripletLoss
from binensemble.model import build_model, model_kind
from binensemble.predict import BUNDLE_NAME, load_bundle, predict_probs
from medcore.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from medcore.cli import RunContext, continue_run, find_run, format_table, setup_run
from medcore.config import load_config, save_config, to_dict
from medcore.device import amp_policy, device_defaults
from medcore.distributed import barrier, get_rank, get_world_size
from medcore.errors import DataError, UserError
from medcore.io import RunLock, atomic_write_csv, atomic_write_json
from medcore.logging import RunLogger
from medcore.metrics import multiclass_metrics
from medcore.plots import plot_confusion_matrix, plot_roc_curves, plot_training_curves
from medcore.splits import load_splits, save_splits, stratified_split
from medcore.trainer import Trainer, seed_everything

PACKAGE = "binensemble"
SMOKE_OVERRIDES = ["data.demo=small", "trainer.batch_size=8"]


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=["metric", "baseline", "both"],
        help="which model to train (default: both, then predict, vote and analyse; "
        "--resume latest: the run's own choice)",
    )


def _views(cfg: BinEnsembleConfig) -> list[str]:
    return list(cfg.predict.views) if cfg.predict.tta else ["identity"]


def _workers(cfg: BinEnsembleConfig, device: torch.device) -> int:
    return (
        device_defaults(device).num_workers
        if cfg.trainer.num_workers is None
        else cfg.trainer.num_workers
    )


# -- one model --------------------------------------------------------------------------------
def _splits(labelled: ImageSet, cfg: BinEnsembleConfig, path: Path) -> dict[str, np.ndarray]:
    """The stratified train/validation split: loaded if the run saved one, else made and saved."""
    if path.is_file():
        try:
            return load_splits(path, ids=labelled.ids)
        except ValueError as exc:
            raise DataError(path, f"{str(exc).splitlines()[0]} (use a new --output-dir)") from None
    assert labelled.labels is not None
    try:
        splits = stratified_split(
            labelled.labels,
            {"train": 1.0 - cfg.data.val_fraction, "val": cfg.data.val_fraction},
            seed=cfg.data.split_seed,
        )
    except ValueError as exc:  # too few labelled images for a train and a validation part
        raise DataError("data.val_fraction", f"{exc} (labelled images)") from None
    if get_rank() == 0:
        save_splits(
            path,
            splits,
            meta={"seed": cfg.data.split_seed, "val_fraction": cfg.data.val_fraction},
            ids=labelled.ids,
        )
    return splits


def _step_fn(cfg: BinEnsembleConfig):
    if cfg.model.kind == "metric":
        loss_fn = BatchHardTripletLoss(cfg.loss.margin, cfg.loss.gather_across_ranks)

        def metric_step(model: torch.nn.Module, batch: dict[str, Any]):
            emb = model(batch["image"])
            return loss_fn(emb.float(), batch["label"])

        return metric_step

    def baseline_step(model: torch.nn.Module, batch: dict[str, Any]):
        logits = model(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=cfg.loss.label_smoothing)
        return loss, {"accuracy": float((logits.argmax(1) == batch["label"]).float().mean())}

    return baseline_step


def train_one(
    cfg: BinEnsembleConfig,
    labelled: ImageSet,
    model_dir: Path,
    device: torch.device,
    resume: Path | None,
) -> Path:
    """Train ``cfg.model.kind`` in ``model_dir`` and write its ``model.pt`` bundle; returns its path."""
    name = cfg.model.kind
    model_dir.mkdir(parents=True, exist_ok=True)
    if get_rank() == 0:
        save_config(cfg, model_dir / "config.yaml")
    splits = _splits(labelled, cfg, model_dir / "splits.json")
    train_set, val_set = labelled.subset(splits["train"]), labelled.subset(splits["val"])
    assert train_set.labels is not None and val_set.labels is not None
    model = build_model(cfg.model, cfg.data.img_size)
    batch_size = cfg.trainer.batch_size or device_defaults(device).batch_size
    workers = _workers(cfg, device)
    val_loader = images_loader(val_set, eval_transform(cfg.data), cfg.data.eval_batch_size, workers)
    if name == "metric":
        train_eval_loader = images_loader(
            train_set, eval_transform(cfg.data), cfg.data.eval_batch_size, workers
        )
        evaluate_fn = metric_evaluator(
            train_eval_loader, train_set.labels, val_loader, val_set.labels, cfg.knn
        )
        sampler = BalancedBatchSampler(
            train_set.labels, batch_size, cfg.seed, get_rank(), get_world_size()
        )
    else:
        evaluate_fn = baseline_evaluator(val_loader, val_set.labels)
        sampler = None
    logger = RunLogger(model_dir, enabled=get_rank() == 0)
    trainer = Trainer(
        model,
        cfg.trainer,
        train_data=ImageDataset(train_set, train_transform(cfg.data)),
        step_fn=_step_fn(cfg),
        run_dir=model_dir,
        device=device,
        kind=model_kind(name),
        evaluate_fn=evaluate_fn,
        param_groups=model.param_groups(cfg.optim.backbone_lr, cfg.optim.head_lr),
        batch_sampler=sampler,
        seed=cfg.seed,
        extra_state={"model_config": to_dict(cfg.model), "data_config": to_dict(cfg.data)},
        logger=logger,
    )
    result = trainer.fit(resume=resume)
    bundle_path = model_dir / BUNDLE_NAME
    if get_rank() == 0:
        weights = (
            result.best_path
            if result.best_path and result.best_path.is_file()
            else result.final_path
        )
        assert weights is not None
        model.load_state_dict(load_checkpoint(weights, kind=model_kind(name))["model"])
        metrics = _finalise(cfg, model, train_set, val_set, model_dir, device, trainer, logger)
        metrics.update(
            best_epoch=_best_epoch(result.history, result.best_metric_name, result.best_metric),
            epochs_completed=result.epochs_completed,
            weights=str(weights),
        )
        logger.write_final(metrics)
        logger.close()
    barrier()
    return bundle_path


def _best_epoch(
    history: list[dict[str, float]], name: str | None, value: float | None
) -> int | None:
    for record in history:
        if name is not None and record.get(name) == value:
            return int(record["epoch"]) + 1
    return None


def _finalise(
    cfg: BinEnsembleConfig,
    model: torch.nn.Module,
    train_set: ImageSet,
    val_set: ImageSet,
    model_dir: Path,
    device: torch.device,
    trainer: Trainer,
    logger: RunLogger,
) -> dict[str, Any]:
    """Choose k on the validation split (metric model), write the bundle, plots and metrics."""
    name = cfg.model.kind
    views = _views(cfg)
    workers = _workers(cfg, device)
    amp = amp_policy(device, cfg.trainer.amp, cfg.trainer.amp_dtype)
    val_loader = images_loader(val_set, eval_transform(cfg.data), cfg.data.eval_batch_size, workers)
    bundle: dict[str, Any] = {
        "model": model.state_dict(),
        "model_config": to_dict(cfg.model),
        "data_config": to_dict(cfg.data),
        "classes": list(cfg.data.classes),
    }
    extra: dict[str, Any] = {}
    if name == "metric":
        # Gallery and queries both use the TTA embedding, as prediction will.
        train_loader = images_loader(
            train_set, eval_transform(cfg.data), cfg.data.eval_batch_size, workers
        )
        train_emb = extract(model, train_loader, device, amp, views, desc="embedding gallery")
        val_emb = extract(model, val_loader, device, amp, views, desc="embedding validation")
        knn = knn_select(
            train_emb, train_set.labels, val_emb, val_set.labels, cfg.knn, cfg.model.num_classes
        )
        knn_info = {
            "k": knn.k,
            "scores": {str(k): v for k, v in knn.scores.items()},
            "weighted": cfg.knn.weighted,
            "metric": cfg.knn.metric,
            "views": views,
        }
        bundle["knn"] = knn_info
        bundle["gallery"] = {
            "embeddings": train_emb,
            "labels": torch.as_tensor(train_set.labels),
            "ids": list(train_set.ids),
        }
        atomic_write_json(model_dir / "knn.json", knn_info)
        plot_training_curves(
            [{"k": k, "val_accuracy": s} for k, s in knn.scores.items()],
            ["val_accuracy"],
            model_dir / "plots" / "knn_k_search.png",
            x="k",
        )
        val_probs = knn.val_probs.numpy()
        extra["k"] = knn.k
    else:
        val_probs = extract(
            model, val_loader, device, amp, views, desc="predicting validation"
        ).numpy()
    save_checkpoint(bundle, model_dir / BUNDLE_NAME, kind=model_kind(name))
    export_safetensors(
        model.state_dict(), model_dir / "model.safetensors", metadata={"kind": model_kind(name)}
    )
    y = val_set.labels
    plot_training_curves(
        trainer.history, ["val/accuracy", "val/roc_auc"], model_dir / "plots" / "curves.png"
    )
    plot_roc_curves({f"{name} (val)": (y, val_probs[:, 1])}, model_dir / "plots" / "roc_val.png")
    confusion = multiclass_metrics(y, val_probs)["confusion_matrix"]
    plot_confusion_matrix(
        confusion,
        cfg.data.classes,
        model_dir / "plots" / "confusion_val.png",
        title=f"{name} (val)",
    )
    return {**summarise(y, val_probs), **extra, "tta_views": views}


# -- the pipeline -----------------------------------------------------------------------------
def _newest_run(output_dir: Path | None) -> Path:
    """``--resume latest``: the given output directory, or the newest run that has a latest.pt."""
    if output_dir is not None:
        if not (Path(output_dir) / "config.yaml").is_file():
            raise UserError(
                "--resume latest", f"no {PACKAGE} run to continue in {output_dir} (no config.yaml)"
            )
        return Path(output_dir)
    # One model's run keeps checkpoints/ itself, a --model both run one folder per model.
    return find_run(PACKAGE, None, ("checkpoints/latest.pt", "*/checkpoints/latest.pt"))[0]


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


def run_train(args: argparse.Namespace) -> int:
    resume_mode, resume_path = _resume_plan(args)
    args.resume = None  # resolved above; setup_run must not look for a run layout of its own
    ctx = setup_run(args, BinEnsembleConfig, PACKAGE, "default", smoke_overrides=SMOKE_OVERRIDES)
    try:
        return _train_models(ctx, args.model, resume_mode, resume_path)
    finally:
        ctx.release()


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
    names = ["metric", "baseline"] if model == "both" else [model]
    root = data_root(cfg.data)
    labelled = scan_labelled(root, cfg.data)
    test_set, test_y = _test_images(root, cfg) if ctx.dist.is_main else (None, None)
    with RunLock(ctx.run_dir) if ctx.dist.is_main else contextlib.nullcontext():
        bundles: dict[str, Path] = {}
        for name in names:
            model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=name))
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
            seed_everything(
                cfg.seed + ctx.dist.rank
            )  # each model's result independent of the order
            bundles[name] = train_one(model_cfg, labelled, model_dir, ctx.device, resume)
        if not ctx.dist.is_main:
            return 0
        report = _predict_vote_report(
            cfg, labelled, test_set, test_y, bundles, ctx.run_dir, ctx.device
        )
    print(report)
    return 0


def _predict_vote_report(
    cfg: BinEnsembleConfig,
    labelled: ImageSet,
    test_set: ImageSet | None,
    test_y: np.ndarray | None,
    bundle_paths: dict[str, Path],
    run_dir: Path,
    device: torch.device,
) -> str:
    """Predict validation and test images with every model, vote, analyse; the printed table."""
    views = _views(cfg)
    workers = _workers(cfg, device)
    pred_dir = run_dir / "predictions"
    splits = load_splits(next(iter(bundle_paths.values())).parent / "splits.json", ids=labelled.ids)
    val_set = labelled.subset(splits["val"])

    names = list(bundle_paths)
    val_probs: dict[str, np.ndarray] = {}
    test_probs: dict[str, np.ndarray] = {}
    for name, path in bundle_paths.items():
        bundle = load_bundle(path, device)
        val_probs[name] = predict_probs(
            bundle,
            val_set,
            device,
            views,
            cfg.data.eval_batch_size,
            workers,
            cfg.trainer.amp,
            desc=f"{name}: validation",
        )
        write_predictions(
            pred_dir, f"{name}_val", val_set.ids, val_probs[name], cfg.data.classes, val_set.labels
        )
        if test_set is not None:
            test_probs[name] = predict_probs(
                bundle,
                test_set,
                device,
                views,
                cfg.data.eval_batch_size,
                workers,
                cfg.trainer.amp,
                desc=f"{name}: test",
            )
            write_predictions(
                pred_dir, name, test_set.ids, test_probs[name], cfg.data.classes, test_y
            )
    weights = cfg.predict.vote_weights or None
    if len(names) > 1:
        if weights is not None and len(weights) != len(names):
            raise UserError(
                "predict.vote_weights", f"needs {len(names)} weights ({', '.join(names)})"
            )
        val_probs["vote"] = soft_vote([val_probs[n] for n in names], weights)
        write_predictions(
            pred_dir, "vote_val", val_set.ids, val_probs["vote"], cfg.data.classes, val_set.labels
        )
        if test_set is not None:
            test_probs["vote"] = soft_vote([test_probs[n] for n in names], weights)
            write_predictions(
                pred_dir, "vote", test_set.ids, test_probs["vote"], cfg.data.classes, test_y
            )

    rows, summary = [], {}
    for name in val_probs:
        entry = summarise(val_set.labels, val_probs[name])
        if test_y is not None:
            entry.update(summarise(test_y, test_probs[name], prefix="test/"))
        summary[name] = entry
        row = {"model": name, "val_acc": entry["val/accuracy"], "val_auc": entry["val/roc_auc"]}
        if test_y is not None:
            row.update(test_acc=entry["test/accuracy"], test_auc=entry["test/roc_auc"])
        rows.append(row)
    lines = [format_table(rows)]
    if len(names) > 1:
        for split, probs, y, ids in (
            ("val", val_probs, val_set.labels, val_set.ids),
            ("test", test_probs, test_y, test_set.ids if test_set else None),
        ):
            if not probs or ids is None:
                continue
            per_model = [probs[n] for n in names]
            analysis = analyse(names, per_model, y, weights)
            out = run_dir / "analysis" / split
            atomic_write_json(out / "analysis.json", analysis)
            atomic_write_csv(
                out / "disagreements.csv", disagreement_frame(ids, names, per_model, y, weights)
            )
            plot_analysis(names, per_model, y, analysis, out / "analysis.png")
            pair = analysis["pairs"][0]
            lines.append(
                f"{split}: agreement {pair['agreement']:.3f}, {pair['disagreements']} disagreement(s)"
                + (f", oracle accuracy {pair['oracle_accuracy']:.3f}" if y is not None else "")
            )
            summary[f"{split}_agreement"] = pair
    if test_set is not None:
        final = pred_dir / ("vote.csv" if len(names) > 1 else f"{names[0]}.csv")
        lines.append(f"predictions for {cfg.data.test_dir}/: {final}")
    if len(names) == 1:
        merged = {**_read_json(run_dir / "metrics.json"), **summary[names[0]]}
        atomic_write_json(run_dir / "metrics.json", merged)
    else:
        atomic_write_json(run_dir / "metrics.json", summary)
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
