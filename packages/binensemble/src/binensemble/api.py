"""``binensemble.load``: the model of a run (every model it trained and their soft vote), ready to
predict image files, folders or arrays.

The loaded models run the evaluation path of ``binensemble-train`` and ``binensemble-predict``:
images decoded into medcore's image store at the working size, the centre crop, each branch's
recorded normalisation, the recorded TTA views (the metric model's gallery views are enforced),
the KNN over the gallery carried in the model, the soft vote of ``binensemble-vote``
(:func:`binensemble.ensemble.soft_vote`) with the run's weights. ``binensemble-predict`` loads
its model with :func:`load` and predicts with :meth:`EnsembleModel.predict_set`.

Example::

    import binensemble

    model = binensemble.load("runs/binensemble/20250101-120000")  # or an export, hf-hub:ORG/NAME
    predictions = model.predict("scans/")  # files, folders, or uint8 arrays
    print(predictions.frame())  # per image: each model's and the vote's label and P(disease)
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from binensemble.config import DataConfig
from binensemble.data import ImageSet, decode, image_files
from binensemble.ensemble import decide, soft_vote
from binensemble.export import Origin, member_states, read_export
from binensemble.predict import Bundle, bundle_from_state, member_probs
from medcore.errors import DataError
from medcore.runtime.device import resolve_device
from medcore.weights.export import ModelExport

ImageInput = str | Path | np.ndarray


def load(source: str | Path, device: str = "auto") -> EnsembleModel:
    """The model of ``source`` in eval mode on ``device`` (``auto``: CUDA, then MPS, then CPU).

    ``source``: a run directory of ``binensemble-train`` (every model it trained and their
    vote; a ``--model metric`` run: that model), a model's checkpoint (``metric/model.pt``: that
    model alone), an exported folder of ``binensemble-export`` or ``hf-hub:ORG/NAME[@REV]`` (read
    from the Hugging Face cache; fetched only when online and ``HF_HUB_OFFLINE`` is unset).
    Another package's model or a bare weights file raises
    :class:`medcore.weights.sources.ModelSourceError`.
    """
    export, origin = read_export(source)
    return EnsembleModel(export, origin, resolve_device(device))


@dataclass
class Predictions:
    """What :meth:`EnsembleModel.predict` returns.

    ``ids``: one per predicted image (the file name without extension, ``array<i>`` for the
    i-th input array; the path where two files share a name). ``probs``: each model's and,
    with several models, the vote's class probabilities ``[n, c]``. ``skipped``: the inputs
    that could not be read (named on stderr as well).
    """

    ids: list[str]
    classes: list[str]
    probs: dict[str, np.ndarray]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def final(self) -> str:
        """The name of the final prediction: ``vote``, or the one model's name."""
        return "vote" if "vote" in self.probs else next(iter(self.probs))

    def labels(self, name: str | None = None) -> list[str]:
        """Class names by ``name`` (a model or ``vote``; default :attr:`final`): the package's
        one decision rule, the class with the larger probability, a tie going to class 0."""
        return [self.classes[i] for i in decide(self.probs[name or self.final])]

    def frame(self) -> pd.DataFrame:
        """One row per image: ``image_id``, then per model and the vote ``<name>_label`` and
        ``<name>_prob_<class 1>``."""
        out = pd.DataFrame({"image_id": self.ids})
        for name, probs in self.probs.items():
            out[f"{name}_label"] = self.labels(name)
            out[f"{name}_prob_{self.classes[1]}"] = probs[:, 1]
        return out


