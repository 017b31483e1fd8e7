"""Soft voting of several models' probability files, and the analysis of how they differ.

A probability file is a CSV ``image_id,prob_<class0>,prob_<class1>[,target]`` as written by
``binensemble-predict``. Files are aligned by ``image_id``; files that do not describe the same
images with the same classes are refused with a one-line error.

One decision rule everywhere (:func:`decide`): the class with the larger probability, a tie
(P(disease) exactly 0.5, e.g. a soft vote of 0.4 and 0.6) going to class 0 (normal). It is the
rule of medcore's KNN (``knn_auto_k`` chooses k with it), of the CSVs, the reported metrics and
the analysis, so a reported accuracy is the accuracy of the written labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from medcore.errors import DataError, UserError
from medcore.io import atomic_write_csv, read_csv
from medcore.metrics import bootstrap_ci
from medcore.report.plots import save_figure

PROB_PREFIX = "prob_"


def decide(probs: np.ndarray) -> np.ndarray:
    """Labels of ``[n, c]`` probabilities: the arg-max, ties to the lower class id (normal)."""
    return np.asarray(probs).argmax(1)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (sound at 0, 1 and small n)."""
    if n == 0:
        return float("nan"), float("nan")
    z = float(NormalDist().inv_cdf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


@dataclass
class ProbFile:
    """One model's class probabilities ``[n, c]`` per image id (ids in file order)."""

    path: Path
    ids: list[str]
    classes: list[str]
    probs: np.ndarray
    targets: np.ndarray | None = None


def read_probs(path: str | Path) -> ProbFile:
    """Read and check a probability file (columns, finite values in [0, 1], rows summing to 1)."""
    path = Path(path)
    frame = read_csv(path, required=["image_id"], unique="image_id", dtype={"image_id": str})
    if frame["image_id"].isna().any():
        row = int(np.flatnonzero(frame["image_id"].isna())[0]) + 2  # 1-based, after the header
        raise DataError(path, f"empty image_id on line {row}")
    cols = [c for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    if len(cols) != 2:
        raise DataError(
            path,
            f"needs exactly two {PROB_PREFIX}<class> columns, one per class "
            f"(found: {', '.join(map(str, frame.columns))})",
        )
    if frame.empty:
        raise DataError(path, "has no rows")
    try:
        probs = frame[cols].to_numpy(dtype=float)
    except ValueError:
        raise DataError(path, "probability columns hold non-numbers") from None
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise DataError(path, "probabilities must be finite numbers in [0, 1]")
    bad = np.flatnonzero(np.abs(probs.sum(1) - 1.0) > 1e-3)
    if bad.size:
        raise DataError(
            path, f"probabilities of image {frame['image_id'].iloc[bad[0]]!r} do not sum to 1"
        )
    targets = None
    if "target" in frame.columns:
        values = pd.to_numeric(frame["target"], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isin(values, np.arange(len(cols))))
        if bad.size:
            raise DataError(
                path,
                f"target of image {frame['image_id'].iloc[bad[0]]!r} is "
                f"{frame['target'].iloc[bad[0]]}; targets must be class ids 0..{len(cols) - 1}",
            )
        targets = values.astype(np.int64)
    classes = [c[len(PROB_PREFIX) :] for c in cols]
    return ProbFile(path, frame["image_id"].astype(str).tolist(), classes, probs, targets)


def align(files: Sequence[ProbFile]) -> list[ProbFile]:
    """The files reordered to the first one's image order; mismatches are a DataError."""
    ref = files[0]
    out = [ref]
    ref_set = set(ref.ids)
    for f in files[1:]:
        if f.classes != ref.classes:
            raise DataError(f.path, f"classes {f.classes} differ from {ref.classes} in {ref.path}")
        missing = sorted(ref_set - set(f.ids))
        extra = sorted(set(f.ids) - ref_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} image(s) of {ref.path.name} missing (e.g. {missing[0]!r})"
                )
            if extra:
                parts.append(f"{len(extra)} image(s) not in {ref.path.name} (e.g. {extra[0]!r})")
            raise DataError(f.path, f"does not match {ref.path}: {'; '.join(parts)}")
        order = pd.Index(f.ids).get_indexer(ref.ids)
        out.append(
            ProbFile(
                f.path,
                list(ref.ids),
                f.classes,
                f.probs[order],
                None if f.targets is None else f.targets[order],
            )
        )
    return out


def check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """Voting weights normalised to sum 1 (equal weights when none are given)."""
    if not weights:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=float)
    if w.size != n:
        raise UserError("--weights", f"got {w.size} weight(s) for {n} probability files")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UserError("--weights", "weights must be non-negative numbers with a positive sum")
    return w / w.sum()


