"""``cxrlandmarks.load``: a trained landmark model with its preprocessing, for Python.

``load(source)`` reads a run directory (its model: the last phase's checkpoint, see
:mod:`cxrlandmarks.export`), a checkpoint (ours or the original code's), an exported folder or
``hf-hub:ORG/NAME[@REV]``, and returns a :class:`LandmarkModel` whose ``predict(images)``
takes PNG/JPEG files, folders or arrays and returns the 15 named landmarks in pixels of each
original image. It runs what evaluation runs: the image decoded as grayscale, the image store's
resize, the recorded input normalisation, :func:`cxrlandmarks.predict.predict_batches` with
flip TTA as the model's config says. ``cxrlandmarks-predict`` predicts through
:func:`predict_inputs` as well, so the command and ``predict`` agree exactly.

Nothing here imports the trainer or Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlandmarks.data import model_input
from cxrlandmarks.export import describe, read_source
from cxrlandmarks.layouts import IMAGE_EXTENSIONS
from cxrlandmarks.model import KIND, build_model, saved_config
from cxrlandmarks.predict import predict_batches
from medcore.engine.inference import PredictOptions, checkpoint_precision, load_model, predict
from medcore.errors import DataError, UserError
from medcore.io import load_image
from medcore.runtime.device import resolve_device
from medcore.weights.sources import model_export

ImageLike = str | Path | np.ndarray | torch.Tensor


class LandmarkNameError(UserError, ValueError):
    """A landmark name that is not one of the model's 15."""


@dataclass(frozen=True)
class ImageInput:
    """One image to predict: a file, or an array already in memory.

    ``name`` is the image's key as the annotation CSV writes it (a file's stem, ``COVID-269``;
    ``array_<i>`` for the ``i``-th input array); ``path`` the path given (``<array i>``).
    """

    name: str
    path: str
    file: Path | None = None
    array: np.ndarray | None = field(default=None, repr=False)

    def gray(self) -> np.ndarray:
        """The image as ``[H, W]`` uint8 grayscale (a file decoded as training reads it)."""
        return self.array if self.array is not None else load_image(self.file, "L")


def _is_mask(path: Path) -> bool:
    """A lung mask of the Kaggle release: a file in ``masks/`` beside an ``images/`` folder."""
    return path.parent.name == "masks" and (path.parent.parent / "images").is_dir()


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the folders named; in folders, the
    Kaggle release's ``masks/`` (beside ``images/``) are left out, with a line saying so."""
    images: list[Path] = []
    masks = 0
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.suffix in IMAGE_EXTENSIONS and p.is_file()
            )
            images += [p for p in found if not _is_mask(p)]
            masks += sum(map(_is_mask, found))
        elif item.is_file():
            images.append(item)
        else:
            raise UserError(item, "no such image file or folder")
    if masks:
        print(f"left out {masks} lung mask(s) in masks/ folders beside images/ (not radiographs)")
    if not images:
        raise UserError(", ".join(map(str, inputs)), "no .png/.jpg images found")
    return images


def gray_array(array: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """An image array as ``[H, W]`` uint8 grayscale, converted as a file of that kind is read:
    ``[H, W, 3|4]`` uint8 through Pillow's grayscale conversion, a deeper or float ``[H, W]``
    image rescaled from its own min-max range."""
    from PIL import Image

    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        return np.asarray(Image.fromarray(arr).convert("L"), dtype=np.uint8)
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise DataError(
            what, f"expected an image [H, W] or [H, W, 1|3|4] (uint8), got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise DataError(what, f"not a numeric image (dtype {arr.dtype})")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(what, "contains NaN or infinite pixel values")
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    return scaled.round().astype(np.uint8)


def image_inputs(images: ImageLike | Sequence[ImageLike]) -> list[ImageInput]:
    """Files, folders (searched recursively) and arrays, one or a list, as :class:`ImageInput`\\ s."""
    if isinstance(images, (str, Path, np.ndarray, torch.Tensor)):
        images = [images]
    items: list[ImageInput] = []
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)):
            items += [ImageInput(p.stem, str(p), file=p) for p in collect_images([Path(image)])]
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            what = f"<array {i}>"
            items.append(ImageInput(f"array_{i}", what, array=gray_array(image, what)))
        else:
            raise TypeError(
                f"images: expected paths, folders or arrays, got {type(image).__name__}"
            )
    if not items:
        raise UserError("images", "no images given")
    return items


