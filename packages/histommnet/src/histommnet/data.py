"""The data: the BreakHis tree (or the synthetic demo tree) indexed (``load_index``), images
decoded once at the input size (``WorkingImages``), the training augmentation, and the
multi-magnification dataset: items are patients, each draw one image per magnification.

Shapes: ``b`` batch, ``m`` magnifications, ``c`` colour channels, ``h w`` pixels. A batch is a
dict with ``images [b, m, c, h, w]`` (float in [0, 1]; ``model_input`` normalises), ``label [b]``, ``subtype [b]``,
``patient [b]`` (position in ``dataset.patients``) and ``draw [b]``.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import numpy as np
import torch
from kornia.geometry.transform import rotate
from torch.utils.data import Dataset

from histommnet.breakhis import BreakHisIndex, Patient, draws_per_patient, scan_breakhis
from histommnet.config import PACKAGE, AugmentConfig, DataConfig, HistoConfig
from histommnet.synthetic import generate_breakhis
from medcore.data.demo_cache import ensure_demo_data
from medcore.data.image_store import ImageStore, StoreSpec, cached_store, store_key
from medcore.errors import DataError
from medcore.io import load_image

DEMO_VERSION = "v2"


def _generate_demo(path: Path) -> None:
    generate_breakhis(
        path, patients_per_subtype=4, images_per_magnification=(4, 9), size=64, seed=0
    )


def resolve_data_dir(cfg: HistoConfig) -> Path:
    """``data.data_dir``, or the cached synthetic demo tree (generated on first use)."""
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    print("no --data-dir: using the built-in synthetic BreakHis demo data", file=sys.stderr)
    return ensure_demo_data(PACKAGE, _generate_demo, version=DEMO_VERSION)


def load_index(cfg: HistoConfig, verbose: bool = True) -> BreakHisIndex:
    """The BreakHis tree of ``cfg`` (or the demo tree) scanned into patients and images."""
    return scan_breakhis(
        resolve_data_dir(cfg),
        cfg.data.magnifications,
        cfg.data.missing_magnification,
        cfg.data.check_images,
        verbose=verbose,
    )


def normalization(cfg: DataConfig) -> dict[str, Any]:
    """``{mean, std, interpolation}`` of ``cfg``; each must be resolved (not None) by now."""
    if cfg.mean is None or cfg.std is None or cfg.interpolation is None:
        raise ValueError("data.mean/std/interpolation are resolved from the backbone first")
    return {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation}


def input_size(cfg: DataConfig) -> tuple[int, int]:
    """The model's input ``(height, width)``: ``image_size`` high, ``aspect_ratio`` wide."""
    return cfg.image_size, max(1, round(cfg.image_size * cfg.aspect_ratio))


