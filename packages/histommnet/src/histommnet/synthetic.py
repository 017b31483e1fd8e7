"""A synthetic BreakHis tree of PNG tiles, in the real layout and naming, for the demo and tests.

Tiles look like H&E: pink stroma with purple nuclei. Benign tissue has sparse, small, round,
uniform nuclei; malignant tissue dense, larger, elongated, pleomorphic and darker ones. Each
subtype arranges its nuclei its own way (glands, tubules, rows, sheets, mucin pools). The same
patient parameters drive all four magnifications: a higher magnification shows fewer, larger
nuclei of the same tissue (size x f, density / f^2 for zoom f = 1, 1.6, 2.5, 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histommnet.breakhis import SUBTYPES

ZOOM = {"40X": 1.0, "100X": 1.6, "200X": 2.5, "400X": 4.0}
_ARRANGEMENT = {
    "A": "clusters",
    "F": "random",
    "PT": "random",
    "TA": "rings",
    "DC": "random",
    "LC": "rows",
    "MC": "clusters",
    "PC": "rows",
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return (
        np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
        / 255.0
    )


def _centres(
    rng: np.random.Generator, n: int, size: int, arrangement: str, zoom: float
) -> np.ndarray:
    """``n`` nucleus centres ``[n, 2]`` (y, x) laid out by ``arrangement``."""
    if arrangement == "random" or n < 4:
        return rng.random((n, 2)) * size
    if arrangement == "clusters":
        k = max(1, n // 6)
        seeds = rng.random((k, 2)) * size
        return seeds[rng.integers(0, k, n)] + rng.normal(0, 3.0 * zoom, (n, 2))
    if arrangement == "rings":
        k = max(1, n // 8)
        seeds = rng.random((k, 2)) * size
        angle = rng.random(n) * 2 * np.pi
        radius = 5.0 * zoom * (1 + 0.1 * rng.normal(size=n))
        ring = np.stack([np.sin(angle), np.cos(angle)], 1) * radius[:, None]
        return seeds[rng.integers(0, k, n)] + ring
    # rows: single-file lines of nuclei
    k = max(1, n // 7)
    start = rng.random((k, 2)) * size
    direction = rng.normal(size=(k, 2))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-9
    line = rng.integers(0, k, n)
    step = rng.random(n) * size
    return (start[line] + direction[line] * step[:, None]) % size


def render_tile(
    params: dict, magnification: str, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 tile of a patient at ``magnification``."""
    zoom = ZOOM[magnification]
    stroma = _smooth_noise(rng, size, max(2, int(6 / zoom)))
    base = np.array(params["stroma_rgb"], dtype=np.float32)
    img = base[None, None] * (0.88 + 0.2 * stroma[..., None])
    if params["mucin"]:
        pool = _smooth_noise(rng, size, 3) > 0.6
        img[pool] = img[pool] * 0.5 + np.array([215, 215, 235]) * 0.5

    area = size * size
    n = max(2, rng.poisson(params["density"] * area / zoom**2))
    centres = _centres(rng, n, size, params["arrangement"], zoom)
    radius = params["radius"] * zoom * np.exp(rng.normal(0, params["pleomorphism"], n))
    aspect = 1.0 + np.abs(rng.normal(0, params["elongation"], n))
    theta = rng.random(n) * np.pi
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy = yy[None] - centres[:, 0, None, None]
    dx = xx[None] - centres[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * cos + dy * sin) / (radius[:, None, None] * aspect[:, None, None])
    v = (-dx * sin + dy * cos) / radius[:, None, None]
    # Soft-edged ellipses; the darkest nucleus wins where they overlap.
    mask = np.clip(1.5 - (u**2 + v**2) * 1.5, 0, 1).max(0)
    nucleus = np.array(params["nucleus_rgb"], dtype=np.float32)
    img = img * (1 - mask[..., None]) + nucleus[None, None] * mask[..., None]
    img += rng.normal(0, 6.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def patient_params(code: str, label: int, rng: np.random.Generator) -> dict:
    """Tissue parameters of one patient: class and subtype set the means, the patient jitters them."""
    malignant = bool(label)
    tint = rng.normal(0, 8, 3)
    return {
        "density": (0.020 if malignant else 0.009) * np.exp(rng.normal(0, 0.15)),
        "radius": (2.0 if malignant else 1.4) * np.exp(rng.normal(0, 0.08)),
        "pleomorphism": 0.28 if malignant else 0.08,
        "elongation": 0.6 if malignant else 0.12,
        "nucleus_rgb": np.clip(
            np.array([70, 35, 120] if malignant else [120, 80, 170]) + tint, 0, 255
        ),
        "stroma_rgb": np.clip(
            np.array([236, 172, 205]) + tint + (8 if code in ("F", "PT") else 0), 0, 255
        ),
        "arrangement": _ARRANGEMENT[code],
        "mucin": code == "MC",
    }


def generate_breakhis(
    root: str | Path,
    patients_per_subtype: int = 4,
    images_per_magnification: tuple[int, int] = (4, 9),
    size: int = 64,
    magnifications: tuple[str, ...] = ("40X", "100X", "200X", "400X"),
    seed: int = 0,
) -> Path:
    """Write ``root/BreaKHis_v1/histology_slides/breast/...``; returns the ``breast`` directory.

    Each patient gets a random number of tiles per magnification in ``images_per_magnification``
    (inclusive). The first two patients of adenosis share a numeric slide id with
    different letter suffixes, as some real BreakHis folders do (one patient for splitting).
    """
    rng = np.random.default_rng(seed)
    breast = Path(root) / "BreaKHis_v1" / "histology_slides" / "breast"
    slide = 1000
    for code, folder, label in SUBTYPES:
        cls_letter, cls_dir = ("M", "malignant") if label else ("B", "benign")
        for k in range(patients_per_subtype):
            slide += 1
            slide_id = f"{slide}"
            if code == "A" and k in (0, 1):
                slide_id = f"{slide - k}{'AB' if k == 0 else 'CD'}"
            patient_dir = (
                breast / cls_dir / "SOB" / folder / f"SOB_{cls_letter}_{code}_14-{slide_id}"
            )
            params = patient_params(code, label, rng)
            for mag in magnifications:
                out_dir = patient_dir / mag
                out_dir.mkdir(parents=True, exist_ok=True)
                low, high = images_per_magnification
                for seq in range(1, int(rng.integers(low, high + 1)) + 1):
                    tile = render_tile(params, mag, size, rng)
                    name = f"SOB_{cls_letter}_{code}-14-{slide_id}-{mag[:-1]}-{seq:03d}.png"
                    Image.fromarray(tile).save(out_dir / name)
    return breast
