"""Landmark error summaries on a hand-made case and against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcore.metrics import landmark_errors


def test_three_four_five_triangles():
    target = np.zeros((2, 2, 2))
    # Image 0: errors 5 and 10 (3-4-5 and 6-8-10); image 1: errors 0 and 5.
    pred = np.array([[[3.0, 4.0], [6.0, 8.0]], [[0.0, 0.0], [-4.0, 3.0]]])
    got = landmark_errors(pred, target, thresholds=(5.0, 8.5), percentiles=(50,))
    assert got["mean"] == pytest.approx(5.0)
    assert got["median"] == pytest.approx(5.0)
    assert got["std"] == pytest.approx(np.sqrt(12.5))
    assert got["max"] == pytest.approx(10.0)
    assert got["p50"] == pytest.approx(5.0)
    assert got["per_landmark_mean"] == pytest.approx([2.5, 7.5])
    assert got["per_image_mean"] == pytest.approx([7.5, 2.5])
    # Image means 7.5 and 2.5: one image under 5 px, both under 8.5 px.
    assert got["under_5px"] == 0.5
    assert got["under_8.5px"] == 1.0


def test_scale_converts_normalised_coordinates():
    target = torch.zeros(1, 1, 2)
    pred = torch.tensor([[[3.0, 4.0]]]) / 224
    got = landmark_errors(pred, target, scale=224.0)
    assert got["mean"] == pytest.approx(5.0)
    assert got["under_5px"] == 0.0  # strictly below the threshold
    assert got["under_8.5px"] == 1.0


def test_matches_numpy():
    rng = np.random.default_rng(0)
    target = rng.random((20, 6, 2))
    pred = target + rng.normal(scale=0.02, size=target.shape)
    got = landmark_errors(pred, target, scale=224.0)
    errors = np.sqrt(((pred - target) ** 2).sum(-1)) * 224
    assert got["mean"] == pytest.approx(errors.mean())
    assert got["std"] == pytest.approx(errors.std())
    for q in (25, 50, 75, 90, 95):
        assert got[f"p{q}"] == pytest.approx(np.percentile(errors, q))
    np.testing.assert_allclose(got["per_landmark_mean"], errors.mean(0))
    np.testing.assert_allclose(got["per_image_mean"], errors.mean(1))
    for t in (5.0, 8.5, 10.0, 15.0):
        assert got[f"under_{t:g}px"] == pytest.approx(np.mean(errors.mean(1) < t))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[n, L, 2\]"):
        landmark_errors(np.zeros((2, 3, 2)), np.zeros((2, 4, 2)))
