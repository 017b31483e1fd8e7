"""Geometric augmentation keeps every landmark on the same anatomy.

Coordinates are in the package's pixel-edge convention: the dot drawn on pixel column ``i`` has
its centre at ``i + 0.5``.
"""

import numpy as np
import pytest
import torch

from cxrlandmarks.anatomy import SYMMETRIC_PAIRS, flip_coords, swap_permutation
from cxrlandmarks.augment import AugmentParams, apply_geometry, sample_augment
from cxrlandmarks.config import AugmentConfig
from cxrlandmarks.data import LandmarkDataset, LandmarkRecord
from medcore.testing import write_png

H, W = 121, 141


def landmarks() -> torch.Tensor:
    """15 landmarks on a jittered 5 x 3 grid at pixel centres: ~15 px apart, 30 px inside."""
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.linspace(35, W - 35, 5), np.linspace(32, H - 32, 3))
    pts = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-3, 3, (15, 2))
    return torch.tensor(pts, dtype=torch.float32).floor() + 0.5


def dot_image(coords: torch.Tensor) -> torch.Tensor:
    """A black image with a 3x3 dot per landmark, landmark i drawn with intensity 40 + 12 * i."""
    img = torch.zeros(1, H, W, dtype=torch.uint8)
    for i, (x, y) in enumerate(coords.floor().long().tolist()):
        img[0, y - 1 : y + 2, x - 1 : x + 2] = 40 + 12 * i
    return img


def dot_centre(img: torch.Tensor, near: torch.Tensor, intensity: int) -> torch.Tensor:
    """Intensity-weighted centroid of the dot within 4 px of ``near``; checks it is dot ``intensity``."""
    ys, xs = torch.meshgrid(
        torch.arange(img.shape[-2]) + 0.5, torch.arange(img.shape[-1]) + 0.5, indexing="ij"
    )
    close = ((xs - near[0]) ** 2 + (ys - near[1]) ** 2) <= 16
    weights = img[0].float() * close
    assert weights.max() > 0, f"no dot near {near.tolist()}"
    levels = torch.tensor([40 + 12 * i for i in range(15)], dtype=torch.float32)
    assert levels[(levels - weights.max()).abs().argmin()] == intensity, (
        "a different landmark's dot"
    )
    return torch.stack([(xs * weights).sum() / weights.sum(), (ys * weights).sum() / weights.sum()])


def test_flip_mirrors_and_swaps_pairs_onto_the_same_dots():
    coords = landmarks()
    img, out = apply_geometry(dot_image(coords), coords, AugmentParams(flip=True))
    perm = swap_permutation()
    for i in range(15):
        # New landmark i is the old landmark perm[i] (its mirror partner) seen in the mirror.
        assert out[i, 0].item() == pytest.approx(W - coords[perm[i], 0].item())
        centre = dot_centre(img, out[i], 40 + 12 * perm[i])
        assert torch.allclose(centre, out[i], atol=1e-3)
    for a, b in SYMMETRIC_PAIRS:
        assert out[a, 1] == coords[b, 1] and out[b, 1] == coords[a, 1]


@pytest.mark.parametrize("angle", [-15.0, 9.0, 15.0])
def test_rotation_moves_landmarks_with_the_image(angle):
    coords = landmarks()
    img, out = apply_geometry(dot_image(coords), coords, AugmentParams(angle=angle))
    moved = (out - coords).norm(dim=-1)
    assert moved.max() > 3  # the landmarks did move
    for i in range(15):
        centre = dot_centre(img, out[i], 40 + 12 * i)
        assert (centre - out[i]).norm() < 0.2, (i, centre, out[i])
    # A rotation about the centre preserves distances between landmarks.
    assert torch.allclose(torch.cdist(out, out), torch.cdist(coords, coords), atol=1e-3)


def test_flip_helpers_are_involutions_and_agree():
    coords = landmarks()
    assert torch.equal(flip_coords(flip_coords(coords, W), W), coords)
    norm = coords / torch.tensor([W, H])
    assert torch.allclose(flip_coords(flip_coords(norm)), norm)
    assert torch.allclose(flip_coords(norm) * torch.tensor([W, H]), flip_coords(coords, W))


def test_sample_augment_ranges():
    cfg = AugmentConfig(hflip_p=0.7, rotation_deg=15, brightness=0.4, contrast=0.4)
    gen = torch.Generator().manual_seed(0)
    draws = [sample_augment(cfg, gen) for _ in range(2000)]
    assert 0.66 < np.mean([d.flip for d in draws]) < 0.74
    angles = np.array([d.angle for d in draws])
    assert angles.min() >= -15 and angles.max() <= 15 and angles.min() < -14 and angles.max() > 14
    for key in ("brightness", "contrast"):
        v = np.array([getattr(d, key) for d in draws])
        assert v.min() >= 0.6 and v.max() <= 1.4


def test_dataset_targets_follow_the_dots_through_the_full_pipeline(tmp_path):
    """Augmented samples (pre-scale, flip, rotation, resize): the dot of each landmark sits at its target."""
    coords = landmarks()
    path = write_png(tmp_path / "dots.png", dot_image(coords)[0].numpy())
    rec = LandmarkRecord("dots", "Normal", path, coords.numpy(), W, H)
    size = 96
    ds = LandmarkDataset(
        [rec], size, AugmentConfig(hflip_p=0.5, rotation_deg=15, brightness=0.0, contrast=0.0)
    )
    torch.manual_seed(0)
    for _ in range(4):
        sample = ds[0]
        # Undo the ImageNet normalisation of channel 0 to get intensities back.
        img = (sample["image"][0] * 0.229 + 0.485) * 255
        target = sample["target"].reshape(15, 2) * size
        pixels = target.floor().long().clamp(0, size - 1).tolist()
        bright = [img[y, x].item() for x, y in pixels]
        # Every target lands on a dot (dots are dim after downscaling, background is 0).
        assert min(bright) > 8, bright


def test_flip_and_resize_share_the_pixel_edge_convention(tmp_path):
    """Hand-computed: a 2x2 dot on columns 4-5, rows 2-3 of a 12 x 8 image has its centre at
    (5.0, 3.0). Flipped: columns 6-7, centre x = 12 - 5 = 7.0. Resized to 6 x 6 (x by 1/2, y by
    3/4): centre (3.5, 2.25). Target and the resized image's dot agree to 0.1 px."""
    image = torch.zeros(8, 12, dtype=torch.uint8)
    image[2:4, 4:6] = 200
    path = write_png(tmp_path / "dot.png", image.numpy())
    coords = np.tile([5.0, 3.0], (15, 1))
    rec = LandmarkRecord("dot", "Normal", path, coords, 12, 8)
    flip_only = AugmentConfig(hflip_p=1.0, rotation_deg=0.0, brightness=0.0, contrast=0.0)
    for augment, expected_x in ((None, 2.5), (flip_only, 3.5)):
        sample = LandmarkDataset([rec], 6, augment)[0]
        target = sample["target"].reshape(15, 2)[0] * 6
        assert target.tolist() == pytest.approx([expected_x, 2.25], abs=1e-6)
        img = (sample["image"][0] * 0.229 + 0.485).clamp_min(0)
        img = torch.where(img > 0.01, img, torch.zeros_like(img))  # normalisation round-off
        ys, xs = torch.meshgrid(torch.arange(6) + 0.5, torch.arange(6) + 0.5, indexing="ij")
        centre = torch.stack([(xs * img).sum(), (ys * img).sum()]) / img.sum()
        assert centre.tolist() == pytest.approx([expected_x, 2.25], abs=0.1)
