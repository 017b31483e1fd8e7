"""Cross-validated choice of the epoch and k (``selection.cv_folds >= 2``).

The labelled set is cut into ``cv_folds`` stratified folds (the images are independent here: no
patient grouping). Each model trains once per fold on the other folds for the configured
epochs and keeps, after every epoch, its probabilities on the held-out fold (for every k of
``knn.ks`` for the metric model). The epoch (and k) with the best out-of-fold accuracy, pooled
over the folds, is chosen. The out-of-fold probabilities at that choice predict every labelled
image once, by a model that never saw it, and feed the agreement analysis: its intervals rest
on the whole labelled set instead of the validation split. The final models then train on the
usual split for the chosen number of epochs, the metric model's KNN with the chosen k.

Layout under the run directory: ``cv/fold<i>/<model>/`` (a model directory each, finished
folds skipped on ``--resume latest``), ``cv/selection.json``, ``cv/oof/<model>_probs.csv``,
``cv/analysis.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from binensemble.config import BinEnsembleConfig
from binensemble.data import ImageSet
from binensemble.ensemble import analyse, check_rule, decide, rule_message, write_predictions
from binensemble.evaluate import load_heldout
from binensemble.train import Splits, train_model
from medcore.cli.run_setup import RunContext
from medcore.cli.stages import Stage, run_stage
from medcore.data.splits import stratified_group_kfold
from medcore.engine.rng import seed_everything
from medcore.errors import DataError
from medcore.io import atomic_write_json
from medcore.runtime.distributed import barrier, broadcast_object, get_rank


@dataclass
class Choice:
    """One model's cross-validated choice and its out-of-fold probabilities ``[n, c]``."""

    epochs: int  # number of epochs to train
    k: int | None  # the metric model's k
    accuracy: float  # out-of-fold accuracy at this choice
    per_fold: list[float]
    oof_probs: np.ndarray


def make_folds(labelled: ImageSet, cfg: BinEnsembleConfig) -> list[Splits]:
    """``cv_folds`` stratified folds of the labelled set as ``train``/``val`` index pairs."""
    assert labelled.labels is not None
    n = cfg.selection.cv_folds
    if np.bincount(labelled.labels).min() < n:
        raise DataError("selection.cv_folds", f"{n} folds need at least {n} images of each class")
    folds = stratified_group_kfold(
        labelled.labels, np.arange(len(labelled)), n_splits=n, seed=cfg.selection.cv_seed
    )
    return [{"train": f["train"], "val": f["test"]} for f in folds]


def choose(targets: np.ndarray, folds: list[Splits], heldout_dirs: list[Path]) -> Choice:
    """The epoch and k (``k<k>`` keys) with the best pooled out-of-fold accuracy.

    Ties go to the earlier epoch, then to the smaller k.
    """
    per_fold = [load_heldout(d) for d in heldout_dirs]
    epochs = sorted(set.intersection(*(set(h) for h in per_fold)))
    if not epochs:
        raise DataError(heldout_dirs[0], "no evaluated epoch common to every fold")
    keys = sorted(per_fold[0][epochs[0]], key=lambda key: int(key[1:]) if key != "probs" else 0)
    best: tuple[Any, ...] | None = None
    for epoch in epochs:
        for key in keys:
            right = [
                (decide(h[epoch][key]) == targets[fold["val"]]).sum()
                for h, fold in zip(per_fold, folds, strict=True)
            ]
            score = sum(right) / len(targets)
            if best is None or score > best[0]:
                best = (
                    score,
                    epoch,
                    key,
                    [r / len(f["val"]) for r, f in zip(right, folds, strict=True)],
                )
    assert best is not None
    score, epoch, key, fold_acc = best
    oof = np.zeros((len(targets), per_fold[0][epoch][key].shape[1]))
    for h, fold in zip(per_fold, folds, strict=True):
        oof[fold["val"]] = h[epoch][key]
    k = None if key == "probs" else int(key[1:])
    return Choice(epoch + 1, k, float(score), [float(a) for a in fold_acc], oof)


def cross_validate(
    ctx: RunContext, labelled: ImageSet, names: list[str]
) -> tuple[dict[str, tuple[int, int | None]], list[str]]:
    """Train every fold of every model (stage ``cv/fold<i>/<model>`` each), choose per model;
    returns ``{name: (epochs, k)}`` (on every rank) and the report lines (rank 0).
    """
    cfg: BinEnsembleConfig = ctx.cfg
    folds = make_folds(labelled, cfg)
    cv_dir = ctx.run_dir / "cv"
    for i, fold in enumerate(folds):
        for name in names:
            model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind=name))
            # The folds' own evaluation cadence is what selection reads: once per epoch.
            model_cfg = dataclasses.replace(
                model_cfg, trainer=dataclasses.replace(cfg.trainer, eval_every_steps=0)
            )

            def train(stage: Stage, model_cfg=model_cfg, fold=fold) -> dict[str, str]:
                seed_everything(cfg.seed + get_rank())
                bundle = train_model(
                    model_cfg,
                    labelled,
                    stage.dir,
                    ctx.fabric,
                    stage.resume,
                    splits=fold,
                    keep_heldout=True,
                )
                return {"bundle": str(bundle)}

            run_stage(ctx, f"cv/fold{i}/{name}", train)
    lines: list[str] = []
    chosen: dict[str, tuple[int, int | None]] = {}
    if get_rank() == 0:
        assert labelled.labels is not None
        choices = {
            name: choose(
                labelled.labels,
                folds,
                [cv_dir / f"fold{i}" / name / "heldout" for i in range(len(folds))],
            )
            for name in names
        }
        chosen = {name: (c.epochs, c.k) for name, c in choices.items()}
        lines = _report(cfg, labelled, cv_dir, choices)
    barrier()
    return broadcast_object(chosen), lines


def _report(
    cfg: BinEnsembleConfig, labelled: ImageSet, cv_dir: Path, choices: dict[str, Choice]
) -> list[str]:
    """selection.json, the out-of-fold probability files and (two models) the analysis."""
    y = labelled.labels
    assert y is not None
    for name, c in choices.items():
        write_predictions(cv_dir / "oof", name, labelled.ids, c.oof_probs, cfg.data.classes, y)
    atomic_write_json(
        cv_dir / "selection.json",
        {
            name: {"epochs": c.epochs, "k": c.k, "oof_accuracy": c.accuracy, "per_fold": c.per_fold}
            for name, c in choices.items()
        },
    )
    lines = [
        f"cv ({cfg.selection.cv_folds} folds): {name} chose {c.epochs} epoch(s)"
        + (f", k={c.k}" if c.k is not None else "")
        + f", out-of-fold accuracy {c.accuracy:.3f}"
        for name, c in choices.items()
    ]
    if len(choices) > 1:
        names = list(choices)
        e = cfg.ensemble
        analysis = analyse(
            names,
            [choices[n].oof_probs for n in names],
            y,
            cfg.predict.vote_weights or None,
            e.confidence,
            e.n_boot,
            cfg.seed,
        )
        analysis["rule"] = check_rule(analysis, e.min_accuracy, e.max_disagreement)
        atomic_write_json(cv_dir / "analysis.json", analysis)
        pair = analysis["pairs"][0]
        lines.append(
            f"cv out-of-fold ({len(y)} images): agreement {pair['agreement']:.3f} "
            f"[{pair['agreement_ci_low']:.3f}, {pair['agreement_ci_high']:.3f}]"
        )
        lines.append(rule_message(analysis["rule"], "cv out-of-fold"))
    return lines
