"""``histommnet-analyze``: a BreakHis dataset report and the fold summary training would use.

Counts per class, subtype, magnification and patient, images per patient (and the adaptive
sampling's draws per epoch), then the patient-wise folds with their class balance: with
``--run`` the folds a training run saved (and its config), else the folds ``histommnet-train``
would make with the same config and seed, and what they are stratified by. With ``--run``, also
the test metrics of the run's finished folds, the BreakHis recognition rates among them.
Written as JSON and CSV + Markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histommnet.breakhis import CLASSES, SUBTYPE_NAMES, BreakHisIndex, Patient, draws_per_patient
from histommnet.config import PACKAGE, HistoConfig
from histommnet.data import load_index
from histommnet.evaluate import METRICS, RATES_NOTE, summarize_folds, summary_display, write_table
from histommnet.folds import make_folds, read_folds
from medcore.cli.run_setup import RunContext, resolve_run, start_run
from medcore.data.splits import save_splits
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_json
from medcore.report.tables import format_table


def patient_frame(patients: list[Patient], cfg: HistoConfig) -> pd.DataFrame:
    rows = []
    for p in patients:
        counts = p.counts(cfg.data.magnifications)
        rows.append(
            {
                "patient": p.key,
                "patient_id": p.patient_id,
                "class": CLASSES[p.label],
                "subtype": SUBTYPE_NAMES[p.subtype],
                **{
                    m: len(p.images[m]) if m not in p.filled_from else 0
                    for m in cfg.data.magnifications
                },
                "filled": ",".join(f"{m}<-{s}" for m, s in p.filled_from.items()),
                "draws_per_epoch": draws_per_patient(
                    min(counts),
                    cfg.data.base_images,
                    cfg.data.volume_bounds,
                    cfg.data.utilization,
                    cfg.data.max_draws_per_patient,
                ),
            }
        )
    return pd.DataFrame(rows)


def count_tables(frame: pd.DataFrame, mags: list[str]) -> dict[str, pd.DataFrame]:
    frame = frame.assign(images=frame[mags].sum(axis=1))
    by_class = (
        frame.groupby("class")
        .agg(
            patients=("patient", "size"), images=("images", "sum"), **{m: (m, "sum") for m in mags}
        )
        .reset_index()
    )
    by_subtype = (
        frame.groupby(["class", "subtype"])
        .agg(
            patients=("patient", "size"), images=("images", "sum"), **{m: (m, "sum") for m in mags}
        )
        .reset_index()
    )
    per_patient = pd.DataFrame(
        [
            {
                "magnification": m,
                "min": int(frame[m].min()),
                "median": float(frame[m].median()),
                "mean": float(frame[m].mean()),
                "max": int(frame[m].max()),
                "total": int(frame[m].sum()),
            }
            for m in mags
        ]
    )
    return {
        "class_counts": by_class,
        "subtype_counts": by_subtype,
        "images_per_patient": per_patient,
    }


def fold_frame(
    folds: list[dict[str, np.ndarray]],
    patients: list[Patient],
    frame: pd.DataFrame,
    mags: list[str],
) -> pd.DataFrame:
    images = frame[mags].sum(axis=1).to_numpy()
    rows = []
    for i, split in enumerate(folds):
        for name in ("train", "val", "test"):
            idx = split[name]
            labels = np.array([patients[j].label for j in idx])
            rows.append(
                {
                    "fold": i,
                    "split": name,
                    "patients": len(idx),
                    "benign": int((labels == 0).sum()),
                    "malignant": int((labels == 1).sum()),
                    "images": int(images[idx].sum()),
                    "subtypes": len({patients[j].subtype for j in idx}),
                }
            )
    return pd.DataFrame(rows)


def report(
    index: BreakHisIndex, cfg: HistoConfig, folds: list[dict[str, np.ndarray]]
) -> dict[str, pd.DataFrame]:
    """The report's tables: patients, class/subtype counts, images per patient, folds."""
    patients = index.patients
    mags = list(cfg.data.magnifications)
    frame = patient_frame(patients, cfg)
    tables = {"patients": frame, **count_tables(frame, mags)}
    tables["folds"] = fold_frame(folds, patients, frame, mags)
    return tables


