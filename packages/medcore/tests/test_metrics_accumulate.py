"""MetricAccumulator in one process and across two gloo ranks."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medcore.metrics import MetricAccumulator, retrieval_metrics

# Rows each rank sees, in batches: uneven totals.
BATCHES = {0: [4, 3], 1: [2]}


def _data(rank: int, sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches of embeddings and labels for one rank."""
    generator = torch.Generator().manual_seed(rank)
    return [
        {
            "emb": torch.randn(n, 3, generator=generator),
            "labels": torch.randint(0, 2, (n, 4), generator=generator),
        }
        for n in sizes
    ]


def _metric(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return retrieval_metrics(emb, emb, labels, labels, ks=(1, 3), exclude_self=True)


def test_single_process_concatenates_and_copies():
    acc = MetricAccumulator()
    buffer = torch.zeros(2, 3)
    acc.update(x=buffer, y=np.array([1, 2]))
    buffer += 1  # the caller reuses its buffer; the stored batch must not change
    acc.update(x=buffer[:1], y=torch.tensor(3))
    out = acc.compute()
    assert torch.equal(out["x"], torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3]))
    assert out["y"].tolist() == [1, 2, 3]
    acc.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        acc.compute()


def test_compute_applies_the_metric_function():
    batches = _data(0, [5, 4])
    acc = MetricAccumulator(_metric)
    for batch in batches:
        acc.update(**batch)
    whole = {name: torch.cat([b[name] for b in batches]) for name in ("emb", "labels")}
    assert acc.compute() == _metric(**whole)


def test_update_rejects_changing_names():
    acc = MetricAccumulator()
    acc.update(a=torch.ones(1))
    with pytest.raises(ValueError, match="names"):
        acc.update(b=torch.ones(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        metric_acc, raw_acc, rank0_only = (
            MetricAccumulator(_metric),
            MetricAccumulator(),
            MetricAccumulator(),
        )
        for batch in _data(rank, BATCHES[rank]):
            metric_acc.update(**batch)
            raw_acc.update(**batch)
            if rank == 0:
                rank0_only.update(**batch)
        result = {
            "metric": metric_acc.compute(),
            "raw": raw_acc.compute(),
            "rank0_only": rank0_only.compute(),
        }
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gather_uneven_rows(tmp_path, monkeypatch):
    # Spawned workers unpickle _worker by module name, and pytest's name for this module
    # ("tests.…") is shadowed by a top-level "tests" package that iterative-stratification
    # installs. Expose the module under its file name, importable from its own directory.
    alias = Path(__file__).stem
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(sys.modules, alias, sys.modules[__name__])
    monkeypatch.setattr(_worker, "__module__", alias)
    world_size = len(BATCHES)
    mp.spawn(_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size)

    per_rank = {rank: _data(rank, sizes) for rank, sizes in BATCHES.items()}
    union = {
        name: torch.cat([b[name] for rank in range(world_size) for b in per_rank[rank]])
        for name in ("emb", "labels")
    }
    expected = _metric(**union)
    for rank in range(world_size):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["metric"] == expected
        for name, tensor in union.items():
            assert torch.equal(result["raw"][name], tensor)
            # A rank that saw no batch still joins the gather and gets rank 0's rows.
            assert torch.equal(
                result["rank0_only"][name], torch.cat([b[name] for b in per_rank[0]])
            )
