from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from ctretrieval.augment import RandomGaussianNoise3D, VolumeAugmentation
from ctretrieval.config import AugmentConfig, EvalConfig
from ctretrieval.metrics import (
    Embedded,
    compute_metrics,
    knn_label_scores,
    metric_intervals,
    metric_rows,
    per_query_retrieval,
    valid_ks,
)
from medcore.runtime.device import AmpPolicy


def test_knn_label_scores_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    labels = (torch.rand(12, 3, generator=g) > 0.5).float()
    scores = knn_label_scores(db, db, labels, k=3, exclude_self=True)
    for i in range(12):
        sims = [(float(db[i] @ db[j]), j) for j in range(12) if j != i]
        top = [j for _, j in sorted(sims, reverse=True)[:3]]
        torch.testing.assert_close(scores[i], labels[top].mean(0))


def test_compute_metrics_f1_matches_sklearn_and_beats_random_for_label_embeddings() -> None:
    rng = np.random.default_rng(0)
    y = torch.from_numpy((rng.random((40, 4)) < 0.4).astype(np.float32))
    emb = torch.nn.functional.normalize(
        y + 0.05 * torch.randn(40, 4), dim=1
    )  # embeddings that know the labels
    probs = torch.from_numpy(rng.random((40, 4)).astype(np.float32))
    data = Embedded(emb, y, probs)
    cfg = EvalConfig(ks=[1, 5, 10, 50])
    metrics, baseline, scores = compute_metrics(
        data, data, cfg, ["a", "b", "c", "d"], exclude_self=True
    )
    assert "map@50" not in metrics and "map@10" in metrics  # 39 rankable studies
    assert metrics["micro_f1"] == pytest.approx(
        f1_score(y.numpy(), probs.numpy() >= 0.5, average="micro")
    )
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(y.numpy(), probs.numpy() >= 0.5, average="macro", zero_division=0)
    )
    assert metrics["f1/c"] == pytest.approx(f1_score(y[:, 2].numpy(), probs[:, 2].numpy() >= 0.5))
    assert metrics["map@10"] > baseline["map@10"] + 0.2
    torch.testing.assert_close(scores, probs)


def test_valid_ks() -> None:
    assert valid_ks([20, 1, 5, 10], 10, exclude_self=True) == [1, 5]
    assert valid_ks([1, 10], 10, exclude_self=False) == [1, 10]


def test_noise_augmentation_gating() -> None:
    x = torch.rand(3, 1, 4, 8, 8)
    torch.manual_seed(0)
    noisy = RandomGaussianNoise3D(std=0.1, p=1.0)(x)
    assert noisy.shape == x.shape
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(RandomGaussianNoise3D(std=0.1, p=0.0)(x), x)


def test_volume_augmentation_shape_and_some_samples_untouched() -> None:
    torch.manual_seed(1)
    aug = VolumeAugmentation(AugmentConfig(affine_p=0.5, noise_p=0.5))
    x = torch.rand(16, 6, 16, 16)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    changed = (y - x).abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < 16  # p = 0.5 each: with 16 samples some are, some are not


def test_pooled_f1_covers_the_real_findings_and_shows_no_finding_apart() -> None:
    rng = np.random.default_rng(3)
    findings = (rng.random((30, 3)) < 0.3).astype(np.float32)
    y = np.concatenate([findings, (findings.sum(1) == 0)[:, None]], axis=1).astype(np.float32)
    # Findings half right, the derived slot always right (as it tends to be: it is set for
    # every study without a finding).
    probs = (y * 0.3 + rng.random(y.shape) * 0.6).astype(np.float32)
    probs[:, 3] = y[:, 3]
    emb = torch.nn.functional.normalize(torch.randn(30, 4), dim=1)
    data = Embedded(emb, torch.from_numpy(y), torch.from_numpy(probs))
    names = ["condensacion", "nodulos", "quistes", "sin_hallazgos"]
    metrics, _, _ = compute_metrics(
        data, data, EvalConfig(ks=[1, 5]), names, exclude_self=True, no_finding="sin_hallazgos"
    )
    pred = probs >= 0.5
    assert metrics["micro_f1"] == pytest.approx(f1_score(y[:, :3], pred[:, :3], average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y[:, :3], pred[:, :3], average="macro"))
    assert metrics["f1/sin_hallazgos"] == pytest.approx(f1_score(y[:, 3], pred[:, 3]))
    # With the derived slot pooled in, micro-F1 would read higher: the slot is easy.
    assert f1_score(y, pred, average="micro") > metrics["micro_f1"] + 0.01


def _average_precision_at(
    query: np.ndarray, db: np.ndarray, y_q: np.ndarray, y_db: np.ndarray, k: int
) -> float:
    """AP@k of one query written out: binary relevance (a shared finding), ranked by cosine."""
    order = np.argsort(-(db @ query), kind="stable")[:k]
    relevant = (y_db @ y_q) > 0
    n_relevant = int(relevant.sum())
    if not n_relevant:
        return np.nan
    hits, total = 0, 0.0
    for rank, j in enumerate(order, start=1):
        if relevant[j]:
            hits += 1
            total += hits / rank
    return total / min(k, n_relevant)