def soft_vote(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of ``[n, c]`` probability arrays (weights normalised to sum 1)."""
    w = check_weights(weights, len(probs))
    return np.tensordot(w, np.stack(probs), axes=1)


def probs_frame(
    ids: Sequence[str], probs: np.ndarray, classes: Sequence[str], targets: np.ndarray | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame({"image_id": list(ids)})
    for j, cls in enumerate(classes):
        frame[f"{PROB_PREFIX}{cls}"] = probs[:, j]
    if targets is not None:
        frame["target"] = targets
    return frame


def write_predictions(
    out_dir: str | Path,
    name: str,
    ids: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    targets: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """``<name>.csv`` (``image_id,label``) and ``<name>_probs.csv`` (probabilities), atomically."""
    out_dir = Path(out_dir)
    labels = pd.DataFrame({"image_id": list(ids), "label": decide(probs)})
    pred = atomic_write_csv(out_dir / f"{name}.csv", labels)
    prob = atomic_write_csv(
        out_dir / f"{name}_probs.csv", probs_frame(ids, probs, classes, targets)
    )
    return pred, prob


def vote_files(
    paths: Sequence[str | Path], weights: Sequence[float] | None = None
) -> tuple[ProbFile, np.ndarray]:
    """Read, align and soft-vote probability files; returns the reference file and the voted probs."""
    if len(paths) < 2:
        raise UserError("binensemble-vote", "needs two or more probability files")
    files = align([read_probs(p) for p in paths])
    return files[0], soft_vote([f.probs for f in files], weights)


def resolve_targets(files: Sequence[ProbFile], labels: dict[str, int] | None) -> np.ndarray | None:
    """True labels from a labels mapping, else from the files' ``target`` column (if all agree)."""
    ids = files[0].ids
    if labels is not None:
        missing = [i for i in ids if i not in labels]
        if missing:
            raise DataError(
                "--labels", f"no label for {len(missing)} image(s) (e.g. {missing[0]!r})"
            )
        return np.asarray([labels[i] for i in ids], dtype=np.int64)
    targets = [f.targets for f in files if f.targets is not None]
    if not targets:
        return None
    if any(not np.array_equal(t, targets[0]) for t in targets):
        raise DataError(files[0].path, "the files' target columns disagree")
    return targets[0]


def analyse(
    names: Sequence[str],
    probs: Sequence[np.ndarray],
    targets: np.ndarray | None,
    weights: Sequence[float] | None = None,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-model and voted accuracy, pairwise agreement and complementarity, with intervals.

    For each pair: agreement rate (Wilson interval), Cohen's kappa and the number of
    disagreements; with labels also how often only one of the two is right (the samples voting
    can fix), both are wrong (double fault, no vote can fix) and the oracle accuracy (either is
    right). Accuracies carry Wilson intervals; the vote's gain over each model a paired
    bootstrap interval (the same images resampled for both).
    """
    preds = [decide(p) for p in probs]
    voted = soft_vote(probs, weights)
    vote_pred = decide(voted)
    n = len(vote_pred)
    models = []
    for name, p, pred in zip([*names, "vote"], [*probs, voted], [*preds, vote_pred], strict=True):
        row: dict[str, Any] = {
            "model": name,
            "predicted_positive": float(pred.mean()),
            "mean_confidence": float(p.max(1).mean()),
        }
        if targets is not None:
            right = int((pred == targets).sum())
            low, high = wilson_interval(right, n, confidence)
            row.update(accuracy=right / n, accuracy_ci_low=low, accuracy_ci_high=high)
            if name != "vote":
                gain = (vote_pred == targets).mean() - right / n
                low, high = bootstrap_ci(
                    _gain, targets, np.stack([vote_pred, pred], 1), n_boot, 1 - confidence, seed
                )
                row.update(vote_gain=float(gain), vote_gain_ci_low=low, vote_gain_ci_high=high)
        models.append(row)
    pairs = []
    for i, j in combinations(range(len(names)), 2):
        a, b = preds[i], preds[j]
        differ = a != b
        low, high = wilson_interval(int((~differ).sum()), n, confidence)
        row = {
            "pair": f"{names[i]} vs {names[j]}",
            "agreement": float((~differ).mean()),
            "agreement_ci_low": low,
            "agreement_ci_high": high,
            "kappa": float(cohen_kappa_score(a, b)) if len(np.unique(np.r_[a, b])) > 1 else 1.0,
            "disagreements": int(differ.sum()),
        }
        if targets is not None:
            ra, rb = a == targets, b == targets
            row.update(
                {
                    f"only_{names[i]}_right": int((ra & ~rb).sum()),
                    f"only_{names[j]}_right": int((rb & ~ra).sum()),
                    "both_wrong": int((~ra & ~rb).sum()),
                    "oracle_accuracy": float((ra | rb).mean()),
                    "vote_right_on_disagreements": int(
                        (vote_pred[differ] == targets[differ]).sum()
                    ),
                }
            )
        pairs.append(row)
    return {
        "models": models,
        "pairs": pairs,
        "n_images": n,
        "labelled": targets is not None,
        "confidence": confidence,
    }


def _gain(targets: np.ndarray, preds: np.ndarray) -> float:
    """Accuracy of ``preds[:, 0]`` (the vote) minus that of ``preds[:, 1]`` (one model)."""
    return float((preds[:, 0] == targets).mean() - (preds[:, 1] == targets).mean())


def check_rule(
    report: dict[str, Any], min_accuracy: float = 0.90, max_disagreement: float = 0.05
) -> dict[str, Any]:
    """The seed's ensemble rule on an :func:`analyse` report: every model's accuracy above
    ``min_accuracy`` (needs labels) and every pair disagreeing on fewer than
    ``max_disagreement`` of the images. Returns ``{"holds", "checked", "reasons"}``.
    """
    reasons = []
    checked = ["disagreement"]
    if report["labelled"]:
        checked.insert(0, "accuracy")
        for row in report["models"]:
            if row["model"] != "vote" and not row["accuracy"] > min_accuracy:
                reasons.append(
                    f"{row['model']} accuracy {row['accuracy']:.3f} "
                    f"[{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}] "
                    f"is not above {min_accuracy:.2f}"
                )
    for pair in report["pairs"]:
        rate = 1.0 - pair["agreement"]
        if not rate < max_disagreement:
            reasons.append(
                f"{pair['pair']} disagree on {rate:.1%} of {report['n_images']} images "
                f"(not under {max_disagreement:.0%})"
            )
    return {
        "holds": not reasons,
        "checked": checked,
        "min_accuracy": min_accuracy,
        "max_disagreement": max_disagreement,
        "reasons": reasons,
    }


def disagreement_frame(
    ids: Sequence[str],
    names: Sequence[str],
    probs: Sequence[np.ndarray],
    targets: np.ndarray | None,
    weights: Sequence[float] | None = None,
) -> pd.DataFrame:
    """The images on which at least two models predict different labels, with every model's P(positive)."""
    preds = np.stack([decide(p) for p in probs])
    voted = soft_vote(probs, weights)
    differ = (preds != preds[0]).any(0)
    frame = pd.DataFrame({"image_id": np.asarray(ids)[differ]})
    for name, p, pred in zip(names, probs, preds, strict=True):
        frame[f"{name}_label"] = pred[differ]
        frame[f"{name}_p1"] = p[differ, 1]
    frame["vote_label"] = decide(voted)[differ]
    frame["vote_p1"] = voted[differ, 1]
    if targets is not None:
        frame["target"] = targets[differ]
    return frame


def plot_analysis(
    names: Sequence[str],
    probs: Sequence[np.ndarray],
    targets: np.ndarray | None,
    report: dict[str, Any],
    path: str | Path,
) -> Path:
    """Accuracy bars (or positive rates), the agreement matrix and P(positive) of the first two models."""
    import matplotlib.pyplot as plt  # headless backend already chosen by medcore.report.plots

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    key = "accuracy" if targets is not None else "predicted_positive"
    rows = report["models"]
    axes[0].bar([r["model"] for r in rows], [r[key] for r in rows], color="tab:blue")
    for x, r in enumerate(rows):
        axes[0].text(x, r[key], f"{r[key]:.3f}", ha="center", va="bottom", fontsize=8)
    axes[0].set_ylim(0, 1.08)
    axes[0].set_title(key.replace("_", " "))
    preds = [decide(p) for p in probs]
    agree = np.array([[float((a == b).mean()) for b in preds] for a in preds])
    axes[1].imshow(agree, vmin=min(0.5, agree.min()), vmax=1.0, cmap="Greens")
    for (i, j), v in np.ndenumerate(agree):
        axes[1].text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_title("agreement")
    colour = targets if targets is not None else preds[0]
    axes[2].scatter(probs[0][:, 1], probs[1][:, 1], c=colour, cmap="coolwarm", s=10, alpha=0.8)
    axes[2].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[2].axvline(0.5, color="grey", lw=0.8, ls="--")
    axes[2].set_xlabel(f"{names[0]} P(class 1)")
    axes[2].set_ylabel(f"{names[1]} P(class 1)")
    axes[2].set_title(
        "complementarity (colour: " + ("truth" if targets is not None else names[0]) + ")"
    )
    return save_figure(fig, path)


def rule_message(rule: dict[str, Any], where: str) -> str:
    """One line saying whether the seed's ensemble rule holds on ``where``, and why not."""
    if rule["holds"]:
        return f"{where}: ensemble rule holds ({' and '.join(rule['checked'])} checked)"
    return (
        f"warning: {where}: the seed's ensemble rule does not hold ({'; '.join(rule['reasons'])}); "
        "the seed votes only two models that are both accurate and rarely disagree"
    )
