"""Coordinates CSV + category folders -> validated records -> augmented tensors.

CSV layouts (one row per image, coordinates in pixels of the original image):

- headerless original: ``id, x1, y1, ..., x15, y15, image_name`` (32 columns);
- headed: ``image_name, [category,] L1_x, L1_y, ..., L15_x, L15_y`` (other columns ignored).

Images are found in one of these layouts under the data directory, detected (and named in one
line) by :mod:`cxrlandmarks.layouts` unless ``data.image_pattern`` names one:

- original: ``<images_dir>/<category>/<image_name>.png|.jpg`` (or directly in ``images_dir``);
- the Kaggle COVID-19 Radiography release: ``COVID-19_Radiography_Dataset/<category>/images/``
  (``masks/`` beside it and the ``*.metadata.xlsx`` files are not read), in ``images_dir`` or
  the data directory, or ``images_dir`` itself;
- ``data.image_pattern``, e.g. ``{category}/images/{name}.png`` under ``images_dir``.

The category is the CSV column when present, else the name's prefix (``COVID-12``), else the
folder the image is found in. Category folders and image names match tolerantly: case, spaces,
underscores and hyphens do not matter (``Viral_Pneumonia`` finds ``Viral Pneumonia/``). Targets
are normalised: ``x / W, y / H`` of the original image, in the pixel-edge convention of
:mod:`cxrlandmarks.anatomy`.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from cxrlandmarks.anatomy import NUM_LANDMARKS
from cxrlandmarks.augment import apply_geometry, sample_augment
from cxrlandmarks.config import AugmentConfig, DataConfig
from cxrlandmarks.layouts import ImageIndex, find_layout
from medcore.data.image_store import ImageStore, StoreSpec, cached_store
from medcore.errors import DataError, UserError
from medcore.io import load_image, read_csv

PACKAGE = "cxrlandmarks"
DEMO_VERSION = "v1"
# More annotated rows without an image than this share is an error unless data.allow_missing.
MAX_MISSING_SHARE = 0.02

HEADED_COLUMNS = [f"L{i}_{a}" for i in range(1, NUM_LANDMARKS + 1) for a in ("x", "y")]


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The user's data directory, or the cached synthetic demo (generated on first use)."""
    from cxrlandmarks.synthetic import write_dataset
    from medcore.data.demo_cache import ensure_demo_data

    if cfg.data_dir is not None:
        path = Path(cfg.data_dir)
        if not path.is_dir():
            raise UserError(path, "data directory not found")
        return path
    n = cfg.demo_images_per_category
    return ensure_demo_data(
        PACKAGE, lambda root: write_dataset(root, n, seed=0), version=f"{DEMO_VERSION}-{n}"
    )


@dataclass
class LandmarkRecord:
    name: str
    category: str
    path: Path
    coords: np.ndarray  # [15, 2] pixels of the original image
    width: int
    height: int

    @property
    def normalised(self) -> np.ndarray:
        return self.coords / np.array([self.width, self.height], dtype=np.float64)


