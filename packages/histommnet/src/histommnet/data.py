"""The multi-magnification dataset: items are patients, each draw one image per magnification.

Shapes: ``b`` batch, ``m`` magnifications, ``c`` colour channels, ``h w`` pixels. A batch is a
dict with ``images [b, m, c, h, w]`` (float, normalised), ``label [b]``, ``subtype [b]``,
``patient [b]`` (position in ``dataset.patients``) and ``draw [b]``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kornia.geometry.transform import rotate
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from histommnet.breakhis import Patient, draws_per_patient
from histommnet.config import AugmentConfig, DataConfig
from medcore.errors import DataError
from medcore.io import load_image

_INTERPOLATION = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def normalization(cfg: DataConfig) -> dict[str, Any]:
    """``{mean, std, interpolation}`` of ``cfg``; each must be resolved (not None) by now."""
    if cfg.mean is None or cfg.std is None or cfg.interpolation is None:
        raise ValueError("data.mean/std/interpolation are resolved from the backbone first")
    return {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation}


def input_size(cfg: DataConfig) -> tuple[int, int]:
    """The model's input ``(height, width)``: ``image_size`` high, ``aspect_ratio`` wide."""
    return cfg.image_size, max(1, round(cfg.image_size * cfg.aspect_ratio))


class CoverResize:
    """Scale an image ``[c, H, W]`` to cover ``(h, w)`` keeping its shape, then centre-crop.

    Never squashes: a 700x460 tile at ``(224, 341)`` is scaled whole; at ``(224, 224)`` its
    central 460x460 square is kept.
    """

    def __init__(self, size: tuple[int, int], interpolation: str = "bilinear") -> None:
        self.size = size
        self.interpolation = _INTERPOLATION[interpolation]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        (h, w), (height, width) = self.size, image.shape[-2:]
        scale = max(h / height, w / width)
        scaled = [max(h, math.ceil(height * scale - 1e-6)), max(w, math.ceil(width * scale - 1e-6))]
        image = v2.functional.resize(image, scaled, self.interpolation, antialias=True)
        return v2.functional.center_crop(image, [h, w])


class ReflectRotation:
    """Rotation by a uniform angle in ``[-degrees, degrees]`` that fills by reflection.

    torchvision's ``RandomRotation`` fills the corners with a constant, black corners that
    evaluation never shows; kornia's ``rotate`` samples the mirrored image there instead.
    The angle comes from the torch RNG (seeded per DataLoader worker) as in torchvision.
    """

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        angle = (torch.rand(1) * 2.0 - 1.0) * self.degrees
        rotated = rotate(image.as_subclass(torch.Tensor)[None], angle, padding_mode="reflection")
        return (
            tv_tensors.wrap(rotated[0], like=image)
            if isinstance(image, tv_tensors.Image)
            else rotated[0]
        )


def build_transform(cfg: DataConfig, augment: bool) -> v2.Compose:
    """uint8 ``[h, w, c]`` array -> normalised float ``[c, *input_size(cfg)]``.

    With ``augment`` the training augmentation of ``cfg.augment`` runs on the float image.
    ``cfg``'s normalisation must be resolved (see ``histommnet.model.resolve_normalization``).
    """
    norm = normalization(cfg)
    steps: list = [
        v2.ToImage(),
        CoverResize(input_size(cfg), norm["interpolation"]),
        v2.ToDtype(torch.float32, scale=True),
    ]
    aug: AugmentConfig = cfg.augment
    if augment:
        if aug.flip:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if aug.rotation_degrees:
            steps.append(ReflectRotation(aug.rotation_degrees))
        if aug.elastic_p:
            elastic = v2.ElasticTransform(alpha=aug.elastic_alpha, sigma=aug.elastic_sigma)
            steps.append(v2.RandomApply([elastic], p=aug.elastic_p))
        if aug.blur_p:
            kernel = max(3, (cfg.image_size // 32) | 1)
            blur = v2.GaussianBlur(kernel_size=kernel, sigma=tuple(aug.blur_sigma))
            steps.append(v2.RandomApply([blur], p=aug.blur_p))
        steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    steps.append(v2.Normalize(norm["mean"], norm["std"]))
    if augment and aug.erasing_p:
        steps.append(v2.RandomErasing(p=aug.erasing_p, scale=(0.02, 0.15)))
    return v2.Compose(steps)


def denormalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Images ``[..., c, h, w]`` normalised as ``cfg`` says back to RGB in [0, 1] (overlays)."""
    norm = normalization(cfg)
    mean = torch.tensor(norm["mean"]).view(3, 1, 1)
    std = torch.tensor(norm["std"]).view(3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1)


class MultiMagDataset(Dataset):
    """Patients as items; each element is one draw of one image per magnification.

    ``train=True``: adaptive multi-image sampling (see ``draws_per_patient``); the draws of an
    epoch depend only on ``(seed, epoch)`` and change with ``set_epoch``. Within an epoch a
    patient's images of one magnification are used without repetition until exhausted.
    ``train=False``: a fixed set of draws covering every image of every magnification at least
    once (``eval_max_draws`` caps it).
    """

    def __init__(
        self,
        patients: Sequence[Patient],
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        augment: bool | None = None,
    ) -> None:
        self.patients = list(patients)
        self.cfg = cfg
        self.magnifications = list(cfg.magnifications)
        self.train = train
        self.seed = seed
        use_aug = train if augment is None else augment
        self.transform = build_transform(cfg, use_aug)
        self._bad: set[str] = set()
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
        rng = np.random.default_rng([self.seed, epoch if self.train else 0])
        draws: list[tuple[int, tuple[str, ...]]] = []
        for p_idx, (patient, n) in enumerate(zip(self.patients, self.draw_counts(), strict=True)):
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

    def _load(self, path: str, mag_index: int, patient: Patient) -> np.ndarray:
        try:
            return load_image(path)
        except DataError as exc:
            if path not in self._bad:
                self._bad.add(path)
                print(
                    f"skip {path}: {exc.why} (replaced by another image of the same patient "
                    "and magnification)",
                    file=sys.stderr,
                )
        for other in patient.images[self.magnifications[mag_index]]:
            if other not in self._bad:
                try:
                    return load_image(other)
                except DataError:
                    self._bad.add(other)
        raise DataError(patient.key, f"no readable image at {self.magnifications[mag_index]}")

    def load_tuple(self, index: int, transform: v2.Compose | None = None) -> torch.Tensor:
        """The images of draw ``index`` as ``[m, c, h, w]``."""
        p_idx, paths = self.draws[index]
        patient = self.patients[p_idx]
        tf = transform or self.transform
        return torch.stack([tf(self._load(p, i, patient)) for i, p in enumerate(paths)])

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
