import math

import pytest
import torch

from cxrlandmarks.anatomy import DISTANCE_PAIRS, SYMMETRIC_PAIRS
from cxrlandmarks.losses import (
    CompleteLandmarkLoss,
    DistancePreservationLoss,
    SymmetryLoss,
    WingLoss,
    build_loss,
)


def symmetric_chest() -> torch.Tensor:
    """Normalised [1, 15, 2] landmarks, exactly symmetric about x = 0.5."""
    pts = torch.zeros(15, 2)
    for i, y in zip((0, 8, 9, 10, 1), (0.1, 0.3, 0.5, 0.7, 0.9), strict=True):
        pts[i] = torch.tensor([0.5, y])
    for k, (a, b) in enumerate(SYMMETRIC_PAIRS):
        pts[a] = torch.tensor([0.5 - 0.1 - 0.05 * k, 0.2 + 0.1 * k])
        pts[b] = torch.tensor([0.5 + 0.1 + 0.05 * k, 0.2 + 0.1 * k])
    return pts[None]


def test_wing_matches_hand_computed_values_in_pixels():
    target = torch.zeros(1, 30)
    pred = torch.zeros(1, 30)
    pred[0, 0] = 1 / 224  # 1 px: logarithmic part
    pred[0, 1] = -20 / 224  # 20 px: linear part
    c = 10 - 10 * math.log(1 + 10 / 2)
    expected = (10 * math.log(1 + 1 / 2) + (20 - c)) / 30
    assert WingLoss()(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_wing_is_continuous_at_w():
    loss = WingLoss(pixel_scale=1.0)
    below = loss(torch.tensor([[10 - 1e-4]]), torch.zeros(1, 1)).item()
    above = loss(torch.tensor([[10 + 1e-4]]), torch.zeros(1, 1)).item()
    assert above == pytest.approx(below, abs=1e-3)


def test_symmetry_zero_for_symmetric_prediction_in_prior_mode():
    chest = symmetric_chest()
    assert SymmetryLoss(reference="prior")(chest, chest).item() == pytest.approx(0.0, abs=1e-5)


def test_symmetry_hand_computed_shift_of_one_landmark():
    chest = symmetric_chest()
    pred = chest.clone()
    pred[0, 3, 0] += 4 / 224  # right apex 4 px outward; the axis (mediastinal mean x) is unchanged
    pred[0, 13, 1] += 2 / 224  # left costophrenic angle 2 px down
    # Residuals: pair (2,3) x by 4 px; pair (13,14) y by 2 px; 5 pairs x 2 axes averaged.
    expected = (4 + 2) / 10
    assert SymmetryLoss(reference="prior")(pred, chest).item() == pytest.approx(expected, rel=1e-4)
    assert SymmetryLoss(reference="target")(pred, chest).item() == pytest.approx(expected, rel=1e-4)


def test_symmetry_axis_moves_with_mediastinum_and_target_mode_ignores_true_asymmetry():
    chest = symmetric_chest()
    shifted = chest.clone()
    shifted[0, [0, 1, 8, 9, 10], 0] += 5 / 224  # axis +5 px -> each pair's x residual -10 px
    assert SymmetryLoss(reference="prior")(shifted, chest).item() == pytest.approx(
        10 * 5 / 10, rel=1e-4
    )
    # A prediction equal to an asymmetric target costs nothing in target mode.
    assert SymmetryLoss(reference="target")(shifted, shifted).item() == pytest.approx(0.0, abs=1e-5)


def test_distance_preservation_hand_computed():
    chest = symmetric_chest()
    pred = chest.clone()
    pred[0, 1, 1] += 6 / 224  # mediastinum bottom 6 px down: changes (0,1) and (10,1) by 6 px each
    expected = (6 + 6) / len(DISTANCE_PAIRS)
    assert DistancePreservationLoss()(pred, chest).item() == pytest.approx(expected, rel=1e-3)


def test_complete_is_weighted_sum_of_unit_weight_components():
    torch.manual_seed(0)
    target = torch.rand(4, 30)
    pred = (target + 0.05 * torch.randn(4, 30)).clamp(0, 1)
    wing = WingLoss()(pred, target)
    sym = SymmetryLoss()(pred, target)
    dist = DistancePreservationLoss()(pred, target)
    total, terms = CompleteLandmarkLoss()(pred, target)
    assert total.item() == pytest.approx((wing + 0.3 * sym + 0.2 * dist).item(), rel=1e-5)
    # The unweighted components, detached: what the trainer logs as train/<term>.
    assert set(terms) == {"wing", "symmetry", "distance"}
    for name, ref in (("wing", wing), ("symmetry", sym), ("distance", dist)):
        assert terms[name].item() == pytest.approx(ref.item(), rel=1e-6)
        assert not terms[name].requires_grad
    total, terms = build_loss("symmetry")(pred, target)
    assert total.item() == pytest.approx((wing + 0.3 * sym).item(), rel=1e-5)
    assert set(terms) == {"wing", "symmetry"}  # a term weighted 0 is not computed
    total, terms = build_loss("wing")(pred, target)
    assert total.item() == pytest.approx(wing.item(), rel=1e-6)
    assert set(terms) == {"wing"}
    assert set(build_loss("complete").terms) == {"wing", "symmetry", "distance"}


def test_mse_baseline_returns_its_one_term():
    pred, target = torch.full((2, 30), 0.5), torch.zeros(2, 30)
    total, terms = build_loss("mse")(pred, target)
    assert total.item() == pytest.approx(112.0**2)  # 0.5 x 224 px on every coordinate
    assert terms == {"mse": total.detach()}


def test_gradients_finite_at_perfect_prediction():
    target = symmetric_chest().reshape(1, 30)
    pred = target.clone().requires_grad_(True)
    build_loss("complete")(pred, target)[0].backward()
    assert torch.isfinite(pred.grad).all()


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("huber")
    with pytest.raises(ValueError, match=r"unknown loss terms \['dist'\]"):
        CompleteLandmarkLoss({"dist": 0.2})


def test_build_loss_takes_the_configs_loss_section():
    from cxrlandmarks.config import LossConfig

    cfg = LossConfig(wing_w=5.0, wing_epsilon=1.0, symmetry_weight=0.5, distance_weight=0.7)
    loss = build_loss("complete", cfg)
    assert loss.weights == {"wing": 1.0, "symmetry": 0.5, "distance": 0.7}
    assert (loss.terms["wing"].w, loss.terms["wing"].epsilon) == (5.0, 1.0)
    # Phase 3 switches the distance term off whatever the config weights it at.
    assert build_loss("symmetry", cfg).weights == {"wing": 1.0, "symmetry": 0.5, "distance": 0.0}


def rotated(points: torch.Tensor, degrees: float, about=(0.5, 0.5)) -> torch.Tensor:
    a = math.radians(degrees)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = torch.tensor(about)
    return (points - centre) @ rot.T + centre


def test_default_symmetry_is_the_prior_about_the_fitted_axis():
    from cxrlandmarks.config import LossConfig

    assert LossConfig().symmetry_reference == "prior"
    assert SymmetryLoss().reference == "prior"
    assert build_loss("symmetry").terms["symmetry"].reference == "prior"


def test_rotated_symmetric_chest_has_zero_prior_symmetry_loss():
    """Images are rotated by up to 15 degrees: symmetry is about the mediastinal axis at its own
    angle, so a perfectly symmetric chest turned by 10 degrees costs nothing."""
    chest = rotated(symmetric_chest(), 10.0)
    assert SymmetryLoss(reference="prior")(chest, chest).item() == pytest.approx(0.0, abs=1e-4)
    # About a vertical axis it would cost a lot (the pairs' heights differ by several px).
    left = chest[0, [a for a, _ in SYMMETRIC_PAIRS], 1] * 224
    right = chest[0, [b for _, b in SYMMETRIC_PAIRS], 1] * 224
    assert (left - right).abs().mean() > 5


@pytest.mark.parametrize("degrees", [0.0, 10.0, -15.0])
def test_asymmetric_chest_hand_computed_in_the_axis_frame(degrees):
    """Right apex 4 px further from the axis, left costophrenic angle 2 px further down the
    axis: residuals 4 (pair 2-3, across) and 2 (pair 13-14, along) over 5 pairs x 2 = 0.6 px,
    at any rotation of the whole chest."""
    chest = symmetric_chest()
    moved = chest.clone()
    moved[0, 3, 0] += 4 / 224
    moved[0, 13, 1] += 2 / 224
    pred = rotated(moved, degrees)
    loss = SymmetryLoss(reference="prior")(pred, rotated(chest, degrees))
    assert loss.item() == pytest.approx((4 + 2) / 10, abs=1e-4)


def test_target_reference_keeps_the_truths_asymmetry_at_any_angle():
    chest = symmetric_chest()
    asym = chest.clone()
    asym[0, 3, 0] += 4 / 224
    truth = rotated(asym, 12.0)
    assert SymmetryLoss(reference="target")(truth, truth).item() == pytest.approx(0.0, abs=1e-4)
    assert SymmetryLoss(reference="prior")(truth, truth).item() == pytest.approx(0.4, abs=1e-4)


def test_symmetry_gradients_finite_when_predicted_points_coincide():
    pred = torch.full((2, 30), 0.5, requires_grad=True)
    SymmetryLoss()(pred, torch.rand(2, 30)).backward()
    assert torch.isfinite(pred.grad).all()
