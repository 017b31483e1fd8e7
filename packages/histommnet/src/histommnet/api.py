"""``histommnet.load``: a trained model with its preprocessing, for new patients' folders.

::

    model = histommnet.load("runs/histommnet/<run>")   # or a checkpoint, an export, hf-hub:ORG/NAME
    result = model.predict("patients/")                # patient folders of 40X/100X/200X/400X
    result = model.predict({"P1": {"40X": [rgb1, rgb2], "100X": rgb3}})  # or images in memory
    result.patients                                    # P(malignant) per patient, predicted class
    result.images                                      # P(malignant) per draw (one image per magnification)

Images in memory (uint8 RGB arrays) are written as PNG files to a temporary folder and read
back through the same image store as files: PNG is lossless, so each is decoded to the very
array given, and one decoding, resize and crop path serves files and arrays alike.

The model of a run is one fold (:mod:`histommnet.export`: the best by validation score, or
``fold=K``) with that fold's image- and patient-level thresholds. Prediction is the evaluation
path: the same draws of image tuples (``MultiMagDataset``), decoding and resize
(``WorkingImages``), normalisation, forward and autocast (``histommnet.predict.predict_draws``), the
patient's probability the mean over its draws (``patient_table``).

Nothing here imports the trainer or Lightning.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from histommnet.breakhis import (
    ALL_MAGNIFICATIONS,
    CLASSES,
    Patient,
    fill_magnifications,
    image_problem,
)
from histommnet.config import DataConfig
from histommnet.data import MultiMagDataset, WorkingImages
from histommnet.export import describe, find_in_run
from histommnet.model import KINDS, build_from_checkpoint
from histommnet.predict import patient_table, predict_draws
from medcore.engine.inference import PredictOptions, checkpoint_precision, load_model
from medcore.errors import DataError, UserError
from medcore.runtime.device import resolve_device
from medcore.weights.export import ModelExport
from medcore.weights.sources import model_export, read_model_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ImageArg = str | Path | np.ndarray
PatientImages = Mapping[str, ImageArg | Sequence[ImageArg]]
PatientsArg = str | Path | Iterable[str | Path] | PatientImages | Mapping[str, PatientImages]
# the name of a patient given as one mapping of magnification -> images
ONE_PATIENT = "patient"


@dataclass
class Prediction:
    """What :meth:`HistoModel.predict` returns.

    ``patients``: one row per patient (``patient`` = folder name or the name given,
    ``prob_malignant`` the mean over its draws, ``predicted`` at the patient-level
    ``threshold``, ``images`` used, ``draws``, ``filled`` missing magnifications, ``folder``,
    empty for images given in memory). ``images``: one row per draw (``patient``, ``draw``,
    ``prob_malignant``, ``predicted`` at the image-level ``threshold``, the image of each
    magnification: its path, or ``40X[1]`` for the second array given at 40X; the subtype
    head's guess where the model has one).
    ``skipped``: ``(path or folder, why)`` of what was left out. ``cams`` (``gradcam=True``):
    patient -> Grad-CAM maps ``[draws, magnifications, h, w]`` in [0, 1] for the predicted
    class of each draw, on the model's input pixels.
    """

    patients: pd.DataFrame
    images: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cams: dict[str, np.ndarray] = field(default_factory=dict)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _magnification_dirs(folder: Path) -> dict[str, Path]:
    """The magnification subfolders of ``folder`` (``40X``, ``100x`` ...), by magnification."""
    found = {}
    for child in sorted(folder.iterdir()):
        name = child.name.upper()
        if child.is_dir() and name in ALL_MAGNIFICATIONS:
            found[name] = child
    return found


def patient_folders(inputs: PatientsArg) -> list[Path]:
    """Patient folders (folders with magnification subfolders) named by ``inputs``: patient
    folders themselves, or folders searched below for them (a folder of patients, a BreakHis
    tree ``.../breast/<class>/SOB/<tumor_type>/<patient>/<mag>/``). DataError for an input that
    is not a folder or holds no patient folder."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise DataError("patients", "no patient folder given")
    folders: list[Path] = []
    for item in map(Path, items):
        if not item.is_dir():
            why = "not a folder" if item.exists() else "no such folder"
            raise DataError(item, f"{why} (expected a patient folder of 40X/100X/200X/400X)")
        found: list[Path] = []
        for dirpath, dirnames, _ in os.walk(item):
            dirnames.sort()
            here = Path(dirpath)
            if _magnification_dirs(here):
                found.append(here)
                dirnames.clear()  # a patient's own subfolders are its magnifications
        if not found:
            raise DataError(
                item,
                "no patient folder found (a folder with 40X, 100X, 200X or 400X subfolders of "
                f"images: {', '.join(IMAGE_SUFFIXES)})",
            )
        folders += [f for f in found if f not in folders]
    names: dict[str, Path] = {}
    for folder in folders:
        if folder.name in names:
            raise DataError(
                folder, f"two patient folders are named {folder.name} (also {names[folder.name]})"
            )
        names[folder.name] = folder
    return folders


@dataclass
class _Inputs:
    """Patients read from folders or mappings, ready for :meth:`HistoModel.predict`."""

    patients: list[Patient]
    skipped: list[tuple[str, str]]
    where: dict[str, str]  # patient key -> its folder ("" for images given in memory)
    who: dict[str, str]  # patient key -> how messages name it ("patient <folder or name>")
    shown: dict[str, str] = field(default_factory=dict)  # temporary PNG -> "40X[1]"


def _skip(skipped: list[tuple[str, str]], what: str, why: str) -> None:
    skipped.append((what, why))
    print(f"skip {what}: {why}", file=sys.stderr)


def _add_patient(
    inputs: _Inputs,
    key: str,
    folder: str,
    who: str,
    images: dict[str, list[str]],
    magnifications: Sequence[str],
    missing: str,
) -> None:
    """Patient ``key`` of ``images`` (paths per magnification) into ``inputs``: unreadable
    images skipped, a missing magnification filled or the patient skipped, each named."""
    good: dict[str, list[str]] = {}
    for mag in magnifications:
        good[mag] = []
        for path in images.get(mag, []):
            file = Path(path)
            if file.is_file():
                why = image_problem(file)
            else:
                why = "not a file" if file.exists() else "no such file"
            if why is None:
                good[mag].append(path)
            else:
                shown = f"{who} {inputs.shown[path]}" if path in inputs.shown else path
                _skip(inputs.skipped, shown, why)
    patient = Patient(key, key, -1, -1, good)
    why = fill_magnifications(patient, magnifications, missing)
    if why is not None:
        _skip(inputs.skipped, who, why)
        return
    inputs.patients.append(patient)
    inputs.where[key] = folder
    inputs.who[key] = who


def _no_patient(inputs: _Inputs, what: str, magnifications: Sequence[str]) -> None:
    if not inputs.patients:
        raise DataError(what, f"no patient with readable images at {', '.join(magnifications)}")


def read_patients(folders: Sequence[Path], magnifications: Sequence[str], missing: str) -> _Inputs:
    """Patients of ``folders`` (key: folder name; label and subtype unknown, -1), their
    unreadable images and incomplete patients skipped, each named on stderr."""
    inputs = _Inputs([], [], {}, {})
    for folder in folders:
        dirs = _magnification_dirs(folder)
        images = {
            mag: sorted(str(p) for p in dirs[mag].iterdir() if _is_image(p))
            for mag in magnifications
            if mag in dirs
        }
        who = f"patient {folder}"
        _add_patient(inputs, folder.name, str(folder), who, images, magnifications, missing)
    what = ", ".join(str(f) for f in folders[:3]) + (" ..." if len(folders) > 3 else "")
    _no_patient(inputs, what, magnifications)
    return inputs


def _magnification_key(key: Any, where: str) -> str:
    mag = key.upper() if isinstance(key, str) else None
    if mag not in ALL_MAGNIFICATIONS:
        raise DataError(
            where, f"unknown magnification {key!r} (known: {', '.join(ALL_MAGNIFICATIONS)})"
        )
    return mag


def _image_path(item: Any, png: Path, where: str) -> str:
    """The file of one given image: a path as given, an array written to ``png``."""
    if isinstance(item, (str, Path)):
        return str(Path(item).expanduser())
    if not isinstance(item, np.ndarray):
        raise DataError(
            where,
            f"expected an image file path or a uint8 [H, W, 3] array, not {type(item).__name__}",
        )
    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3 or 0 in item.shape:
        raise DataError(
            where,
            f"an image array must be uint8 RGB [H, W, 3], not {item.dtype} {list(item.shape)}",
        )
    from PIL import Image

    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(item).save(png)
    return str(png)


def given_patients(
    given: Mapping[Any, Any], magnifications: Sequence[str], missing: str, workdir: Path
) -> _Inputs:
    """Patients given in memory: one mapping of magnification -> images (named
    :data:`ONE_PATIENT`) or a mapping of name -> such a mapping. An image is a file path or a
    uint8 RGB array ``[H, W, 3]`` (written to ``workdir`` as PNG); each magnification takes
    one or a list. DataError for an unknown magnification, an array of another shape or dtype,
    a value of another type."""
    if not given:
        raise DataError("patients", "no patient given")
    nested = [isinstance(v, Mapping) for v in given.values()]
    single = not any(nested)
    if single:
        given = {ONE_PATIENT: given}
    elif not all(nested):
        key = next(k for k, n in zip(given, nested, strict=True) if not n)
        raise DataError(
            f"patients[{key!r}]",
            "mixes named patients (mappings) with a patient's magnifications: give either "
            '{"40X": images, ...} or {name: {"40X": images, ...}, ...}',
        )
    inputs = _Inputs([], [], {}, {})
    seen: set[str] = set()
    for n, (name, patient) in enumerate(given.items()):
        key = str(name)
        if key in seen:
            raise DataError(f"patients[{name!r}]", "two patients have this name")
        seen.add(key)
        who = "patient" if single else f"patient {key}"
        images: dict[str, list[str]] = {}
        for mag_key, items in patient.items():
            mag = _magnification_key(mag_key, who)
            if mag in images:
                raise DataError(who, f"{mag} is given twice ({mag_key!r})")
            listed = items if isinstance(items, (list, tuple)) else [items]
            paths = []
            for i, item in enumerate(listed):
                label = f"{mag}[{i}]"
                path = _image_path(item, workdir / f"{n}" / f"{mag}_{i}.png", f"{who} {label}")
                if not isinstance(item, (str, Path)):
                    inputs.shown[path] = label
                paths.append(path)
            images[mag] = paths
        unused = [m for m in images if m not in magnifications]
        for mag in unused:
            _skip(
                inputs.skipped,
                f"{who} {mag}",
                f"not a magnification of this model (it reads {', '.join(magnifications)})",
            )
        _add_patient(inputs, key, "", who, images, magnifications, missing)
    _no_patient(inputs, "patients", magnifications)
    return inputs


class HistoModel:
    """A loaded histommnet model (one fold) with its preprocessing and thresholds.

    ``model``: the network in eval mode on ``device``; ``thresholds``: ``{"image", "patient"}``
    P(malignant) cut-offs; ``fold``: the cross-validation fold; ``data``: the input settings
    (magnifications, size, normalisation); ``export``: everything ``config.json`` holds.
    """

    def __init__(self, model: nn.Module, export: ModelExport, device: torch.device, source: str):
        pre = export.preprocessing
        self.model = model
        self.export = export
        self.device = device
        self.source = source
        self.kind = export.kind
        self.thresholds = {k: float(v) for k, v in export.thresholds.items()}
        self.fold = export.extras.get("fold")
        self.magnifications = list(pre["magnifications"])
        self.seed = int(pre["draw_seed"])
        self.data = DataConfig(
            magnifications=self.magnifications,
            image_size=int(pre["image_size"]),
            aspect_ratio=float(pre["aspect_ratio"]),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            interpolation=pre["interpolation"],
            missing_magnification=pre["missing_magnification"],
            eval_max_draws=pre["eval_max_draws"],
        )
        precision = export.extras.get("precision")
        self.precision = checkpoint_precision({"precision": precision} if precision else {}, device)

    def __repr__(self) -> str:
        t = self.thresholds
        return (
            f"HistoModel({self.kind}, fold {self.fold}, {'/'.join(self.magnifications)}, "
            f"thresholds image {t['image']:.4f} patient {t['patient']:.4f}, on {self.device}, "
            f"from {self.source})"
        )

    def predict(
        self,
        patients: PatientsArg,
        gradcam: bool = False,
        batch_size: int = 32,
        progress: bool = True,
    ) -> Prediction:
        """P(malignant) of each patient and of each of its draws, with the fold's thresholds.

        ``patients``: patient folders (see :func:`patient_folders` for what may be named), or
        images in memory (see :func:`given_patients`): ``{"40X": [rgb1, rgb2], "100X": rgb3}``
        for one patient (named ``patient``), ``{name: {...}, ...}`` for several; an image is a
        file path or a uint8 RGB array ``[H, W, 3]``, decoded, drawn and predicted exactly as
        the same image in a patient folder (a patient's draws are seeded by its name).

        An unreadable image is named on stderr, skipped and counted in ``skipped``; a patient
        without images at a magnification is filled from the nearest one or skipped, as the
        training run's ``data.missing_magnification`` said. ``gradcam``: also the Grad-CAM
        maps of every draw (``histommnet.gradcam.patient_cams``).
        """
        mags, missing = self.magnifications, self.data.missing_magnification
        if not isinstance(patients, Mapping):
            inputs = read_patients(patient_folders(patients), mags, missing)
            return self._predict(inputs, None, gradcam, batch_size, progress)
        with tempfile.TemporaryDirectory(prefix="histommnet-predict-") as tmp:
            inputs = given_patients(patients, mags, missing, Path(tmp) / "arrays")
            return self._predict(inputs, Path(tmp) / "store", gradcam, batch_size, progress)

    def _predict(
        self,
        inputs: _Inputs,
        store_dir: Path | None,
        gradcam: bool,
        batch_size: int,
        progress: bool,
    ) -> Prediction:
        found, skipped = inputs.patients, inputs.skipped
        paths = [p for patient in found for m in self.magnifications for p in patient.images[m]]
        images = WorkingImages(paths, self.data, progress=progress, store_dir=store_dir)
        # An image that passed the check but does not decode is replaced by another of its
        # magnification (WorkingImages names it), as in evaluation; with none left, the
        # patient cannot be predicted.
        for patient in list(found):
            lost = [m for m in self.magnifications if set(patient.images[m]) <= images.bad]
            if lost:
                _skip(
                    skipped,
                    inputs.who[patient.key],
                    f"no decodable image at {', '.join(lost)}",
                )
                found.remove(patient)
        if not found:
            names = [folder or key for key, folder in inputs.where.items()]
            raise DataError(", ".join(names[:3]), "no patient with decodable images")
        options = PredictOptions(
            self.device, self.precision, batch_size, num_workers=0, shard=False
        )
        draws, rows, cams = [], [], {}
        for patient in tqdm(found, desc="patients", disable=not progress or len(found) < 2):
            ds = MultiMagDataset([patient], self.data, train=False, seed=self.seed, images=images)
            frame = predict_draws(self.model, ds, options)
            frame["draw"] = range(len(frame))
            for j, mag in enumerate(self.magnifications):
                frame[f"image_{mag}"] = [inputs.shown.get(p[j], p[j]) for _, p in ds.draws]
            draws.append(frame)
            used = {p for m in self.magnifications for p in patient.images[m]}
            rows.append(
                {
                    "patient": patient.key,
                    "images": len(used),
                    "filled": ", ".join(f"{m} from {s}" for m, s in patient.filled_from.items()),
                    "folder": inputs.where[patient.key],
                }
            )
            if gradcam:
                cams[patient.key] = self._cams(ds, frame["prob_malignant"].to_numpy())
        per_draw = pd.concat(draws, ignore_index=True)
        means = patient_table(per_draw).set_index("patient")
        table = pd.DataFrame(rows)
        table.insert(1, "prob_malignant", means.loc[table["patient"], "prob_malignant"].to_numpy())
        table.insert(2, "predicted", self._classes(table["prob_malignant"], "patient"))
        table.insert(3, "threshold", self.thresholds["patient"])
        table.insert(5, "draws", means.loc[table["patient"], "draws"].to_numpy())
        per_draw["predicted"] = self._classes(per_draw["prob_malignant"], "image")
        per_draw["threshold"] = self.thresholds["image"]
        head = ["patient", "draw", "prob_malignant", "predicted", "threshold"]
        mags = [f"image_{m}" for m in self.magnifications]
        tail = [c for c in ("logit_benign", "logit_malignant", "subtype_pred") if c in per_draw]
        per_draw = per_draw[head + mags + tail]
        if skipped:
            print(
                f"skipped {len(skipped)} item(s); predicted {len(found)} patient(s)",
                file=sys.stderr,
            )
        return Prediction(table, per_draw, skipped, cams)

    def _classes(self, probs: pd.Series, level: str) -> list[str]:
        return [CLASSES[int(p >= self.thresholds[level])] for p in probs]

    def _cams(self, ds: MultiMagDataset, probs: np.ndarray) -> np.ndarray:
        """Grad-CAM maps of every draw of a one-patient dataset, for its predicted class."""
        from histommnet.gradcam import patient_cams

        maps = []
        for i, prob in enumerate(probs):
            images = ds.model_input(ds[i]["images"].unsqueeze(0)).to(self.device)
            cam, _, _ = patient_cams(
                self.model, images, None, self.thresholds["image"], float(prob)
            )
            maps.append(cam)
        return np.stack(maps)


def load(source: str | Path, device: str = "auto", fold: int | None = None) -> HistoModel:
    """A histommnet model from ``source``: a run directory (its best fold, or ``fold``), a
    checkpoint (``fold_<i>_best.pth``), an exported folder (``histommnet-export``) or
    ``hf-hub:ORG/NAME[@REV]`` (from the Hugging Face cache; fetched only when online).

    Raises ``medcore.weights.sources.ModelSourceError`` (a ``UserError``) for a source that is
    not a histommnet model: another package's, a weights file without its ``config.json``, an
    untested fold without thresholds.
    """
    if fold is not None and not Path(str(source)).is_dir():
        raise UserError("fold", f"applies to a run directory; {source} is not one")
    read = read_model_source(source, KINDS, find_in_run=lambda run: find_in_run(run, fold))
    if fold is not None and read.exported:
        raise UserError("fold", f"applies to a run directory; {source} is an exported model")
    export = model_export(read, lambda found: describe(found, card=False))
    state = {**export.checkpoint(), "magnifications": export.preprocessing["magnifications"]}
    where = resolve_device(device)
    model, _ = load_model(read.path, KINDS, build_from_checkpoint, device=where, state=state)
    return HistoModel(model, export, where, str(source))


__all__ = ["HistoModel", "Prediction", "given_patients", "load", "patient_folders"]
