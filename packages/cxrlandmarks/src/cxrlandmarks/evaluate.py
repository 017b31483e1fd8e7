"""Evaluation: pixel errors (at 224 and in original-image pixels), per landmark and category,
clinical thresholds, geometric validation, phase comparison, annotated grids, CSV/JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlandmarks.anatomy import (
    DISTANCE_PAIRS,
    LANDMARK_NAMES,
    SYMMETRIC_PAIRS,
    asymmetry,
    pair_distances,
)
from cxrlandmarks.config import PHASES, CxrConfig
from cxrlandmarks.data import PACKAGE, LandmarkDataset, LandmarkRecord, RunData, image_store
from cxrlandmarks.model import load_model
from cxrlandmarks.predict import REFERENCE_SIZE, coordinates_frame, predict_dataset
from medcore.cli.run_setup import RunContext, load_run_config
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.engine.run_log import RunLogger
from medcore.errors import CheckpointError, UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.metrics import landmark_errors
from medcore.report.tables import format_table

THRESHOLDS = (5.0, 8.5, 10.0, 15.0)


def _targets(records: Sequence[LandmarkRecord]) -> np.ndarray:
    return np.stack([r.normalised for r in records])


def _sizes(records: Sequence[LandmarkRecord]) -> np.ndarray:
    return np.array([[r.width, r.height] for r in records], dtype=float)[:, None, :]


def geometric_validation(
    pred: np.ndarray, target: np.ndarray, scale: float = REFERENCE_SIZE
) -> dict[str, Any]:
    """Symmetry about the mediastinal axis and consistency of the fixed anatomical distances."""
    p, t = torch.as_tensor(pred) * scale, torch.as_tensor(target) * scale
    asym_p, asym_t = asymmetry(p), asymmetry(t)
    d_p, d_t = pair_distances(p), pair_distances(t)
    dist_err = (d_p - d_t).abs()
    return {
        "symmetry_error_pred_px": float(asym_p.norm(dim=-1).mean()),
        "symmetry_error_true_px": float(asym_t.norm(dim=-1).mean()),
        "symmetry_consistency_px": float((asym_p - asym_t).norm(dim=-1).mean()),
        "symmetry_per_pair_px": {
            f"{a}-{b}": float(v)
            for (a, b), v in zip(
                SYMMETRIC_PAIRS, (asym_p - asym_t).norm(dim=-1).mean(0), strict=True
            )
        },
        "distance_error_px": float(dist_err.mean()),
        "distance_error_rel": float((dist_err / d_t.clamp_min(1e-6)).mean()),
        "distance_per_pair_px": {
            f"{a}-{b}": float(v) for (a, b), v in zip(DISTANCE_PAIRS, dist_err.mean(0), strict=True)
        },
    }


def error_report(pred: np.ndarray, records: Sequence[LandmarkRecord]) -> dict[str, Any]:
    """Everything a clinician reads: errors at 224 and in original pixels, per landmark and
    category, the share of images under 5 / 8.5 / 10 / 15 px, and geometric validation."""
    target = _targets(records)
    at224 = landmark_errors(pred, target, scale=REFERENCE_SIZE, thresholds=THRESHOLDS)
    sizes = _sizes(records)
    original = landmark_errors(pred * sizes, target * sizes, scale=1.0, thresholds=THRESHOLDS)
    categories = sorted({r.category for r in records})
    per_category = {}
    for cat in categories:
        idx = [i for i, r in enumerate(records) if r.category == cat]
        e = landmark_errors(pred[idx], target[idx], scale=REFERENCE_SIZE, thresholds=THRESHOLDS)
        per_category[cat] = {
            "n": len(idx),
            **{k: v for k, v in e.items() if not isinstance(v, list)},
        }
    return {
        "n_images": len(records),
        "px224": {k: v for k, v in at224.items() if k != "per_image_mean"},
        "original_px": {k: v for k, v in original.items() if k != "per_image_mean"},
        "per_landmark_px224": dict(zip(LANDMARK_NAMES, at224["per_landmark_mean"], strict=True)),
        "per_category_px224": per_category,
        "geometric": geometric_validation(pred, target),
        "per_image_px224": at224["per_image_mean"],
    }


def summary_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One row of the phase-comparison table."""
    px = report["px224"]
    geo = report["geometric"]
    return {
        "model": name,
        "mean_px": px["mean"],
        "median_px": px["median"],
        "std_px": px["std"],
        "p90_px": px["p90"],
        "mean_orig_px": report["original_px"]["mean"],
        "<5px": px["under_5px"],
        "<8.5px": px["under_8.5px"],
        "<10px": px["under_10px"],
        "<15px": px["under_15px"],
        "sym_px": geo["symmetry_consistency_px"],
        "dist_px": geo["distance_error_px"],
    }


