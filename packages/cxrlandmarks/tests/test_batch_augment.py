"""The batched (kornia) augmentation: landmarks land on the dots drawn on the image at 1 px."""

import math

import numpy as np
import pytest
import torch

from cxrlandmarks.anatomy import swap_permutation
from cxrlandmarks.augment import augment_batch, draw_params
from cxrlandmarks.config import AugmentConfig

S = 96


def dots(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image with a 3x3 dot per landmark (intensity 40 + 12 i) and the dots' centres."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.linspace(24, S - 24, 5), np.linspace(26, S - 26, 3))
    pts = np.floor(np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-2, 2, (15, 2))) + 0.5
    img = torch.zeros(1, S, S)
    for i, (x, y) in enumerate(np.floor(pts).astype(int)):
        img[0, y - 1 : y + 2, x - 1 : x + 2] = (40 + 12 * i) / 255
    return img, torch.tensor(pts, dtype=torch.float32) / S


def centre_of(img: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    w = img[0] * (((xs - near[0]) ** 2 + (ys - near[1]) ** 2) <= 9)
    return torch.stack([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def test_batched_landmarks_land_on_the_dots():
    cfg = AugmentConfig(hflip_p=0.5, rotation_deg=15.0, brightness=0.0, contrast=0.0)
    pairs = [dots(seed) for seed in range(8)]
    images = torch.stack([p[0] for p in pairs])
    coords = torch.stack([p[1] for p in pairs])
    gen = torch.Generator().manual_seed(0)
    flip, angle, _, _ = draw_params(cfg, 8, torch.Generator().manual_seed(0))
    assert flip.any() and (~flip).any() and angle.abs().max() > 5  # both cases, real turns
    out, moved = augment_batch(images, coords, cfg, gen)
    perm = swap_permutation()
    for b in range(8):
        for i in range(15):
            src = perm[i] if flip[b] else i  # after a flip, landmark i is its partner's dot
            target = moved[b, i] * S
            centre = centre_of(out[b], target)
            assert (centre - target).norm() < 1.0, (b, i, centre, target)
            # and it is that landmark's dot (its intensity), not a neighbour's
            ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
            near = ((xs - target[0]) ** 2 + (ys - target[1]) ** 2) <= 4
            peak = (out[b, 0] * near).max() * 255
            assert abs(peak - (40 + 12 * src)) < 6, (b, i, peak)
        # distances between landmarks are kept (a rigid motion, pairs swapped back)
        back = moved[b][perm] if flip[b] else moved[b]
        assert torch.allclose(torch.cdist(coords[b], coords[b]), torch.cdist(back, back), atol=1e-5)


def test_hand_computed_flip_and_rotation():
    """x -> S - x, then a 90 degree counter-clockwise turn about (S/2, S/2): (x, y) -> (y, S - x)."""
    cfg = AugmentConfig(hflip_p=1.0, rotation_deg=0.0, brightness=0.0, contrast=0.0)
    coords = torch.tensor([[[10.0, 20.0]] * 15]) / S
    _, out = augment_batch(torch.zeros(1, 1, S, S), coords, cfg)
    assert out[0, 0].tolist() == pytest.approx([(S - 10) / S, 20 / S], abs=1e-6)
    from cxrlandmarks.augment import geometry_matrices

    m = geometry_matrices(torch.tensor([False]), torch.tensor([90.0]), S)[0]
    p = m @ torch.tensor([10.0, 20.0, 1.0])
    assert p[:2].tolist() == pytest.approx([20.0, S - 10.0], abs=1e-4)


def test_photometric_ranges():
    cfg = AugmentConfig(hflip_p=0.0, rotation_deg=0.0, brightness=0.4, contrast=0.4)
    _, _, bright, contrast = draw_params(cfg, 4000, torch.Generator().manual_seed(1))
    for v in (bright, contrast):
        assert v.min() >= 0.6 and v.max() <= 1.4 and v.min() < 0.62 and v.max() > 1.38
    img = torch.full((2, 1, S, S), 0.5)
    out, _ = augment_batch(img, torch.rand(2, 15, 2), cfg, torch.Generator().manual_seed(2))
    assert out.min() >= 0 and out.max() <= 1
    assert not math.isclose(out[0].mean().item(), 0.5, abs_tol=1e-3)  # brightness applied


def test_training_with_batched_augmentation(tmp_path, monkeypatch):
    """`augment.batched: true` trains through the batched path (the loader then leaves the
    images unaugmented); the run's phase checkpoint records the setting."""
    from cxrlandmarks.cli import train
    from medcore.config import from_dict
    from medcore.weights.checkpoint import load_checkpoint

    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--smoke", "--device", "cpu", "--config", "default", "--phase", "1"]
    argv += ["--set", "data.image_size=32", "--set", "augment.batched=true"]
    assert train([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "phase1_best.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    cfg = from_dict(AugmentConfig, __import__("yaml").safe_load(
        (tmp_path / "run" / "config.yaml").read_text())["augment"])  # fmt: skip
    assert cfg.batched


@pytest.mark.parametrize("batched", [False, True])
def test_step_fn_returns_the_loss_and_its_terms_as_tensors(batched):
    """The step's extras are the loss's unweighted terms, detached tensors (read by the trainer
    at logging steps only); the batched path's un-normalise / re-normalise round trip around an
    identity augmentation leaves the loss as the plain forward's."""
    from cxrlandmarks.config import CxrConfig
    from cxrlandmarks.losses import build_loss
    from cxrlandmarks.model import build_model
    from cxrlandmarks.train import make_step_fn

    torch.manual_seed(0)
    cfg = CxrConfig()
    cfg.augment = AugmentConfig(
        enabled=batched, batched=True, hflip_p=0.0, rotation_deg=0.0, brightness=0.0, contrast=0.0
    )
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    net = build_model(cfg).eval()
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    images = (torch.rand(2, 3, 32, 32) - mean) / std
    target = torch.rand(2, 30) * 0.5 + 0.25
    criterion = build_loss("complete")
    loss, terms = make_step_fn(cfg, criterion, norm)(net, {"image": images, "target": target})
    ref, ref_terms = criterion(net(images), target)
    assert loss.requires_grad and loss.shape == ()
    assert set(terms) == {"wing", "symmetry", "distance"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in terms.values())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    for name, value in terms.items():
        assert value.item() == pytest.approx(ref_terms[name].item(), rel=1e-3, abs=1e-3)
