"""Pixel-error arithmetic: px at 224, original-image px, thresholds, categories, geometry."""

import numpy as np
import pytest

from cxrlandmarks.data import LandmarkRecord
from cxrlandmarks.evaluate import error_report, geometric_validation


def make_records(n: int, width: int = 299, height: int = 299) -> list[LandmarkRecord]:
    rng = np.random.default_rng(0)
    cats = ["COVID", "Normal"]
    return [
        LandmarkRecord(f"img{i}", cats[i % 2], None, rng.uniform(40, 250, (15, 2)), width, height)
        for i in range(n)
    ]


def test_errors_at_224_and_in_original_pixels():
    records = make_records(4, width=400, height=300)
    target = np.stack([r.normalised for r in records])
    pred = target.copy()
    # Image i: every landmark off by (3 + 3 i) / 224 in x and 4 / 224 in y -> 5, ~7.2, ~9.8, ~12.6 px.
    for i in range(4):
        pred[i, :, 0] += (3 + 3 * i) / 224
        pred[i, :, 1] += 4 / 224
    report = error_report(pred, records)
    per_image = np.hypot(3 + 3 * np.arange(4), 4)
    assert report["px224"]["mean"] == pytest.approx(per_image.mean())
    assert report["per_image_px224"] == pytest.approx(per_image.tolist())
    # Original pixels: x scaled by the width (400), y by the height (300).
    orig = np.hypot((3 + 3 * np.arange(4)) / 224 * 400, 4 / 224 * 300)
    assert report["original_px"]["mean"] == pytest.approx(orig.mean())
    # Shares of images strictly under each threshold: 5.0 is not under 5.
    assert report["px224"]["under_5px"] == 0.0
    assert report["px224"]["under_8.5px"] == 0.5
    assert report["px224"]["under_10px"] == 0.75
    assert report["px224"]["under_15px"] == 1.0
    assert report["per_category_px224"]["COVID"]["mean"] == pytest.approx(per_image[[0, 2]].mean())
    assert report["per_category_px224"]["Normal"]["n"] == 2
    assert report["per_landmark_px224"]["apex_left"] == pytest.approx(per_image.mean())


def test_geometric_validation_of_a_mirror_symmetric_target():
    pts = np.zeros((1, 15, 2))
    pts[0, [0, 1, 8, 9, 10], 0] = 0.5
    pts[0, [0, 8, 9, 10, 1], 1] = [0.1, 0.3, 0.5, 0.7, 0.9]
    for k, (a, b) in enumerate(((2, 3), (4, 5), (6, 7), (11, 12), (13, 14))):
        pts[0, a] = [0.3 - 0.02 * k, 0.2 + 0.1 * k]
        pts[0, b] = [0.7 + 0.02 * k, 0.2 + 0.1 * k]
    geo = geometric_validation(pts, pts)
    assert geo["symmetry_error_true_px"] == pytest.approx(0.0, abs=1e-9)
    assert geo["distance_error_px"] == pytest.approx(0.0, abs=1e-9)
    moved = pts.copy()
    moved[0, 3, 1] += 7 / 224  # right apex 7 px lower: pair (2,3) asymmetric by 7 px
    geo = geometric_validation(moved, pts)
    assert geo["symmetry_per_pair_px"]["2-3"] == pytest.approx(7.0)
    assert geo["symmetry_consistency_px"] == pytest.approx(7.0 / 5)
