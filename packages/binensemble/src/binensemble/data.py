"""The on-disk format (``TrainSet/{normal,disease}/``, ``TestSet/``), datasets, transforms, samplers.

Labels are the position of the class folder in ``data.classes`` (0 = normal, 1 = disease).
Image ids are file names without extension; in ``TrainSet`` they are prefixed with the class
folder (``disease/img_0007``) so that equal names in both folders stay distinct.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from binensemble.config import BinEnsembleConfig, DataConfig
from binensemble.synthetic import generate_demo
from medcore import metric_learning
from medcore.demo import ensure_demo_data
from medcore.device import device_defaults
from medcore.errors import DataError
from medcore.io import load_image, read_csv

DEMO_VERSION = "v2"


@dataclass
class ImageSet:
    """Image files with their ids and, for a labelled set, their labels."""

    paths: list[Path]
    ids: list[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        index = [int(i) for i in index]
        labels = None if self.labels is None else self.labels[index]
        return ImageSet([self.paths[i] for i in index], [self.ids[i] for i in index], labels)


def data_root(cfg: DataConfig) -> Path:
    """The data directory of the config, or the built-in demo set (generated once, cached)."""
    if cfg.data_dir is None:
        generate = functools.partial(generate_demo, demo=cfg.demo)
        version = DEMO_VERSION if cfg.demo == "standard" else f"{cfg.demo}-{DEMO_VERSION}"
        return ensure_demo_data("binensemble", generate, version=version)
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(root, "data directory not found")
    return root


def _natural_key(name: str) -> tuple:
    """Sort "2" before "10": numbers inside names compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _readable(paths: list[Path], desc: str) -> tuple[list[Path], int]:
    """The paths that decode; every other one is named on stderr and left out."""
    good: list[Path] = []
    skipped = 0
    for path in tqdm(paths, desc=desc, leave=False, dynamic_ncols=True):
        try:
            load_image(path)
        except DataError as exc:
            tqdm.write(f"skipped {exc.what}: {exc.why}", file=sys.stderr)  # not on the bar's line
            skipped += 1
            continue
        good.append(path)
    return good, skipped


def scan_labelled(root: Path, cfg: DataConfig) -> ImageSet:
    """All readable images of ``root/TrainSet/<class>/`` with labels; bad files are skipped."""
    train = root / cfg.train_dir
    if not train.is_dir():
        raise DataError(
            train,
            f"not found (expected {cfg.train_dir}/{{{','.join(cfg.classes)}}}/ under the data directory)",
        )
    paths: list[Path] = []
    labels: list[int] = []
    ids: list[str] = []
    skipped = 0
    for label, cls in enumerate(cfg.classes):
        folder = train / cls
        if not folder.is_dir():
            raise DataError(
                folder,
                f"class folder not found (expected one folder per class: {', '.join(cfg.classes)})",
            )
        files = _image_files(folder, cfg.extensions)
        if not files:
            raise DataError(folder, f"class folder has no images ({', '.join(cfg.extensions)})")
        files, bad = _readable(files, f"checking {cls}")
        skipped += bad
        if not files:
            raise DataError(folder, "no readable image in this class folder")
        paths += files
        labels += [label] * len(files)
        ids += [f"{cls}/{p.stem}" for p in files]
    _check_unique(ids, train)
    if skipped:
        print(f"{cfg.train_dir}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    return ImageSet(paths, ids, np.asarray(labels, dtype=np.int64))


def scan_unlabelled(root: Path, cfg: DataConfig) -> ImageSet:
    """All readable images of ``root/TestSet/``, ids from file names."""
    folder = root / cfg.test_dir
    if not folder.is_dir():
        raise DataError(folder, "test folder not found")
    files = _image_files(folder, cfg.extensions)
    if not files:
        raise DataError(folder, f"no images ({', '.join(cfg.extensions)})")
    files, skipped = _readable(files, "checking test images")
    if skipped:
        print(f"{cfg.test_dir}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    if not files:
        raise DataError(folder, "no readable image")
    ids = [p.stem for p in files]
    _check_unique(ids, folder)
    return ImageSet(files, ids)


def _check_unique(ids: list[str], where: Path) -> None:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise DataError(
                where, f"two images share the id {image_id!r} (same name, different extension)"
            )
        seen.add(image_id)


def read_labels(path: Path, num_classes: int = 2) -> dict[str, int]:
    """``image_id,label`` CSV as a mapping (ids as strings)."""
    frame = read_csv(
        path, required=["image_id", "label"], unique="image_id", dtype={"image_id": str}
    )
    labels = frame["label"]
    if not np.isin(labels, list(range(num_classes))).all():
        raise DataError(path, f"labels must be class ids 0..{num_classes - 1}")
    return dict(zip(frame["image_id"].astype(str), labels.astype(int), strict=True))


def train_transform(cfg: DataConfig) -> v2.Compose:
    """Resize, random crop, flips, rotation, colour jitter; [0, 1] pixels (each of the model's
    branches normalises them its own way)."""
    resize = round(cfg.img_size * cfg.resize_scale)
    brightness, contrast, saturation, hue = cfg.color_jitter
    return v2.Compose(
        [
            v2.Resize((resize, resize), antialias=True),
            v2.RandomCrop(cfg.img_size),
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.RandomVerticalFlip(cfg.vflip),
            v2.RandomRotation(cfg.rotation),
            v2.ColorJitter(brightness, contrast, saturation, hue),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Resize and centre crop at the training scale; [0, 1] pixels."""
    resize = round(cfg.img_size * cfg.resize_scale)
    return v2.Compose(
        [
            v2.Resize((resize, resize), antialias=True),
            v2.CenterCrop(cfg.img_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageDataset(Dataset):
    """``{"image": [3, h, w] float, "label": int (-1 if unlabelled), "index": int}`` per item."""

    def __init__(self, images: ImageSet, transform: v2.Compose) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        array = load_image(self.images.paths[i])
        image = torch.from_numpy(array).permute(2, 0, 1)
        label = -1 if self.images.labels is None else int(self.images.labels[i])
        return {"image": self.transform(image), "label": label, "index": i}


class BalancedBatchSampler(metric_learning.BalancedBatchSampler):
    """Batches holding ``batch_size // num_classes`` samples of every class (medcore's sampler:
    per-class reshuffled streams, one global sequence per ``(seed, epoch)`` strided by rank).

    Batch-hard triplet mining needs a positive and a negative for every anchor; plain random
    batches of an imbalanced set often lack one.
    """

    def __init__(
        self, labels: np.ndarray, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        n_classes = len(np.unique(labels))
        if n_classes >= 2 and batch_size // n_classes < 2:
            raise DataError(
                "trainer.batch_size",
                f"must be at least {2 * n_classes} for triplet mining (2 per class)",
            )
        super().__init__(
            labels, n_samples=batch_size // max(n_classes, 1), seed=seed, rank=rank,
            world_size=world_size,
        )  # fmt: skip


def loader_workers(cfg: BinEnsembleConfig, device: torch.device) -> int:
    """DataLoader workers: the config's, else medcore's default for the device."""
    if cfg.trainer.num_workers is None:
        return device_defaults(device).num_workers
    return cfg.trainer.num_workers