def _hand_bootstrap(stat, n: int, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of ``stat(rows)`` over ``n_boot`` resamples of ``n`` rows."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    values = values[~np.isnan(values)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def test_intervals_resample_queries_like_a_hand_written_bootstrap() -> None:
    rng = np.random.default_rng(5)
    # 25 test queries against a 40-study archive; a query without a finding has no relevant
    # study, so its map@5 is NaN and left out of the mean (and of each resample's mean).
    y_db = (rng.random((40, 3)) < 0.3).astype(np.float32)
    y_q = (rng.random((25, 3)) < 0.3).astype(np.float32)
    db_emb = torch.nn.functional.normalize(torch.from_numpy(y_db) + 0.5 * torch.randn(40, 3), dim=1)
    q_emb = torch.nn.functional.normalize(torch.from_numpy(y_q) + 0.5 * torch.randn(25, 3), dim=1)
    probs = torch.from_numpy(np.clip(y_q * 0.4 + rng.random(y_q.shape) * 0.5, 0, 1)).float()
    query = Embedded(q_emb, torch.from_numpy(y_q), probs)
    db = Embedded(db_emb, torch.from_numpy(y_db), None)
    cfg = EvalConfig(ks=[1, 5], relevance="binary", n_boot=300)
    metrics, _, scores = compute_metrics(query, db, cfg, ["a", "b", "c"], exclude_self=False)
    ci = metric_intervals(query, db, scores, cfg, ["a", "b", "c"], exclude_self=False, seed=11)

    ap = np.array(
        [
            _average_precision_at(q_emb[i].numpy(), db_emb.numpy(), y_q[i], y_db, 5)
            for i in range(25)
        ]
    )
    assert np.isnan(ap).any() and not np.isnan(ap).all()  # queries without a relevant study
    assert np.nanmean(ap) == pytest.approx(metrics["map@5"])
    low, high = _hand_bootstrap(lambda idx: np.nanmean(ap[idx]), 25, 300, seed=11)
    assert (ci["map@5_ci_low"], ci["map@5_ci_high"]) == pytest.approx((low, high))
    assert low < metrics["map@5"] < high

    pred = probs.numpy() >= 0.5
    low, high = _hand_bootstrap(
        lambda idx: f1_score(y_q[idx], pred[idx], average="micro", zero_division=0), 25, 300, 11
    )
    assert (ci["micro_f1_ci_low"], ci["micro_f1_ci_high"]) == pytest.approx((low, high))
    assert low <= metrics["micro_f1"] <= high and high - low > 0.01
    assert set(ci) == {f"{m}{s}" for m in metrics if "/" not in m for s in ("_ci_low", "_ci_high")}
    # Seeded: the same seed, the same intervals; the metric table gets a CI column, no CI rows.
    again = metric_intervals(query, db, scores, cfg, ["a", "b", "c"], exclude_self=False, seed=11)
    assert again == ci
    rows = metric_rows({**metrics, **ci}, {})
    assert [r["metric"] for r in rows] == list(metrics)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == (ci["p@1_ci_low"], ci["p@1_ci_high"])
    assert rows[-1]["metric"] == "f1/c" and rows[-1]["ci_low"] == ""
    no_boot = EvalConfig(ks=[1, 5], relevance="binary", n_boot=0)
    assert metric_intervals(query, db, scores, no_boot, ["a", "b", "c"], False) == {}
    with pytest.raises(ValueError, match=r"eval\.n_boot must be >= 0"):
        EvalConfig(n_boot=-1)


def test_per_query_values_average_to_the_reported_metrics_with_exclude_self() -> None:
    rng = np.random.default_rng(2)
    y = torch.from_numpy((rng.random((20, 3)) < 0.35).astype(np.float32))
    data = Embedded(torch.nn.functional.normalize(torch.randn(20, 4), dim=1), y, None)
    cfg = EvalConfig(ks=[1, 3, 5])
    metrics, _, _ = compute_metrics(data, data, cfg, ["a", "b", "c"], exclude_self=True)
    per_query = per_query_retrieval(data, data, [1, 3, 5], cfg, exclude_self=True)
    assert set(per_query) == {m for m in metrics if "@" in m}
    for name, values in per_query.items():
        assert values.shape == (20,) and np.nanmean(values) == pytest.approx(metrics[name]), name


class _Table:
    """The parts of a StudyTable that the train_eval evaluation reads."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [
            {
                "volume": torch.randint(0, 256, (6, 16, 16), dtype=torch.uint8, generator=g),
                "labels": torch.tensor([i % 2, (i + 1) % 2, 0, 0], dtype=torch.float32),
            }
            for i in range(n)
        ]
        self.labels = type("L", (), {"class_names": ["a", "b", "c", "sin_hallazgos"]})()

    def dataset(self, rows):
        return [self.items[i] for i in rows]


@pytest.mark.parametrize(
    ("policy", "dtype"),
    [
        (AmpPolicy(True, torch.bfloat16, False), torch.bfloat16),
        (AmpPolicy(False, torch.float32, False), torch.float32),
    ],
)
def test_train_eval_embeddings_run_in_the_trainers_precision(policy, dtype, tmp_path) -> None:
    from ctretrieval.config import CTRetrievalConfig
    from ctretrieval.model import Proximity100x100
    from ctretrieval.train import make_evaluate_fn
    from medcore.engine.task import EvalContext

    model = Proximity100x100(6, (16, 16), 8, 4, (4, 4, 4), 8)
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    logger = type("Logger", (), {"log_pr_curve": lambda *a, **k: None})()
    ctx = EvalContext(0, 0, torch.device("cpu"), policy, logger, tmp_path)
    cfg = CTRetrievalConfig()
    out = make_evaluate_fn(cfg, _Table(8), np.arange(8))(model, ctx)
    assert seen and set(seen) == {dtype}  # the trainer's autocast dtype, not a fixed fp16/fp32
    assert "val/map@1" in out and "val/f1/sin_hallazgos" in out
