"""A synthetic normal-vs-disease image set in the real ``TrainSet/`` / ``TestSet/`` layout.

Every image is a textured background (multi-scale smooth noise, vessel-like curves, large faint
blobs); a disease image also carries one to three small local lesions (bright or dark spots a
few pixels wide). Large blobs occur in both classes, so the classifier has to look at scale and
locality, not at overall brightness. The test labels go to ``TestSet_labels.csv`` beside the
folders (never inside ``TestSet/``), so a demo can score its test predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from medcore.io import atomic_write_csv

CLASSES = ("normal", "disease")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multi-scale noise in [0, 1], float32 [size, size]."""
    out = np.zeros((size, size), dtype=np.float32)
    for cells, weight in ((3, 1.0), (6, 0.5), (12, 0.2)):
        low = rng.standard_normal((cells, cells)).astype(np.float32)
        img = Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        out += weight * np.asarray(img)
    out = (out - out.mean()) / (out.std() + 1e-6)
    return 0.5 + 0.09 * out


def _vessels(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few thin smooth curves, float32 [size, size] in [0, 1]."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        points = []
        for _ in range(8):
            points.append((float(x0), float(y0)))
            angle += rng.normal(0, 0.35)
            x0 += np.cos(angle) * size / 8
            y0 += np.sin(angle) * size / 8
        draw.line(points, fill=int(rng.integers(90, 200)), width=int(rng.integers(1, 3)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _spots(
    rng: np.random.Generator,
    size: int,
    count: int,
    radius: tuple[float, float],
    margin: int,
    edge: float,
) -> np.ndarray:
    """``count`` round spots (soft edge of width ``edge`` radii) of random sign, float32 [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(margin, size - margin, 2)
        r = rng.uniform(*radius)
        sign = 1.0 if rng.random() < 0.8 else -1.0
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        out += sign * np.clip((1.0 + edge - dist) / edge, 0.0, 1.0)
    return out


def make_image(
    rng: np.random.Generator, size: int, disease: bool, lesion_strength: float = 0.3
) -> np.ndarray:
    """One synthetic RGB image, uint8 [size, size, 3]."""
    gray = _texture(rng, size)
    gray += 0.12 * _vessels(rng, size)
    # Large faint blobs in both classes: the distractor a lesion detector must not fire on.
    gray += 0.08 * _spots(
        rng, size, int(rng.integers(0, 3)), (size / 6, size / 4), margin=0, edge=1.0
    )
    if disease:
        strength = lesion_strength * rng.uniform(0.4, 1.2)  # some lesions are faint
        gray += strength * _spots(
            rng, size, int(rng.integers(1, 4)), (size / 14, size / 9), margin=size // 6, edge=0.5
        )
    gray = gray * rng.uniform(0.85, 1.15) + rng.uniform(-0.06, 0.06)
    gray += rng.normal(0, 0.02, gray.shape).astype(np.float32)
    tint = np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.82, 0.95)], dtype=np.float32)
    rgb = np.clip(gray[..., None] * tint, 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def write_dataset(
    root: str | Path,
    n_normal: int = 300,
    n_disease: int = 180,
    n_test: int = 120,
    size: int = 80,
    seed: int = 0,
    disease_fraction_test: float = 0.37,
    lesion_strength: float = 0.3,
) -> Path:
    """Write ``TrainSet/{normal,disease}/*.png``, ``TestSet/*.png`` and ``TestSet_labels.csv``.

    ``lesion_strength`` scales the lesions' contrast (0.3: the demo's faint lesions).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls, count in (("normal", n_normal), ("disease", n_disease)):
        folder = root / "TrainSet" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(make_image(rng, size, cls == "disease", lesion_strength)).save(
                folder / f"{cls}_{i + 1:04d}.png"
            )
    test = root / "TestSet"
    test.mkdir(parents=True, exist_ok=True)
    labels = (rng.random(n_test) < disease_fraction_test).astype(int)
    for i, label in enumerate(labels):
        image = make_image(rng, size, bool(label), lesion_strength)
        Image.fromarray(image).save(test / f"{i + 1}.png")
    atomic_write_csv(
        root / "TestSet_labels.csv",
        pd.DataFrame({"image_id": [str(i + 1) for i in range(n_test)], "label": labels}),
    )
    return root


DEMO_SIZES = {
    # 63% normal, as in the research data.
    "standard": {"n_normal": 378, "n_disease": 222, "n_test": 150},
    "small": {"n_normal": 40, "n_disease": 24, "n_test": 16},
}


def generate_demo(root: Path, demo: str = "standard") -> None:
    """The built-in demo set of the given size (see ``DEMO_SIZES``)."""
    write_dataset(root, **DEMO_SIZES[demo])