def _is_number(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def read_annotations(csv_path: str | Path) -> pd.DataFrame:
    """The CSV as a frame with ``image_name``, ``category`` (maybe None) and the 30 coordinates."""
    raw = read_csv(csv_path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True)
    first = raw.iloc[0].tolist()
    numeric_cells = sum(_is_number(v) for v in first)
    if numeric_cells >= NUM_LANDMARKS:  # no header: the original layout (a header has no numbers)
        if raw.shape[1] != 2 * NUM_LANDMARKS + 2:
            raise DataError(
                csv_path,
                f"expected {2 * NUM_LANDMARKS + 2} columns (id, 15 x/y pairs, image name), "
                f"found {raw.shape[1]}",
            )
        frame = pd.DataFrame({"image_name": raw.iloc[:, -1].str.strip(), "category": None})
        coords = raw.iloc[:, 1 : 2 * NUM_LANDMARKS + 1].to_numpy()
    else:
        headed = read_csv(csv_path, dtype=str, keep_default_na=False)
        headed.columns = [str(c).strip() for c in headed.columns]
        missing = [c for c in ["image_name", *HEADED_COLUMNS] if c not in headed.columns]
        if missing:
            raise DataError(
                csv_path,
                f"missing column(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                "expected image_name, [category,] L1_x, L1_y, ..., L15_y, or the headerless "
                "original layout (id, 30 coordinates, image name)",
            )
        frame = pd.DataFrame(
            {
                "image_name": headed["image_name"].str.strip(),
                "category": headed["category"].str.strip() if "category" in headed else None,
            }
        )
        coords = headed[HEADED_COLUMNS].to_numpy()
    values = pd.DataFrame(coords).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    frame[HEADED_COLUMNS] = values
    return frame


def load_records(cfg: DataConfig, data_dir: str | Path) -> list[LandmarkRecord]:
    """Validated records of the CSV; bad rows are named on stderr and skipped.

    Rows whose image file is missing are counted per category: more than 2% of the rows is an
    error (a misspelt or absent category folder) unless ``cfg.allow_missing``. The image
    layout is :func:`find_layout`'s, named in one line on stdout.
    """
    data_dir = Path(data_dir)
    csv_path = data_dir / cfg.csv
    layout = find_layout(cfg, data_dir)
    print(f"images: {layout.describe()}")
    frame = read_annotations(csv_path)
    index = ImageIndex(layout, cfg.categories)
    records: list[LandmarkRecord] = []
    skipped = 0
    missing: Counter[str] = Counter()
    seen: set[str] = set()

    def skip(name: str, why: str) -> None:
        nonlocal skipped
        skipped += 1
        print(f"skipped {name}: {why}", file=sys.stderr)

    for row in frame.itertuples(index=False):
        name = str(row.image_name)
        values = np.array([getattr(row, c) for c in HEADED_COLUMNS], dtype=float)
        if not name:
            skip(f"row {len(records) + skipped + 1}", "empty image name (or too few fields)")
            continue
        if name in seen:
            skip(name, "duplicated image name (first row kept)")
            continue
        if not np.isfinite(values).all():
            skip(name, "missing or non-numeric coordinates")
            continue
        category = index.category_of(name, row.category)
        try:
            found = index.find(name, category)
        except DataError as exc:
            skip(name, exc.why)
            continue
        if found is None:
            missing[category or "unknown"] += 1
            skip(name, index.not_found(name, category))
            continue
        path, category = found
        try:
            # Decoded in full now (not just the header): a truncated, corrupt or
            # decompression-bomb image is named and skipped here, not met mid-training.
            height, width = load_image(path, "L").shape
        except DataError as exc:
            skip(name, f"unreadable image {path.name}: {exc.why}")
            continue
        coords = values.reshape(NUM_LANDMARKS, 2)
        outside = (
            (coords < 0).any() or (coords[:, 0] >= width).any() or (coords[:, 1] >= height).any()
        )
        if outside:
            skip(name, f"coordinates outside the {width}x{height} image")
            continue
        seen.add(name)
        records.append(LandmarkRecord(name, category, path, coords, width, height))
    if skipped:
        print(f"skipped {skipped} of {len(frame)} rows of {csv_path}", file=sys.stderr)
    if missing:
        n = sum(missing.values())
        counts = ", ".join(f"{c} {k}" for c, k in sorted(missing.items()))
        what = f"{n} of {len(frame)} annotated rows ({100 * n / len(frame):.1f}%) have no image file ({counts})"
        if n > MAX_MISSING_SHARE * len(frame) and not cfg.allow_missing:
            found = ", ".join(
                f"{c} {k}" for c, k in sorted(Counter(r.category for r in records).items())
            )
            others = index.unmatched_folders()
            raise DataError(
                csv_path,
                f"{what}; images found: {found or 'none'} in the {layout.describe()}"
                f"{'; folders there that spell no category: ' + ', '.join(others) if others else ''}"
                ". Check the category folders, data.images_dir and data.image_pattern, or pass "
                "--allow-missing to train without them",
            )
        print(f"warning: {what}; training without them", file=sys.stderr)
    if not records:
        raise DataError(csv_path, "no usable rows (every row was skipped; see the lines above)")
    return records


def _prescale(
    image: torch.Tensor, kp: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink isotropically so the longer side is ``size`` (never enlarges).

    An isotropic resize commutes with flips and with rotation about the centre, so doing it
    first makes augmentation cheap without changing its result; the final (possibly
    anisotropic) resize to ``size x size`` comes after the geometry.
    """
    height, width = image.shape[-2:]
    if max(height, width) <= size:
        return image, kp
    ratio = size / max(height, width)
    new = [max(1, round(height * ratio)), max(1, round(width * ratio))]
    return F.resize(image, new, antialias=True), kp * torch.tensor(
        [new[1] / width, new[0] / height]
    )


def resize_and_normalise(
    image: torch.Tensor, coords: torch.Tensor, size: int, norm: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``[c, H, W]`` uint8 to ``size`` square, to 3 channels, normalise with the trunk's
    ``norm["mean"]``/``norm["std"]`` (:func:`cxrlandmarks.model.input_normalisation`);
    ``coords`` (pixels of this image) -> [0, 1].

    The resize is antialiased bilinear whatever ``norm["interpolation"]`` says: downscaling
    radiographs, it keeps landmark positions exact (a bicubic kernel overshoots at edges).
    """
    height, width = image.shape[-2:]
    image = F.resize(image, [size, size], antialias=True)
    image = F.to_dtype(image, torch.float32, scale=True).expand(3, -1, -1)
    image = F.normalize(image, norm["mean"], norm["std"])
    return image, coords.float() / torch.tensor([width, height], dtype=torch.float32)


def image_tensor(path: Path) -> torch.Tensor:
    """An image file as ``[1, H, W]`` uint8 grayscale (RGB, RGBA, 16-bit, palette converted)."""
    return torch.from_numpy(load_image(path, "L"))[None]


def store_spec(size: int) -> StoreSpec:
    """How training and evaluation hold every image: grayscale, stretched to ``size`` square
    (Pillow's bilinear filter, antialiased when shrinking)."""
    return StoreSpec((size, size), "L", "stretch")


def model_input(gray: np.ndarray, size: int, norm: dict[str, Any]) -> torch.Tensor:
    """A grayscale image ``[H, W]`` uint8 -> the model's input ``[3, S, S]``, exactly as
    training and evaluation read it: the image store's resize (:func:`store_spec`), then
    :func:`resize_and_normalise` (whose resize is then the identity)."""
    from PIL import Image

    # medcore's image store resizes inside its builder only; this is its stretch, one image.
    filter_ = Image.Resampling[store_spec(size).resample.upper()]
    small = np.asarray(Image.fromarray(gray).resize((size, size), filter_))
    image, _ = resize_and_normalise(
        torch.from_numpy(small.copy())[None], torch.zeros(1, 2), size, norm
    )
    return image


def image_store(records: list[LandmarkRecord], size: int) -> ImageStore:
    """The records' images decoded once, grayscale, stretched to the model input ``size``
    (normalised landmarks stay as they are), shared by every phase, validation and test."""
    store = cached_store([r.path for r in records], store_spec(size))
    bad = [r.name for r, ok in zip(records, store.valid, strict=True) if not ok]
    if bad:  # they decoded when indexed: changed since
        raise DataError(records[0].path.parent, f"{len(bad)} image(s) no longer decode: {bad[:5]}")
    return store


class LandmarkDataset(Dataset):
    """Records -> ``{"image": [3, S, S], "target": [30], "index": i}``; augmented when ``augment``.

    ``norm`` is the trunk's input normalisation (default: that of torchvision's ImageNet
    weights, from timm's pretrained configuration).

    Radiographs are read as grayscale and repeated to the 3 channels the ResNet expects. With
    ``cache`` each decoded image is kept, shrunk to ``image_size``, in the process that reads it
    (the main process when the loader has no workers): small datasets and CPU runs skip image
    decoding after the first epoch. With ``store`` (:func:`image_store`, ``rows``: each
    record's row in it) the images are read from the store instead of decoded.
    """

    def __init__(
        self,
        records: list[LandmarkRecord],
        image_size: int,
        augment: AugmentConfig | None = None,
        cache: bool = False,
        norm: dict[str, Any] | None = None,
        store: ImageStore | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        from cxrlandmarks.model import input_normalisation

        self.norm = norm if norm is not None else input_normalisation()
        self.records = records
        self.image_size = image_size
        self.augment = augment if augment is not None and augment.enabled else None
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.store = store
        self.rows = list(range(len(records)) if rows is None else rows)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image (shrunk to ``image_size`` if larger) and the landmarks in its pixels."""
        rec = self.records[index]
        coords = torch.as_tensor(rec.coords, dtype=torch.float32)
        if self.store is not None:  # [S, S, 1] uint8, landmarks scaled like the image
            row = self.rows[index]
            scale_y, scale_x = self.store.scales[row]
            image = torch.from_numpy(np.array(self.store[row])).permute(2, 0, 1)
            return image, coords * torch.tensor([scale_x, scale_y], dtype=torch.float32)
        image = self._cache.get(index) if self._cache is not None else None
        if image is None:
            image = image_tensor(rec.path)
            if image.shape[-2:] != (rec.height, rec.width):
                raise DataError(
                    rec.path, f"image size changed since indexing ({tuple(image.shape[-2:])})"
                )
            image, _ = _prescale(image, coords, self.image_size)
            if self._cache is not None:
                self._cache[index] = image
        height, width = image.shape[-2:]
        return image, coords * torch.tensor([width / rec.width, height / rec.height])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if torch.utils.data.get_worker_info() is not None and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # loader workers share the cores with the training process
        image, coords = self._load(index)
        if self.augment is not None:
            params = sample_augment(self.augment)
            image, coords = apply_geometry(image, coords, params)
            height, width = image.shape[-2:]
            image = F.resize(image, [self.image_size, self.image_size], antialias=True)
            coords = coords * torch.tensor([self.image_size / width, self.image_size / height])
            image = F.adjust_contrast(
                F.adjust_brightness(image, params.brightness), params.contrast
            )
        image, target = resize_and_normalise(image, coords, self.image_size, self.norm)
        return {"image": image, "target": target.reshape(-1), "index": index}


@dataclass
class RunData:
    """What every phase of a run shares: the records, the split, the decoded images."""

    records: list[LandmarkRecord]
    splits: dict[str, np.ndarray]
    store: ImageStore

    def dataset(
        self, split: str, size: int, norm: dict[str, Any], augment: AugmentConfig | None = None
    ) -> LandmarkDataset:
        """The split's records at ``size``, read from the store."""
        rows = self.splits[split]
        return LandmarkDataset(
            [self.records[i] for i in rows], size, augment, norm=norm, store=self.store, rows=rows
        )


def split_records(
    records: list[LandmarkRecord], ratios: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """70/15/15 (by default) split stratified by category."""
    from medcore.data.splits import stratified_split

    try:
        return stratified_split([r.category for r in records], ratios, seed)
    except ValueError as exc:  # too few images for the ratios
        raise DataError("data.split_ratios", f"{exc} (usable images)") from None