def write_report(
    report: dict[str, Any],
    pred: np.ndarray,
    records: Sequence[LandmarkRecord],
    out_dir: Path,
    grid_images: int = 16,
) -> None:
    """metrics.json, per-image / per-landmark / per-category CSVs, predictions CSV and PNG figures."""
    from cxrlandmarks.plots import plot_landmark_grid, plot_per_landmark

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", report)
    sizes = _sizes(records)
    target = _targets(records)
    err224 = np.linalg.norm(pred - target, axis=-1) * REFERENCE_SIZE
    per_image = pd.DataFrame(
        {
            "image_name": [r.name for r in records],
            "image_path": [str(r.path) for r in records],
            "category": [r.category for r in records],
            "mean_px224": err224.mean(1),
            "mean_original_px": np.linalg.norm((pred - target) * sizes, axis=-1).mean(1),
        }
    )
    atomic_write_csv(out_dir / "per_image.csv", per_image)
    atomic_write_csv(
        out_dir / "per_landmark.csv",
        pd.DataFrame(
            {
                "index": range(len(LANDMARK_NAMES)),
                "landmark": LANDMARK_NAMES,
                "mean_px224": err224.mean(0),
                "median_px224": np.median(err224, 0),
                "std_px224": err224.std(0),
            }
        ),
    )
    atomic_write_csv(
        out_dir / "per_category.csv",
        pd.DataFrame([{"category": c, **v} for c, v in report["per_category_px224"].items()]),
    )
    atomic_write_csv(
        out_dir / "predictions.csv",
        coordinates_frame([r.name for r in records], [str(r.path) for r in records], pred * sizes),
    )
    plot_per_landmark(err224, out_dir / "per_landmark.png")
    order = np.argsort(err224.mean(1))
    # Best, median and worst cases side by side: what a reader needs to trust the numbers.
    pick = np.unique(
        np.concatenate(
            [
                order[: grid_images // 4],
                order[len(order) // 2 - grid_images // 4 :][: grid_images // 2],
                order[-(grid_images - grid_images // 4 - grid_images // 2) :],
            ]
        )
    )[:grid_images]
    plot_landmark_grid(
        [records[i] for i in pick], pred[pick] * sizes[pick], out_dir / "test_grid.png"
    )


def report_phases(ctx: RunContext, data: RunData) -> dict[str, Any]:
    """Test-split evaluation of every phase checkpoint present; full report for the last one."""
    cfg: CxrConfig = ctx.cfg
    test_records = [data.records[i] for i in data.splits["test"]]
    rows, reports = [], {}
    last = None
    for name in PHASES:
        path = ctx.run_dir / "checkpoints" / getattr(cfg.phases, name).checkpoint
        if not path.is_file():
            continue
        model, state = load_model(path, ctx.device)
        pred = predict_dataset(
            [model],
            data.dataset("test", cfg.data.image_size, state.get("input_norm")),
            PredictOptions(
                ctx.device,
                checkpoint_precision(state, ctx.device),
                cfg.data.eval_batch_size,
                cfg.trainer.num_workers,
                shard=False,  # the main rank reports alone, after the other ranks are done
                desc=f"test {name}",
            ),
            tta_flip=cfg.eval.tta_flip,
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
        "world_size": ctx.dist.world_size,
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
    atomic_write_csv(out_dir / "phase_comparison.csv", pd.DataFrame(rows))
    atomic_write_json(out_dir / "phase_comparison.json", list(rows))


def _checkpoints_of(args: Any) -> list[Path]:
    from cxrlandmarks.config import PhasesConfig

    paths = list(args.checkpoint)
    if args.run_dir is not None:
        phases = PhasesConfig()
        found = [args.run_dir / "checkpoints" / getattr(phases, p).checkpoint for p in PHASES]
        paths += [p for p in found if p.is_file()]
        if not paths:
            raise CheckpointError(args.run_dir, "no phase checkpoints in its checkpoints/ folder")
    if not paths:
        raise CheckpointError("--checkpoint", "give at least one checkpoint or --run-dir")
    return paths


def data_config_of(args: Any, state: dict[str, Any]) -> Any:
    """The data section of a checkpoint (its training's), under ``--data-dir``."""
    base = {"data": state.get("data_config", {})}
    return load_run_config(args, CxrConfig, PACKAGE, sections=["data"], base=base).data


def main(args: Any) -> int:
    """``cxrlandmarks-eval``: reports per checkpoint and a comparison table."""
    from cxrlandmarks.data import load_records, resolve_data_dir, split_records
    from medcore.data.splits import load_splits
    from medcore.runtime.device import resolve_device

    paths = _checkpoints_of(args)
    device = resolve_device(args.device)
    models = [load_model(p, device) for p in paths]
    if "data_config" not in models[0][1] and args.data_dir is None:
        raise UserError(
            "--data-dir",
            f"{paths[0]} records no data directory (the original code's checkpoint): give --data-dir",
        )
    data_cfg = data_config_of(args, models[0][1])  # --data-dir over the checkpoint's
    records = load_records(data_cfg, resolve_data_dir(data_cfg))
    # <run>/checkpoints/x.pt or <run>/phaseN/checkpoints/x.pt
    ckpt = paths[0].resolve()
    run_dir = next((p for p in ckpt.parents[1:3] if (p / "splits.json").is_file()), ckpt.parents[1])
    if args.split == "all":
        subset, rows = records, list(range(len(records)))
    else:
        splits_file = args.splits or run_dir / "splits.json"
        if splits_file.is_file():
            try:
                splits = load_splits(splits_file, ids=[r.name for r in records])
            except ValueError as exc:
                raise CheckpointError(splits_file, str(exc)) from None
        else:
            print(
                f"no splits.json at {splits_file}: splitting again with seed {data_cfg.split_seed}"
            )
            splits = split_records(records, data_cfg.split_ratios, data_cfg.split_seed)
        rows = list(splits[args.split])
        subset = [records[i] for i in rows]
    tta_flip = args.tta_flip
    if tta_flip is None:  # as the run's config says (eval.tta_flip)
        from cxrlandmarks.export import run_config

        saved = run_config(run_dir if (run_dir / "config.yaml").is_file() else None)
        tta_flip = bool((saved.get("eval") or {}).get("tta_flip", False))
    out_root = args.output_dir or run_dir / f"eval_{args.split}"
    made: dict[int, Any] = {}

    def stores(size: int) -> Any:  # one decoded store per input size
        if size not in made:
            made[size] = image_store(records, size)
        return made[size]

    table = []
    for path, (model, state) in zip(paths, models, strict=True):
        size = data_config_of(args, state).image_size
        pred = predict_dataset(
            [model],
            LandmarkDataset(
                subset, size, norm=state.get("input_norm"), store=stores(size), rows=rows
            ),
            PredictOptions(device, checkpoint_precision(state, device), desc=path.name),
            tta_flip=tta_flip,
        )
        report = error_report(pred, subset)
        report["checkpoint"] = str(path)
        report["tta_flip"] = tta_flip
        write_report(report, pred, subset, out_root / path.stem)
        table.append(summary_row(path.name, report))
    tta = ", flip TTA" if tta_flip else ""
    print(f"{args.split} split ({len(subset)} images{tta}), errors in px at 224")
    print(format_table(table, floatfmt=".3f"))
    write_phase_table(table, out_root)
    print(f"reports in {out_root}")
    return 0
