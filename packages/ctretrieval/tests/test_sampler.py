from __future__ import annotations

import numpy as np
import pytest

from ctretrieval.config import SamplerConfig
from ctretrieval.data import balanced_sampler
from medcore.errors import DataError


def _sampler(y, ids, n_classes, n_samples, seed=0, **kwargs):
    """The package's triplet sampler (medcore's BalancedBatchSampler with its epoch length)."""
    return balanced_sampler(y, ids, SamplerConfig(n_classes, n_samples), seed, **kwargs)


def _labels():
    patterns = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    ids = np.repeat(np.arange(5), [6, 5, 4, 2, 7])
    return patterns[ids], ids


def test_batches_are_n_classes_by_n_samples_of_compatible_ids() -> None:
    y, ids = _labels()
    sampler = _sampler(y, ids, n_classes=2, n_samples=3, seed=1)
    assert len(sampler) == len(ids) // 6
    for batch in sampler:
        assert len(batch) == 6
        batch_ids = ids[batch]
        uniques, counts = np.unique(batch_ids, return_counts=True)
        assert len(uniques) == 2 and counts.tolist() == [3, 3]
        a, b = uniques
        # Every id has a compatible partner here, so the two never share a finding.
        assert not (y[ids == a][0] & y[ids == b][0]).any()


def test_max_steps_sets_the_epoch_length() -> None:
    y, ids = _labels()
    assert len(_sampler(y, ids, 2, 3, seed=0, batches_per_epoch=7)) == 7
    assert len(list(_sampler(y, ids, 2, 3, seed=0, batches_per_epoch=7))) == 7


def test_deterministic_per_seed_and_epoch() -> None:
    y, ids = _labels()
    s = _sampler(y, ids, 2, 3, seed=5)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    again = _sampler(y, ids, 2, 3, seed=5)
    again.set_epoch(1)
    assert list(again) == second and first != second


def test_ranks_draw_different_batches_of_equal_count() -> None:
    y, ids = _labels()
    r0 = _sampler(y, ids, 2, 3, seed=0, rank=0, world_size=2)
    r1 = _sampler(y, ids, 2, 3, seed=0, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(ids) // 12
    assert list(r0) != list(r1)


def test_too_few_label_ids() -> None:
    with pytest.raises(DataError, match="fewer than n_classes"):
        _sampler(np.ones((4, 2)), np.zeros(4, dtype=int), n_classes=2, n_samples=2)