def cover_size(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` a ``source`` ``(height, width)`` image is scaled to so that it covers ``size``
    keeping its shape (the centre crop of that is the input): never squashed, so a 700x460
    tile at ``(224, 341)`` is scaled whole and at ``(224, 224)`` its central square is kept."""
    (h, w), (height, width) = size, source
    scale = max(h / height, w / width)
    return max(h, math.ceil(height * scale - 1e-6)), max(w, math.ceil(width * scale - 1e-6))


def _source_shape(path: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # joins the common shape's store, which names and skips it


class WorkingImages:
    """Every image decoded once at the input size, in ``medcore.data.image_store`` stores shared by all
    folds, splits and DataLoader workers (rebuilt by the store when a source changes).

    A source is scaled to cover the input keeping its shape (``cover_size``), with the
    backbone's interpolation (``data.interpolation``, e.g. bicubic for EfficientNet-B1's
    pretrained weights), so sources of different shapes go to different stores; reading one
    takes the centre crop. Images that do
    not decode are named here once and replaced at read time by another image of the same
    patient and magnification (``MultiMagDataset``).

    ``store_dir``: build the stores there instead of the shared cache (for sources that are
    themselves temporary, such as in-memory images written out by ``histommnet.load``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        cfg: DataConfig,
        progress: bool = True,
        store_dir: Path | None = None,
    ) -> None:
        self.size = input_size(cfg)
        resample = normalization(cfg)["interpolation"]
        groups: dict[tuple[int, int] | None, list[str]] = {}
        for path in dict.fromkeys(paths):
            groups.setdefault(_source_shape(path), []).append(path)
        unreadable = groups.pop(None, [])
        if unreadable:
            common = max(groups, key=lambda k: len(groups[k])) if groups else self.size
            groups.setdefault(common, []).extend(unreadable)
        self.stores: list[ImageStore] = []
        self.where: dict[str, tuple[int, int]] = {}
        self.bad: set[str] = set()
        for shape, group in groups.items():
            spec = StoreSpec(cover_size(shape, self.size), "RGB", "stretch", resample)
            where = (
                None if store_dir is None else store_dir / store_key(list(map(Path, group)), spec)
            )
            store = cached_store(group, spec, where, progress=progress)
            for i, path in enumerate(group):
                self.where[path] = (len(self.stores), i)
                if not store.valid[i]:
                    self.bad.add(path)
            self.stores.append(store)
        for path in sorted(self.bad):
            try:
                load_image(path)
                why = "not decoded into the image store"
            except DataError as exc:
                why = exc.why
            print(
                f"skip {path}: {why} (replaced by another image of the same patient and "
                "magnification)",
                file=sys.stderr,
            )

    def __contains__(self, path: str) -> bool:
        return path in self.where

    def get(self, path: str) -> torch.Tensor:
        """Image ``path`` as float ``[c, h, w]`` in [0, 1] at the input size (a valid one)."""
        s, i = self.where[path]
        stored = self.stores[s][i]
        (h, w), (sh, sw) = self.size, stored.shape[:2]
        top, left = round((sh - h) / 2.0), round((sw - w) / 2.0)
        crop = np.array(stored[top : top + h, left : left + w])  # a copy, off the map
        return torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)


class Normalize(torch.nn.Module):
    """Images ``[..., c, h, w]`` in [0, 1] -> normalised as ``cfg`` says (on their device)."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        norm = normalization(cfg)
        self.register_buffer("mean", torch.tensor(norm["mean"]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm["std"]).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images - mean) / std


class TrainAugment(torch.nn.Module):
    """The training augmentation of ``cfg.augment`` on a batch on the training device:
    ``[b, m, c, h, w]`` in [0, 1] -> normalised, each magnification's image drawn apart.

    All ops are batched kornia ops with per-image parameters (``same_on_batch=False``), drawn
    from the global torch RNG (seeded and checkpointed by the Trainer: a resumed run draws the
    same). Order and probabilities as the per-sample pipeline had them: flips, rotation by a
    uniform angle filled by reflection (black corners would be a cue evaluation never shows),
    elastic deformation, Gaussian blur, colour jitter, normalisation, random erasing (on the
    normalised image, so an erased patch is the mean colour).
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        aug: AugmentConfig = cfg.augment
        h, w = input_size(cfg)
        self.degrees = float(aug.rotation_degrees)
        before: list[torch.nn.Module] = []
        if aug.flip:
            before += [K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5)]
        self.flips = torch.nn.Sequential(*before)
        after: list[torch.nn.Module] = []
        if aug.elastic_p:
            # torchvision's ElasticTransform: displacement ``alpha`` pixels over the height
            # (torchvision divides both axes by their size), smoothed by a ``sigma`` Gaussian
            # of its kernel size; kornia takes the displacement in normalised units.
            kernel = int(8 * aug.elastic_sigma + 1) | 1
            after.append(
                K.RandomElasticTransform(
                    kernel_size=(kernel, kernel),
                    sigma=(aug.elastic_sigma, aug.elastic_sigma),
                    alpha=(aug.elastic_alpha / h, aug.elastic_alpha / w),
                    p=aug.elastic_p,
                )
            )
        if aug.blur_p:
            kernel = max(3, (cfg.image_size // 32) | 1)
            after.append(
                K.RandomGaussianBlur((kernel, kernel), tuple(aug.blur_sigma), p=aug.blur_p)
            )
        if aug.brightness or aug.contrast or aug.saturation or aug.hue:
            after.append(
                K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=1.0)
            )
        self.photometric = torch.nn.Sequential(*after)
        self.normalize = Normalize(cfg)
        self.erase = (
            K.RandomErasing(scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0.0, p=aug.erasing_p)
            if aug.erasing_p
            else torch.nn.Identity()
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, m = images.shape[:2]
        x = self.flips(images.flatten(0, 1))
        if self.degrees:
            # angles from the CPU generator, like every kornia parameter: same draws on any device
            angle = (torch.rand(x.shape[0]) * 2.0 - 1.0) * self.degrees
            x = rotate(x, angle.to(x.device, x.dtype), padding_mode="reflection")
        x = self.photometric(x).clamp(0.0, 1.0)
        x = self.erase(self.normalize(x))
        return x.unflatten(0, (b, m))


class MultiMagDataset(Dataset):
    """Patients as items; each element is one draw of one image per magnification.

    ``train=True``: adaptive multi-image sampling (see ``draws_per_patient``); the draws of an
    epoch depend only on ``(seed, epoch)`` and change with ``set_epoch``. Within an epoch a
    patient's images of one magnification are used without repetition until exhausted.
    ``train=False``: a fixed set of draws covering every image of every magnification at least
    once (``eval_max_draws`` caps it), drawn from ``(seed, patient folder name)``.
    """

    def __init__(
        self,
        patients: Sequence[Patient],
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        images: WorkingImages | None = None,
    ) -> None:
        self.patients = list(patients)
        self.cfg = cfg
        self.magnifications = list(cfg.magnifications)
        self.train = train
        self.seed = seed
        paths = [
            p for patient in self.patients for m in self.magnifications for p in patient.images[m]
        ]
        self.images = images if images is not None else WorkingImages(paths, cfg)
        missing = [p for p in paths if p not in self.images]
        if missing:
            raise ValueError(f"{len(missing)} images not in the working images, e.g. {missing[0]}")
        self.normalize = Normalize(cfg)
        self.epoch = 0
        self.draws: list[tuple[int, tuple[str, ...]]] = []
        self.set_epoch(0)

    def draw_counts(self) -> list[int]:
        """Number of draws of each patient (fixed across epochs, so the epoch length is too)."""
        counts = []
        for patient in self.patients:
            per_mag = patient.counts(self.magnifications)
            if self.train:
                cfg = self.cfg
                n = draws_per_patient(
                    min(per_mag),
                    cfg.base_images,
                    cfg.volume_bounds,
                    cfg.utilization,
                    cfg.max_draws_per_patient,
                )
            else:
                n = max(per_mag)
                if self.cfg.eval_max_draws:
                    n = min(n, self.cfg.eval_max_draws)
            counts.append(n)
        return counts

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's image tuples (deterministic in ``(seed, epoch)``)."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        draws: list[tuple[int, tuple[str, ...]]] = []
        for p_idx, (patient, n) in enumerate(zip(self.patients, self.draw_counts(), strict=True)):
            if not self.train:
                # A patient's evaluation draws depend on the patient alone, not on the others
                # beside it: its test prediction equals what ``histommnet.load`` predicts for it.
                rng = np.random.default_rng([self.seed, zlib.crc32(patient.key.encode())])
            columns = []
            for mag in self.magnifications:
                paths = patient.images[mag]
                # Repeat fresh permutations until n draws: no image repeats before all were used.
                reps = math.ceil(n / len(paths))
                order = np.concatenate([rng.permutation(len(paths)) for _ in range(reps)])[:n]
                columns.append([paths[i] for i in order])
            draws.extend((p_idx, tuple(col[i] for col in columns)) for i in range(n))
        self.draws = draws

    def __len__(self) -> int:
        return len(self.draws)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's ``images`` (in [0, 1]) as the model takes them: normalised."""
        return self.normalize(images)

    def _load(self, path: str, mag_index: int, patient: Patient) -> torch.Tensor:
        if path not in self.images.bad:
            return self.images.get(path)
        for other in patient.images[self.magnifications[mag_index]]:
            if other not in self.images.bad:
                return self.images.get(other)
        raise DataError(patient.key, f"no readable image at {self.magnifications[mag_index]}")

    def load_tuple(self, index: int) -> torch.Tensor:
        """The images of draw ``index`` as ``[m, c, h, w]``, float in [0, 1] (not normalised:
        augmentation and normalisation run on the batch, see ``TrainAugment``)."""
        p_idx, paths = self.draws[index]
        patient = self.patients[p_idx]
        return torch.stack([self._load(p, i, patient) for i, p in enumerate(paths)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        p_idx, _ = self.draws[index]
        patient = self.patients[p_idx]
        return {
            "images": self.load_tuple(index),
            "label": torch.tensor(patient.label, dtype=torch.long),
            "subtype": torch.tensor(patient.subtype, dtype=torch.long),
            "patient": torch.tensor(p_idx, dtype=torch.long),
            "draw": torch.tensor(index, dtype=torch.long),
        }


def adjust_batch_size(requested: int, num_samples: int, min_batches: int = 4) -> tuple[int, bool]:
    """Batch size for ``num_samples`` and whether to drop the last batch.

    The batch shrinks (never below 2) so an epoch has at least ``min_batches`` batches; the
    last batch is dropped when it would hold a single sample (BatchNorm needs two).
    """
    if num_samples < 2:
        raise DataError("training data", f"has {num_samples} draw(s): need at least 2 for a batch")
    size = max(2, min(requested, num_samples // max(1, min_batches)))
    size = min(size, num_samples)
    return size, num_samples % size == 1