class InputImages(Dataset):
    """Images -> ``{"image": [3, S, S] normalised, "size": [W, H], "why": ""}``; one that
    cannot be read comes back blank with the reason in ``why`` (named, dropped and counted)."""

    def __init__(self, items: Sequence[ImageInput], size: int, norm: dict[str, Any]) -> None:
        self.items, self.size, self.norm = list(items), size, norm

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            gray = self.items[index].gray()
        except DataError as exc:
            blank = torch.zeros(3, self.size, self.size)
            return {"image": blank, "size": torch.zeros(2), "why": exc.why}
        wh = torch.tensor([gray.shape[1], gray.shape[0]], dtype=torch.float32)
        return {"image": model_input(gray, self.size, self.norm), "size": wh, "why": ""}


@dataclass
class Predictions:
    """Landmarks of the images that could be read: ``coords[i]`` ``[15, 2]`` are ``(x, y)``
    in pixels of ``inputs[i]``'s original image; ``skipped`` names the others and why."""

    inputs: list[ImageInput]
    coords: np.ndarray
    sizes: np.ndarray  # [n, 2]: each original image's width and height
    skipped: dict[str, str]


class LandmarkModel:
    """A trained cxrlandmarks model (eval mode) with its preprocessing; :func:`load` makes one.

    ``landmark_names``: the outputs in order; ``image_size``, ``input_norm``, ``tta_flip``:
    the recorded preprocessing; ``module``: the ``torch.nn.Module``; ``config``: the exported
    ``config.json`` form of the model (what :mod:`cxrlandmarks.export` writes).
    """

    def __init__(
        self, module: nn.Module, config: dict[str, Any], source: str, device: torch.device
    ) -> None:
        pre = config["preprocessing"]
        self.module, self.config, self.source, self.device = module, config, source, device
        self.landmark_names: tuple[str, ...] = tuple(config["labels"])
        self.image_size = int(pre["image_size"])
        self.input_norm: dict[str, Any] = pre["input_norm"]
        self.tta_flip = bool(pre["tta_flip"])
        recorded = {"precision": pre["precision"]} if pre.get("precision") else {}
        self.precision = checkpoint_precision(recorded, device)

    def __repr__(self) -> str:
        return (
            f"LandmarkModel({self.source!r}, {len(self.landmark_names)} landmarks, "
            f"input {self.image_size}px, tta_flip={self.tta_flip}, device={self.device})"
        )

    def select(self, landmarks: str | Sequence[str] | None) -> list[str]:
        """The landmark names asked for (all when None); an unknown one is a LandmarkNameError."""
        if landmarks is None:
            return list(self.landmark_names)
        names = [landmarks] if isinstance(landmarks, str) else list(landmarks)
        unknown = [n for n in names if n not in self.landmark_names]
        if unknown or not names:
            raise LandmarkNameError(
                "landmarks",
                f"unknown landmark name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"the names are {', '.join(self.landmark_names)}",
            )
        return names

    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        landmarks: str | Sequence[str] | None = None,
        tta_flip: bool | None = None,
        batch_size: int = 16,
    ) -> pd.DataFrame:
        """Landmarks of ``images`` (PNG/JPEG files, folders searched recursively, ``[H, W]``
        or ``[H, W, 3]`` arrays; one or a list) in pixels of each original image.

        One row per image read: ``image_name`` (a file's stem, the annotation CSV's key;
        ``array_<i>`` for arrays), ``image_path``, ``width``, ``height``, then ``<name>_x``,
        ``<name>_y`` for each landmark (all 15, or ``landmarks``). Unreadable files are named
        on stderr, counted, and listed in ``frame.attrs["skipped"]`` (path -> why); the others
        are predicted. ``tta_flip`` None: as the model's config says.
        """
        names = self.select(landmarks)
        flip = self.tta_flip if tta_flip is None else bool(tta_flip)
        result = predict_inputs([self], image_inputs(images), flip, batch_size)
        frame = pd.DataFrame(
            {
                "image_name": [i.name for i in result.inputs],
                "image_path": [i.path for i in result.inputs],
                "width": result.sizes[:, 0],
                "height": result.sizes[:, 1],
            }
        )
        columns = {}
        for name in names:
            j = self.landmark_names.index(name)
            columns[f"{name}_x"] = result.coords[:, j, 0]
            columns[f"{name}_y"] = result.coords[:, j, 1]
        frame = pd.concat([frame, pd.DataFrame(columns)], axis=1)
        frame.attrs["skipped"] = result.skipped
        return frame


