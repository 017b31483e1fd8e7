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

import kornia.augmentation as K
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from binensemble.config import DataConfig
from binensemble.synthetic import generate_demo
from medcore.data import samplers
from medcore.data.demo_cache import ensure_demo_data
from medcore.data.image_store import ImageStore, StoreSpec, cached_store
from medcore.errors import DataError
from medcore.io import load_image, read_csv

DEMO_VERSION = "v2"


@dataclass
class ImageSet:
    """Image files with their ids, for a labelled set their labels, and the decoded store that
    holds them (image ``i`` is ``store[rows[i]]``; one store for every model, fold and split)."""

    paths: list[Path]
    ids: list[str]
    labels: np.ndarray | None = None
    store: ImageStore | None = None
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        index = [int(i) for i in index]
        labels = None if self.labels is None else self.labels[index]
        rows = None if self.rows is None else self.rows[index]
        paths, ids = [self.paths[i] for i in index], [self.ids[i] for i in index]
        return ImageSet(paths, ids, labels, self.store, rows)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as ``[h, w, 3]`` uint8 at the store's size."""
        if self.store is None or self.rows is None:
            raise DataError(self.paths[i], "images are read from the decoded store (see decode)")
        return self.store[int(self.rows[i])]


def store_spec(cfg: DataConfig) -> StoreSpec:
    """The working size: ``img_size * resize_scale`` square, what the crops are cut from."""
    resize = round(cfg.img_size * cfg.resize_scale)
    return StoreSpec((resize, resize), "RGB", "stretch")


def decode(
    paths: list[Path], cfg: DataConfig, directory: Path | None = None
) -> tuple[ImageStore, np.ndarray]:
    """The store of ``paths`` (decoded once, cached; in ``directory`` when given) and which
    paths decoded; every other one is named on stderr with its reason."""
    store = cached_store(paths, store_spec(cfg), directory, progress=False)
    for path in np.asarray(paths, dtype=object)[~store.valid]:
        try:  # only the broken ones are read again, for the reason the store does not keep
            load_image(path)
            why = "could not be decoded when the image store was built"
        except DataError as exc:
            why = exc.why
        print(f"skipped {path}: {why}", file=sys.stderr)
    return store, store.valid


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


def image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


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
    for label, cls in enumerate(cfg.classes):
        folder = train / cls
        if not folder.is_dir():
            raise DataError(
                folder,
                f"class folder not found (expected one folder per class: {', '.join(cfg.classes)})",
            )
        files = image_files(folder, cfg.extensions)
        if not files:
            raise DataError(folder, f"class folder has no images ({', '.join(cfg.extensions)})")
        paths += files
        labels += [label] * len(files)
        ids += [f"{cls}/{p.stem}" for p in files]
    store, valid = decode(paths, cfg)
    y = np.asarray(labels, dtype=np.int64)
    for label, cls in enumerate(cfg.classes):
        if not valid[y == label].any():
            raise DataError(train / cls, "no readable image in this class folder")
    if not valid.all():
        print(
            f"{cfg.train_dir}: skipped {int((~valid).sum())} unreadable image(s)", file=sys.stderr
        )
    keep = np.flatnonzero(valid)
    _check_unique([ids[i] for i in keep], train)
    return ImageSet(paths, ids, y, store, np.arange(len(paths))).subset(keep)


def scan_unlabelled(root: Path, cfg: DataConfig) -> ImageSet:
    """All readable images of ``root/TestSet/``, ids from file names."""
    folder = root / cfg.test_dir
    if not folder.is_dir():
        raise DataError(folder, "test folder not found")
    files = image_files(folder, cfg.extensions)
    if not files:
        raise DataError(folder, f"no images ({', '.join(cfg.extensions)})")
    store, valid = decode(files, cfg)
    if not valid.all():
        print(f"{cfg.test_dir}: skipped {int((~valid).sum())} unreadable image(s)", file=sys.stderr)
    if not valid.any():
        raise DataError(folder, "no readable image")
    keep = np.flatnonzero(valid)
    ids = [files[i].stem for i in keep]
    _check_unique(ids, folder)
    return ImageSet(files, [p.stem for p in files], None, store, np.arange(len(files))).subset(keep)


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


def train_augmentation(cfg: DataConfig) -> torch.nn.Module:
    """The training augmentation, batched on the device (kornia, each image its own draw):
    random crop of ``img_size`` from the working size, flips, rotation, colour jitter, on
    ``[b, 3, h, w]`` float pixels in [0, 1] (each of the model's branches normalises them its
    own way). The parameters are the per-sample torchvision pipeline's; rotation keeps its
    nearest-neighbour sampling and zero fill. Random draws use the global torch RNG, which the
    Trainer seeds and checkpoints (a resumed run draws the same augmentations)."""
    brightness, contrast, saturation, hue = cfg.color_jitter
    return torch.nn.Sequential(
        K.RandomCrop((cfg.img_size, cfg.img_size)),
        K.RandomHorizontalFlip(p=cfg.hflip),
        K.RandomVerticalFlip(p=cfg.vflip),
        K.RandomRotation(cfg.rotation, resample="nearest", p=1.0),
        K.ColorJitter(brightness, contrast, saturation, hue, p=1.0),
    )


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Centre crop of the working size (the training scale); [0, 1] pixels."""
    return v2.Compose([v2.CenterCrop(cfg.img_size), v2.ToDtype(torch.float32, scale=True)])


class ImageDataset(Dataset):
    """``{"image": [3, h, w], "label": int (-1 if unlabelled), "index": int}`` per item, read
    from the decoded store: uint8 at the working size without ``transform`` (training: the
    augmentation runs batched on the device), else ``transform``'s output."""

    def __init__(self, images: ImageSet, transform: v2.Compose | None = None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image = torch.from_numpy(np.array(self.images.image(i))).permute(2, 0, 1)
        label = -1 if self.images.labels is None else int(self.images.labels[i])
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label, "index": i}


class BalancedBatchSampler(samplers.BalancedBatchSampler):
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
