"""Synthetic chest X-ray-like images with 15 landmarks, written in the real on-disk format.

Each image is drawn from a canonical chest (unit = half the chest width) under a random pose
(rotation, scale, translation) and per-patient jitter of the lung outlines: a soft-tissue body,
two dark lung fields whose outline passes through the lung landmarks, a bright mediastinum whose
centre line carries landmarks 0, 8, 9, 10, 1, a heart shadow, ribs, and noise. The three
categories differ in texture: COVID has patchy peripheral opacities, Viral Pneumonia a diffuse
reticular pattern, Normal clean lungs. Output (like the original dataset):
``coordenadas/coordenadas_maestro.csv`` (headerless: id, 15 x/y pairs in pixels, image name)
and ``dataset/<category>/<image name>.png`` (299 x 299 grayscale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxrlandmarks.anatomy import CATEGORIES, NUM_LANDMARKS

SIZE = 299

# Canonical landmark positions (x right, y down); mediastinal quarter points are interpolated.
_CANONICAL = {
    0: (0.0, -0.92),
    1: (0.0, 0.62),
    2: (-0.42, -0.80),
    4: (-0.20, -0.08),
    6: (-0.46, 0.60),
    11: (-0.80, -0.40),
    13: (-0.86, 0.74),
}
for _left, _right in ((2, 3), (4, 5), (6, 7), (11, 12), (13, 14)):
    _CANONICAL[_right] = (-_CANONICAL[_left][0], _CANONICAL[_left][1])


def _canonical_landmarks(rng: np.random.Generator) -> np.ndarray:
    pts = np.zeros((NUM_LANDMARKS, 2))
    for i, xy in _CANONICAL.items():
        pts[i] = xy
    pts += rng.normal(0, 0.035, size=pts.shape)  # anatomical variability between patients
    pts[0, 0] = pts[1, 0] = rng.normal(0, 0.02)
    for k, t in zip((8, 9, 10), (0.25, 0.5, 0.75), strict=True):
        pts[k] = pts[0] + t * (pts[1] - pts[0])
    return pts


def _lung_outline(p: np.ndarray, side: int) -> list[tuple[float, float]]:
    """Closed outline of one lung (side -1: image left) through its landmarks, canonical units."""
    apex, sup, cp, base, hil = (
        p[i] for i in ((2, 11, 13, 6, 4) if side < 0 else (3, 12, 14, 7, 5))
    )
    shoulder = apex + 0.6 * (sup - apex) + np.array([side * 0.08, -0.08])
    lateral = sup + 0.5 * (cp - sup) + np.array([side * 0.06, 0.0])
    inner_low = np.array([base[0] * 0.35, base[1] - 0.04])
    inner_high = np.array([hil[0] * 0.9, apex[1] + 0.3])
    return [tuple(v) for v in (apex, shoulder, sup, lateral, cp, base, inner_low, hil, inner_high)]


def render_case(rng: np.random.Generator, category: str) -> tuple[np.ndarray, np.ndarray]:
    """One image ``[299, 299]`` uint8 and its landmarks ``[15, 2]`` in pixel coordinates."""
    canon = _canonical_landmarks(rng)
    angle = np.deg2rad(rng.uniform(-8, 8))
    unit = SIZE * 0.36 * rng.uniform(0.85, 1.08)
    centre = np.array([SIZE / 2 + rng.uniform(-12, 12), SIZE / 2 + 8 + rng.uniform(-12, 12)])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def pose(pts: np.ndarray | list) -> np.ndarray:
        return np.asarray(pts, dtype=float) @ rot.T * unit + centre

    def poly(pts: np.ndarray | list) -> list[tuple[float, float]]:
        return [tuple(v) for v in pose(pts)]

    def layer(draw_fn, blur: float) -> np.ndarray:
        img = Image.new("L", (SIZE, SIZE), 0)
        draw_fn(ImageDraw.Draw(img))
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(img, dtype=np.float32) / 255.0

    ellipse = np.array(
        [[np.cos(t) * 1.12, 0.08 + np.sin(t) * 1.2] for t in np.linspace(0, 2 * np.pi, 40)]
    )
    body = layer(lambda d: d.polygon(poly(ellipse), fill=255), 4)
    lungs = layer(
        lambda d: [d.polygon(poly(_lung_outline(canon, s)), fill=255) for s in (-1, 1)], 1.5
    )
    top, bottom = canon[0], canon[1]
    half_width = np.array([[-0.1, 0], [0.1, 0], [0.16, 0], [-0.16, 0]])
    mediastinum_poly = np.stack([top, top, bottom, bottom]) + half_width
    heart_c = np.array([0.1, 0.36]) + rng.normal(0, 0.02, 2)
    heart = np.array(
        [
            heart_c + np.array([0.27 * np.cos(t), 0.21 * np.sin(t)])
            for t in np.linspace(0, 2 * np.pi, 30)
        ]
    )
    mediastinum = layer(
        lambda d: (d.polygon(poly(mediastinum_poly), fill=255), d.polygon(poly(heart), fill=220)),
        1.5,
    )

    def draw_ribs(d: ImageDraw.ImageDraw) -> None:
        xs = np.linspace(-1.0, 1.0, 24)
        for k in range(9):
            y0 = -0.85 + 0.19 * k
            for side in (-1, 1):
                pts = [(side * abs(x), y0 + 0.18 * x**2) for x in xs if x >= 0.08]
                d.line(poly(pts), fill=255, width=max(2, int(unit * 0.035)))

    ribs = layer(draw_ribs, 1.0)

    img = 0.06 + 0.5 * body
    img = img - 0.34 * lungs * body + 0.1 * ribs * body
    img = np.maximum(img, 0.72 * mediastinum)
    # Category textures live inside the lung fields.
    if category == "COVID":
        blobs = layer(
            lambda d: [
                d.ellipse(
                    _blob_box(
                        pose(
                            [[rng.choice((-1, 1)) * rng.uniform(0.45, 0.8), rng.uniform(-0.1, 0.6)]]
                        )[0],
                        rng.uniform(0.08, 0.16) * unit,
                    ),
                    fill=int(rng.uniform(120, 220)),
                )
                for _ in range(rng.integers(3, 7))
            ],
            6,
        )
        img = img + 0.3 * blobs * lungs
    elif category == "Viral Pneumonia":
        mottle = (
            np.asarray(
                Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).filter(
                    ImageFilter.GaussianBlur(1.6)
                ),
                dtype=np.float32,
            )
            / 255.0
        )
        img = img + 0.9 * (mottle - 0.5) * lungs + 0.06 * lungs
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), pose(canon)


def _blob_box(c: np.ndarray, r: float) -> tuple[float, float, float, float]:
    return (c[0] - r, c[1] - r, c[0] + r, c[1] + r)


def write_dataset(root: Path, per_category: int = 200, seed: int = 0) -> Path:
    """Write the synthetic dataset in the original layout under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    rows = []
    for category in CATEGORIES:
        folder = root / "dataset" / category
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            image, landmarks = render_case(rng, category)
            name = f"{category}-{i + 1}"
            Image.fromarray(image, mode="L").save(folder / f"{name}.png")
            rows.append([len(rows), *np.round(landmarks, 0).astype(int).ravel().tolist(), name])
    csv_dir = root / "coordenadas"
    csv_dir.mkdir(parents=True, exist_ok=True)
    with (csv_dir / "coordenadas_maestro.csv").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(",".join(map(str, row)) + "\n")
    return root