def _training_run(args: argparse.Namespace) -> Path | None:
    """``--run DIR``: the run whose config and folds are reported."""
    if args.run is None:
        return None
    run_dir = Path(args.run)
    for name in ("config.yaml", "splits.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"--run {run_dir}", f"no {name}: not a histommnet training run")
    if args.folds is not None:
        raise UserError("--folds", "a training run's folds are fixed; leave out --folds with --run")
    return run_dir


def _fold_results(run_dir: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished fold of a training run, in fold order."""
    found = []
    for path in run_dir.glob("fold_*/result.json"):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise DataError(path, f"not a readable fold result ({exc})") from None
    return sorted(found, key=lambda r: r["fold"])


def main(args: argparse.Namespace) -> int:
    """``histommnet-analyze`` after parsing."""
    run_dir = _training_run(args)
    if run_dir is not None:  # the run's config (unless --config), its analysis/ (unless -o)
        args = argparse.Namespace(
            **{
                **vars(args),
                "config": args.config or run_dir / "config.yaml",
                "output_dir": args.output_dir or run_dir / "analysis",
            }
        )
    with start_run(resolve_run(args, HistoConfig, PACKAGE, "default")) as ctx:
        return _analyze(ctx, run_dir)


def _analyze(ctx: RunContext, run_dir: Path | None) -> int:
    cfg: HistoConfig = ctx.cfg
    index = load_index(cfg)
    meta = {"seed": cfg.seed, "folds": cfg.cv.folds, "val_fraction": cfg.cv.val_fraction}
    if run_dir is not None:
        folds = read_folds(run_dir / "splits.json", index.patients)
        saved = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
        meta = saved.get("meta") or meta
        print(f"folds: the {len(folds)} saved by {run_dir}")
    else:
        plan = make_folds(index.patients, cfg)
        folds = plan.folds
        meta.update(plan.meta())
    tables = report(index, cfg, folds)
    results = _fold_results(run_dir) if run_dir is not None else []
    if results:
        tables["test_folds"], tables["test_summary"] = summarize_folds(results)
    for name, table in tables.items():
        write_table(table, ctx.run_dir / "tables" / name)
    save_splits(
        ctx.run_dir / "splits.json",
        folds,
        ids=[p.key for p in index.patients],
        meta=meta,
    )
    summary: dict[str, Any] = {
        "patients": len(index.patients),
        "patient_ids": len({p.patient_id for p in index.patients}),
        "images": len(index.images),
        "skipped": index.skipped,
        "filled_magnifications": {p.key: p.filled_from for p in index.patients if p.filled_from},
        "splits": meta,
        **{name: t.to_dict("records") for name, t in tables.items() if name != "patients"},
    }
    atomic_write_json(ctx.run_dir / "analysis.json", summary)

    print(
        f"{summary['patients']} patient folders ({summary['patient_ids']} patients for splitting), "
        f"{summary['images']} images, {len(index.skipped)} skipped"
    )
    for name in ("class_counts", "subtype_counts", "images_per_patient", "folds"):
        print(f"\n{name.replace('_', ' ')}")
        print(format_table(tables[name].to_dict("records"), floatfmt=".1f"))
    if meta.get("stratified_by"):
        why = meta.get("stratify_fallback")
        print(f"folds stratified by {meta['stratified_by']}" + (f" ({why})" if why else ""))
    if results:
        print(f"\ntest metrics of the run's {len(results)} finished fold(s)")
        columns = ["fold", "level", "threshold", *METRICS]
        print(format_table(tables["test_folds"].to_dict("records"), columns, floatfmt=".3f"))
        print(RATES_NOTE)
        print(format_table(summary_display(tables["test_summary"]), ["level", "folds", *METRICS]))
    print(f"\nreport written to {ctx.run_dir}")
    return 0