def predict_inputs(
    models: Sequence[LandmarkModel],
    items: Sequence[ImageInput],
    tta_flip: bool,
    batch_size: int = 16,
) -> Predictions:
    """The mean prediction of ``models`` (one, or an ensemble sharing input size and
    normalisation) for each image, in pixels of its original; unreadable ones are named on
    stderr and skipped; none readable is a one-line UserError."""
    first = models[0]
    if any(m.image_size != first.image_size for m in models):
        sizes = sorted({m.image_size for m in models})
        raise UserError("--checkpoint", f"ensemble members use different input sizes {sizes}")
    if any(m.input_norm["mean"] != first.input_norm["mean"] for m in models) or any(
        m.input_norm["std"] != first.input_norm["std"] for m in models
    ):
        raise UserError("--checkpoint", "ensemble members use different input normalisations")
    data = InputImages(items, first.image_size, first.input_norm)
    ensemble = nn.ModuleList([m.module for m in models])  # predict() switches all to eval

    def forward(net: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        pred = predict_batches(list(net), batch["image"], tta_flip)
        return {"pred": pred, "size": batch["size"], "why": batch["why"]}

    # A few images load faster in this process than in started workers; same results.
    workers = 0 if len(items) <= batch_size else None
    options = PredictOptions(first.device, first.precision, batch_size, workers)
    result = predict(ensemble, data, forward, options)
    for item, why in zip(items, result["why"], strict=True):
        if why:
            print(f"skipped {item.path}: {why}", file=sys.stderr)
    ok = np.array([not why for why in result["why"]])
    if not ok.any():
        raise UserError("inputs", f"none of the {len(items)} images could be read")
    if not ok.all():
        print(f"skipped {int((~ok).sum())} unreadable image(s) of {len(items)}", file=sys.stderr)
    coords = (result["pred"].double() * result["size"][:, None, :]).numpy()[ok]
    kept = [item for item, good in zip(items, ok, strict=True) if good]
    skipped = {i.path: why for i, why in zip(items, result["why"], strict=True) if why}
    return Predictions(kept, coords, result["size"].numpy()[ok].astype(int), skipped)


def load(source: str | Path, device: str | torch.device = "auto") -> LandmarkModel:
    """The model ``source`` names, in eval mode on ``device``, with its preprocessing.

    ``source``: a run directory (the checkpoint of its last phase), a checkpoint (``.pt``,
    ours or the original code's), an exported folder (``cxrlandmarks-export``) or
    ``hf-hub:ORG/NAME[@REV]`` (read from the Hugging Face cache; fetched only when online and
    ``HF_HUB_OFFLINE`` is unset). Another package's model or a bare weights file is refused
    with a :class:`medcore.weights.sources.ModelSourceError`.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    src = read_source(source)
    export = model_export(src, describe)
    module, _ = load_model(
        src.path,
        KIND,
        lambda s: build_model(saved_config(s)),
        device=dev,
        state=export.checkpoint(),
    )
    return LandmarkModel(module, export.config(), str(source), dev)