class EnsembleModel:
    """Every model of a run and their soft vote (see :func:`load`).

    ``members``: the models by name (``metric``, ``baseline``), each a
    :class:`binensemble.predict.Bundle` (network, configs, precision, KNN gallery, TTA views).
    ``vote_weights``: normalised, one per model (None with one model). ``data_config``: the
    preprocessing settings shared by the models.
    """

    def __init__(self, export: ModelExport, origin: Origin, device: torch.device) -> None:
        self.export = export
        self.origin = origin
        self.device = device
        self.classes: list[str] = list(export.labels)
        self.vote_weights: list[float] | None = export.extras["vote_weights"]
        self.members: dict[str, Bundle] = {
            name: bundle_from_state(origin.path, state, device)
            for name, state in member_states(export).items()
        }
        first = next(iter(self.members.values()))
        sizes = {(b.data_cfg.img_size, b.data_cfg.resize_scale) for b in self.members.values()}
        if len(sizes) > 1:
            raise DataError(origin.source, "its models were trained at different input sizes")
        self.data_config: DataConfig = first.data_cfg

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def __repr__(self) -> str:
        parts = []
        for name, b in self.members.items():
            k = f", k={b.knn['k']}, gallery {len(b.gallery_y)}" if b.gallery_y is not None else ""
            parts.append(f"{name} (views {'+'.join(b.views or [])}{k})")
        vote = f", vote weights {self.vote_weights}" if self.vote_weights else ""
        return f"EnsembleModel({'; '.join(parts)}{vote}; from {self.origin.source})"

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        views: Sequence[str] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = 0,
    ) -> Predictions:
        """Each model's and the vote's probabilities for ``images``: an image file, a folder (its
        images, by name), a uint8 array (``[h, w]``, ``[h, w, 3]`` or ``[h, w, 4]``) or a list
        of these. An unreadable file is named on stderr and skipped (counted, listed in
        ``skipped``); none readable is a DataError.

        ``views``: TTA views for every model (default: each model's recorded ones; a metric
        model refuses views other than its gallery's). ``batch_size``: default the model's
        evaluation batch size.
        """
        with tempfile.TemporaryDirectory(prefix="binensemble-predict-") as tmp:
            image_set, skipped = read_images(images, self.data_config, Path(tmp))
            probs = self.predict_set(image_set, views, batch_size, num_workers)
        return Predictions(list(image_set.ids), self.classes, probs, skipped)

    def predict_set(
        self,
        images: ImageSet,
        views: Sequence[str] | None = None,
        batch_size: int | None = None,
        num_workers: int | None = 0,
        desc: str | None = None,
    ) -> dict[str, np.ndarray]:
        """``{model: [n, c], ..., "vote": [n, c]}`` of a decoded image set (the vote with
        several models): the function behind :meth:`predict` and ``binensemble-predict``."""
        out: dict[str, np.ndarray] = {}
        for name, bundle in self.members.items():
            chosen = list(views) if views is not None else list(bundle.views or [])
            size = batch_size or bundle.data_cfg.eval_batch_size
            label = f"{name}: {desc}" if desc else None
            out[name] = member_probs(bundle, images, self.device, chosen, size, num_workers, label)
        if len(out) > 1:
            out["vote"] = soft_vote([out[n] for n in self.members], self.vote_weights)
        return out


def read_images(
    images: ImageInput | Iterable[ImageInput], cfg: DataConfig, workdir: Path
) -> tuple[ImageSet, list[str]]:
    """Files, folders and arrays as an image set decoded into a store under ``workdir`` (arrays
    are written there as PNG first, so they are decoded exactly as files are); returns the set
    of readable images and the names of the unreadable ones (each named on stderr)."""
    items: list[Any] = [images] if isinstance(images, (str, Path, np.ndarray)) else list(images)
    if not items:
        raise DataError("images", "no images given")
    paths: list[Path] = []
    arrays = workdir / "arrays"
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            paths.append(_array_png(item, arrays / f"array{i}.png", i))
            continue
        if not isinstance(item, (str, Path)):
            raise TypeError(f"images: expected paths or numpy arrays, got {type(item).__name__}")
        path = Path(item).expanduser()
        if path.is_dir():
            files = image_files(path, cfg.extensions)
            if not files:
                raise DataError(path, f"no images ({', '.join(cfg.extensions)})")
            paths += files
        else:
            paths.append(path)
    store, valid = decode(paths, cfg, workdir / "store")
    skipped = [str(p) for p, ok in zip(paths, valid, strict=True) if not ok]
    if not valid.any():
        raise DataError(paths[0] if len(paths) == 1 else "images", "no readable image")
    if skipped:
        print(
            f"skipped {len(skipped)} of {len(paths)} image(s) that could not be read (named above)",
            file=sys.stderr,
        )
    stems = [p.stem for p in paths]
    ids = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    keep = np.flatnonzero(valid)
    return ImageSet(paths, ids, None, store, np.arange(len(paths))).subset(keep), skipped


def _array_png(array: np.ndarray, path: Path, index: int) -> Path:
    from PIL import Image

    ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not ok_shape:
        raise DataError(
            f"images[{index}]",
            f"an array must be uint8 [h, w], [h, w, 3] or [h, w, 4], not {array.dtype} "
            f"{list(array.shape)}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)
    return path
