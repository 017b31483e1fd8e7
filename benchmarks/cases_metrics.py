"""Case 5 (retrieval metrics against torchmetrics) and the KNN part of case 7 (against sklearn)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from common import Row, best_time, fmt_bytes, fmt_s, peak_rss_in_child

from medcore.metrics import compute_relevance, knn_auto_k, retrieval_metrics

KS = (1, 3, 5, 10, 20)


def _retrieval_data(n_query: int, n_db: int, dim: int = 128, classes: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=gen), dim=1)
    d = torch.nn.functional.normalize(torch.randn(n_db, dim, generator=gen), dim=1)
    # Dense labels so every query has relevant items (torchmetrics and medcore then average
    # over the same queries).
    ql = (torch.rand(n_query, classes, generator=gen) < 0.35).float()
    dl = (torch.rand(n_db, classes, generator=gen) < 0.35).float()
    ql[ql.sum(1) == 0, 0] = 1
    dl[dl.sum(1) == 0, 0] = 1
    return q, d, ql, dl


def _torchmetrics_all(q, d, ql, dl):
    """The same metrics with torchmetrics' module API (flat preds/target/indexes)."""
    from torchmetrics.retrieval import (
        RetrievalMAP,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    scores = (q @ d.T).flatten()
    graded = compute_relevance(ql, dl, "jaccard").flatten()
    binary = graded > 0
    index = torch.arange(q.shape[0]).repeat_interleave(d.shape[0])
    out = {}
    for k in KS:
        out[f"p@{k}"] = float(RetrievalPrecision(top_k=k)(scores, binary, indexes=index))
        out[f"r@{k}"] = float(RetrievalRecall(top_k=k)(scores, binary, indexes=index))
        out[f"map_tm@{k}"] = float(RetrievalMAP(top_k=k)(scores, binary, indexes=index))
        out[f"ndcg@{k}"] = float(RetrievalNormalizedDCG(top_k=k)(scores, graded, indexes=index))
    return out


def _map_parity(q, d, ql, dl, n_check: int) -> float:
    """Largest |medcore mAP@k - torchmetrics-derived mAP@k| over ``n_check`` queries.

    torchmetrics divides AP@k by the hits inside the top k; medcore by min(k, all relevant).
    Per query: AP_medcore = AP_tm * hits@k / min(k, R), an exact identity, so parity is checked
    query by query through torchmetrics' functional API.
    """
    from torchmetrics.functional.retrieval import retrieval_average_precision

    worst = 0.0
    rel = compute_relevance(ql[:n_check], dl, "binary") > 0
    scores = q[:n_check] @ d.T
    for k in KS:
        ours = retrieval_metrics(q[:n_check], d, ql[:n_check], dl, ks=(k,), relevance="binary")[
            f"map@{k}"
        ]
        per_query = []
        for i in range(n_check):
            order = scores[i].argsort(descending=True)
            hits = int(rel[i][order[:k]].sum())
            total = int(rel[i].sum())
            ap_tm = float(retrieval_average_precision(scores[i], rel[i], top_k=k))
            per_query.append(ap_tm * hits / min(k, total))
        worst = max(worst, abs(ours - float(np.mean(per_query))))
    return worst


def _medcore_peak(n_query: int, n_db: int) -> None:
    q, d, ql, dl = _retrieval_data(n_query, n_db)
    retrieval_metrics(q, d, ql, dl, ks=KS, relevance="jaccard")


def _torchmetrics_peak(n_query: int, n_db: int) -> None:
    q, d, ql, dl = _retrieval_data(n_query, n_db)
    _torchmetrics_all(q, d, ql, dl)


def case_retrieval(device: torch.device, quick: bool) -> list[Row]:
    n_query, n_db = 5000, 5000
    # torchmetrics loops over queries in Python, so its time is linear in the query count: it
    # is measured on a subset and scaled (a full 5000-query run takes tens of minutes on 2 cores).
    n_ref = 100 if quick else 500
    q, d, ql, dl = _retrieval_data(n_query, n_db)
    q, d, ql, dl = (t.to(device) for t in (q, d, ql, dl))

    t_ours = best_time(
        lambda: retrieval_metrics(q, d, ql, dl, ks=KS, relevance="jaccard"), device, repeats=3
    )
    sub = [t[:n_ref].cpu() for t in (q, ql)]
    qs, qls, dc, dlc = sub[0], sub[1], d.cpu(), dl.cpu()
    ref: dict[str, float] = {}

    def run_ref() -> None:
        ref.update(_torchmetrics_all(qs, dc, qls, dlc))

    t_ref = best_time(run_ref, torch.device("cpu"), repeats=1, warmup=0) * n_query / n_ref
    graded = retrieval_metrics(qs, dc, qls, dlc, ks=KS, relevance="jaccard")
    binary = retrieval_metrics(qs, dc, qls, dlc, ks=KS, relevance="binary")
    diffs = [abs(binary[f"p@{k}"] - ref[f"p@{k}"]) for k in KS]
    diffs += [abs(binary[f"r@{k}"] - ref[f"r@{k}"]) for k in KS]
    diffs += [abs(graded[f"ndcg@{k}"] - ref[f"ndcg@{k}"]) for k in KS]
    diffs.append(_map_parity(qs, dc, qls, dlc, n_check=min(n_ref, 100)))
    max_diff = max(diffs)
    ratio = t_ref / t_ours
    # Peak CPU memory (fresh processes, data generation included on both sides); torchmetrics on
    # its query subset only, so its figure is a lower bound for the full run.
    mem_ours = peak_rss_in_child(functools.partial(_medcore_peak, n_query, n_db))[0]
    mem_ref = peak_rss_in_child(functools.partial(_torchmetrics_peak, n_ref, n_db))[0]
    return [
        Row(
            f"5 retrieval metrics {n_query}x{n_db}, k={list(KS)}",
            fmt_s(t_ours),
            f"torchmetrics {fmt_s(t_ref)} (timed on {n_ref} queries, scaled)",
            ratio,
            ">= 20x, equal to 1e-6",
            ratio >= 20 and max_diff <= 1e-6,
            f"max |diff| {max_diff:.1e}; peak RSS medcore {fmt_bytes(mem_ours)} (all "
            f"{n_query} queries), torchmetrics {fmt_bytes(mem_ref)} ({n_ref} queries); "
            "AP@k converted per query (see BENCHMARKS.md)",
        )
    ]


def case_knn(device: torch.device, quick: bool) -> list[Row]:
    from sklearn.neighbors import KNeighborsClassifier

    n = 10_000
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 128, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.nn.functional.normalize(centers[y] + 2.0 * torch.randn(n, 128, generator=gen), dim=1)
    tr, va = slice(0, 8000), slice(8000, n)
    ks = (5, 9, 15, 20, 25, 30, 40, 50)
    result = {}

    def ours() -> None:
        result["ours"] = knn_auto_k(
            x[tr].to(device), y[tr].to(device), x[va].to(device), y[va].to(device), ks=ks
        )

    def sklearn_loop() -> None:
        scores = {}
        for k in ks:
            clf = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(
                x[tr].numpy(), y[tr].numpy()
            )
            scores[k] = float((clf.predict(x[va].numpy()) == y[va].numpy()).mean())
        result["ref"] = (max(scores, key=lambda k: (scores[k], -k)), scores)

    t_ours = best_time(ours, device, repeats=3)
    t_ref = best_time(sklearn_loop, torch.device("cpu"), repeats=1, warmup=0)
    same_k = result["ours"][0] == result["ref"][0]
    ratio = t_ref / t_ours
    return [
        Row(
            "7 KNN auto-k search, 8000 train x 2000 val x 128-d, 8 k values",
            fmt_s(t_ours),
            f"sklearn loop {fmt_s(t_ref)}",
            ratio,
            "faster than sklearn, same k",
            ratio > 1 and same_k,
            f"k={result['ours'][0]} (sklearn k={result['ref'][0]})",
        )
    ]


CASES = {"retrieval": case_retrieval, "knn": case_knn}
