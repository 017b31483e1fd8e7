"""``ctclip.load``: a trained model applied to raw CT volumes in Python.

``load(source)`` reads a run directory (its best checkpoint, see :mod:`ctclip.export`), a
checkpoint (``.pt``), an exported folder or ``hf-hub:ORG/NAME[@REV]`` and returns a
:class:`CTClipModel` in eval mode with its preprocessing attached:

- ``zero_shot(volumes, findings=None)``: a table volumes x findings of P(present), for the
  model's findings or any other names;
- ``encode_volumes(volumes)`` / ``encode_text(texts)``: the L2-normalised embeddings the model
  compares.

``volumes``: a NIfTI file, a DICOM series folder, an array in HU with its voxel spacing
(``(array, (z, y, x) mm)``, array axes in the canonical orientation of
:mod:`medcore.volumes.reader`), a :class:`medcore.volumes.geometry.Volume`, a list of these, or
a dict name -> one of these. A path is named by its stem (``scan.nii.gz`` -> ``scan``, a folder
by its name), an array ``volume_<i>``.

One code path with ``ctclip-preprocess`` and ``ctclip-eval``: a volume becomes the uint8 array
``ctclip-preprocess`` would store, with the settings of the store the model was trained on (a
NIfTI file through :func:`ctclip.preprocess.preprocess_volume` itself; DICOM series, read by
medcore's reader, and arrays through the same HU reading, resampling, window and padding), and
the probabilities are :func:`ctclip.predict.zero_shot_probs` of ``CTCLIP.encode_volume`` and
:func:`ctclip.predict.prompt_features`, in the checkpoint's training precision. HU: the NIfTI
as it reads (header scaling), unless a CT-RATE metadata table is given (``metadata=``, with
``hu_source`` as ``ctclip-preprocess --hu-source``); DICOM: each slice's RescaleSlope/Intercept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ctclip.config import HU_SOURCES
from ctclip.export import (
    PREPROCESSING_KEYS,
    describe,
    find_in_run,
    prompt_templates,
    tokenizer_identity,
)
from ctclip.findings import prompt_pairs
from ctclip.model import CTCLIP, KIND, build_model, checkpoint_config
from ctclip.predict import prompt_features, zero_shot_probs
from ctclip.preprocess import (
    HU_MIN_SCORE,
    HU_RANGE,
    SOURCE_NAMES,
    HUReading,
    VolumeMeta,
    hu_reading,
    hu_record,
    hu_to_uint8,
    preprocess_volume,
    read_metadata,
    reading_rescale,
    resample_hu,
    unusable_meta,
)
from ctclip.text import Tokenizer
from medcore.engine import inference
from medcore.errors import DataError, UserError
from medcore.runtime.device import autocast, resolve_device
from medcore.volumes.dicom import read_dicom_stored
from medcore.volumes.geometry import (
    CANONICAL_AXCODES,
    StoredVolume,
    Volume,
    center_in_box,
    first_line,
)
from medcore.volumes.nifti import NIFTI_SUFFIXES
from medcore.weights.export import ModelExport
from medcore.weights.sources import ModelSourceError, model_export, read_model_source

VolumeInput = str | os.PathLike | tuple[np.ndarray, Sequence[float]] | Volume


class FindingError(UserError):
    """A finding that cannot be asked about: an empty name, not text, repeated, or a prompt
    longer than the text tower's context (it would be cut and lose its "not")."""


def load(source: str | os.PathLike, device: str | torch.device = "auto") -> CTClipModel:
    """The ctclip model of ``source`` (a run directory, a ``.pt`` checkpoint, an exported folder
    or ``hf-hub:ORG/NAME[@REV]``) on ``device`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    A source that is not a ctclip model is a :class:`medcore.weights.sources.ModelSourceError`.
    """
    read = read_model_source(source, KIND, find_in_run=find_in_run)
    export = model_export(read, describe)
    check_export(export, str(source))
    target = resolve_device(device)
    model, _ = inference.load_model(
        read.path,
        KIND,
        lambda state: build_model(checkpoint_config(state), load_weights=False),
        device=target,
        state=export.checkpoint(),
    )
    return CTClipModel(model, export, target)  # type: ignore[arg-type]


def check_export(export: ModelExport, source: str) -> None:
    """What this ctclip builds must be what the model was trained with: the preprocessing
    window and orientation, the prompt templates and the tokenizer's vocabulary."""
    pre = export.preprocessing
    missing = [key for key in PREPROCESSING_KEYS if key not in pre]
    if missing:
        raise ModelSourceError(source, f"config.json preprocessing lacks {', '.join(missing)}")
    ours = {"hu_range": list(HU_RANGE), "orientation": "".join(CANONICAL_AXCODES)}
    for key, value in ours.items():
        if pre[key] != value:
            raise ModelSourceError(
                source,
                f"trained on volumes with {key} {pre[key]}; this ctclip preprocesses with {value}",
            )
    templates = export.extras.get("prompt_templates")
    if templates != prompt_templates():
        raise ModelSourceError(
            source, f"built its prompts with {templates}; this ctclip builds {prompt_templates()}"
        )
    tokenizer = export.extras.get("tokenizer") or {}
    vocabulary = tokenizer_identity(1)["vocabulary"]
    if tokenizer.get("vocabulary") != vocabulary:
        raise ModelSourceError(
            source,
            f"its text was tokenized with {tokenizer.get('vocabulary')}; the installed open_clip "
            f"ships {vocabulary}",
        )
    if not export.labels:
        raise ModelSourceError(source, "names no findings")


# -- volumes ---------------------------------------------------------------------------------


def volume_label(item: Any, index: int) -> str:
    """The name of one input: a file's name without .nii/.nii.gz, a folder's name, else
    ``volume_<index>``."""
    if isinstance(item, (str, os.PathLike)):
        name = Path(item).name
        for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
        return name
    return f"volume_{index}"


def _is_single(volumes: Any) -> bool:
    if isinstance(volumes, (str, os.PathLike, Volume, np.ndarray, torch.Tensor)):
        return True
    return (
        isinstance(volumes, tuple)
        and len(volumes) == 2
        and isinstance(volumes[0], (np.ndarray, torch.Tensor))
    )


def named_volumes(volumes: Any) -> list[tuple[str, Any]]:
    """``(name, volume)`` of every input, in order; two inputs of one name are refused."""
    if isinstance(volumes, Mapping):
        items = [(str(k), v) for k, v in volumes.items()]
    else:
        listed = [volumes] if _is_single(volumes) else list(volumes)
        items = [(volume_label(v, i), v) for i, v in enumerate(listed)]
    if not items:
        raise DataError("volumes", "none given")
    names = [name for name, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            repeated[0],
            f"names {names.count(repeated[0])} of the volumes (file and folder names must "
            "differ; pass a dict of names)",
        )
    return items


def _canonical_affine(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """The affine of an array already in the canonical orientation: index (z, y, x) steps
    superior, posterior and to the left (RAS+ mm)."""
    sz, sy, sx = spacing_zyx
    return np.array([[0, 0, -sx, 0], [0, -sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _array_volume(name: str, item: Any) -> StoredVolume:
    if isinstance(item, Volume):
        meta = {**item.meta, "path": item.meta.get("path", name)}
        return StoredVolume(
            item.voxels, 1.0, 0.0, item.affine, item.spacing, item.source_axcodes, meta
        )
    if not isinstance(item, tuple):
        raise DataError(name, "an array needs its voxel spacing: pass (array, (z, y, x) mm)")
    array, spacing = item
    array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.ndim != 3:
        raise DataError(name, f"expected a 3-D array [z, y, x] in HU, got shape {array.shape}")
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(name, f"voxel spacing {spacing} is not three positive sizes (z, y, x) mm")
    return StoredVolume.canonical(array, _canonical_affine(spacing), 1.0, 0.0, {"path": name})


@dataclass
class Preprocessor:
    """One input -> the uint8 ``[D, H, W]`` volume ``ctclip-preprocess`` would store.

    ``metadata``: CT-RATE metadata rows by VolumeName (a NIfTI file's name, a DICOM folder's
    name, an array's name); with it, a volume it does not list is refused, as
    ``ctclip-preprocess`` skips it. ``hu_source``: as ``ctclip-preprocess --hu-source``.
    """

    target_shape: tuple[int, int, int]
    slide_b2u: bool
    hu_source: str = "auto"
    metadata: dict[str, VolumeMeta] | None = None

    def __post_init__(self) -> None:
        if self.hu_source not in HU_SOURCES:
            raise UserError(
                "hu_source", f"{self.hu_source!r} is not one of {', '.join(HU_SOURCES)}"
            )
        if self.hu_source == "metadata" and self.metadata is None:
            raise UserError("hu_source", "metadata needs the metadata table (metadata=CSV)")

    def meta(self, key: str, what: str | Path) -> VolumeMeta | None:
        if self.metadata is None:
            return None
        meta = self.metadata.get(key)
        if meta is None:
            raise DataError(what, "not in the metadata CSV (slope/intercept and spacing unknown)")
        why = unusable_meta(meta, self.hu_source)
        if why:
            raise DataError(what, f"{why} in {meta.source}")
        return meta

    def __call__(self, name: str, item: Any) -> np.ndarray:
        target = self.target_shape
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                stored = read_dicom_stored(path)
                return self.stored(stored, self.meta(path.name, path), path)
            if not path.exists():
                raise DataError(path, "not found")
            if not path.name.endswith(NIFTI_SUFFIXES):
                raise DataError(path, "neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder")
            meta = self.meta(path.name, path)
            volume, attrs = preprocess_volume(path, meta, target, self.slide_b2u, self.hu_source)
            _warn_if_not_hu(name, hu_record(attrs))
            return volume
        return self.stored(_array_volume(name, item), self.meta(name, name), name)

    def stored(self, stored: StoredVolume, meta: VolumeMeta | None, what: str | Path) -> np.ndarray:
        """The steps of :func:`ctclip.preprocess.preprocess_volume` after its NIfTI read."""
        if stored.stored.dtype.kind == "f" and not np.isfinite(stored.stored).all():
            raise DataError(what, "contains NaN or infinite values")
        reading = hu_reading(stored, meta.rescale if meta is not None else None, self.hu_source)
        _warn_if_not_hu(Path(str(what)).name, reading)
        spacing = meta.spacing_zyx if meta is not None and meta.spacing_zyx else stored.spacing
        if not all(np.isfinite(v) and v > 0 for v in spacing):
            raise DataError(
                what, f"voxel size {tuple(float(v) for v in spacing)} mm (z y x) is not positive"
            )
        resized, _ = resample_hu(
            stored, reading_rescale(reading, stored), spacing, self.target_shape, self.slide_b2u
        )
        return center_in_box(hu_to_uint8(resized), self.target_shape, 0)[0]


def _warn_if_not_hu(name: str, reading: HUReading) -> None:
    """The warning ``ctclip-preprocess`` writes for a volume without air and soft tissue in
    place (a wrong reading: raw stored values, or HU rescaled twice)."""
    if reading.evidence.score < HU_MIN_SCORE:
        tqdm.write(
            f"warning: {name}: read as HU from {SOURCE_NAMES[reading.source]}, but "
            f"{reading.evidence} (not a body CT in HU?)",
            file=sys.stderr,
        )


class RawVolumes(Dataset):
    """The inputs preprocessed one by one (in DataLoader workers); an input that cannot be read
    gives an empty volume and its reason in ``error``."""

    def __init__(self, items: list[tuple[str, Any]], preprocess: Preprocessor) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, item = self.items[index]
        error = ""
        try:
            volume = torch.from_numpy(self.preprocess(name, item))
        except DataError as exc:
            error = exc.why
        except (
            Exception
        ) as exc:  # a reader's own error on a corrupt file: named, as preprocess does
            error = f"{type(exc).__name__}: {first_line(exc)}"
        if error:
            volume = torch.zeros(self.preprocess.target_shape, dtype=torch.uint8)
        return {"index": index, "volume": volume, "error": error}


# -- the model -------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What :meth:`CTClipModel.predict` returns: the volumes predicted (input order), their
    P(present) table (volumes x findings), their embeddings ``[n, e]`` and the inputs skipped
    (name -> why)."""

    names: list[str]
    probabilities: pd.DataFrame
    embeddings: torch.Tensor
    skipped: dict[str, str] = field(default_factory=dict)


class CTClipModel:
    """A loaded ctclip model (eval mode) with the preprocessing it was trained with.

    ``findings``: the model's finding names (the default of :meth:`zero_shot`);
    ``preprocessing``: the settings of config.json (target shape, slice order, HU window);
    ``model``: the :class:`ctclip.model.CTCLIP` module; ``config``: the export's config.json.
    """

    def __init__(self, model: CTCLIP, export: ModelExport, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.config = export.config()
        self.findings: tuple[str, ...] = tuple(export.labels)
        self.preprocessing = dict(export.preprocessing)
        precision = export.extras.get("precision")
        self.precision = inference.checkpoint_precision(
            {"precision": precision} if precision else {}, device
        )
        self.tokenizer = Tokenizer(model.context_length)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.preprocessing["target_shape"]))
        return (
            f"CTClipModel({len(self.findings)} findings, volumes {shape}, "
            f"{self.model.visual.proj.out_features}-d embeddings, {self.device})"
        )

    def preprocessor(self, hu_source: str = "auto", metadata: Any = None) -> Preprocessor:
        """The :class:`Preprocessor` of this model; ``metadata``: CT-RATE metadata CSV path(s)."""
        if metadata is not None and not isinstance(metadata, Mapping):
            paths = [metadata] if isinstance(metadata, (str, os.PathLike)) else list(metadata)
            metadata = read_metadata([Path(p) for p in paths])
        pre = self.preprocessing
        return Preprocessor(
            tuple(int(v) for v in pre["target_shape"]),
            bool(pre["slide_b2u"]),
            hu_source,
            dict(metadata) if metadata is not None else None,
        )

    def preprocess(
        self, volume: VolumeInput, *, hu_source: str = "auto", metadata: Any = None
    ) -> np.ndarray:
        """One input as the uint8 ``[D, H, W]`` volume the model sees."""
        ((name, item),) = named_volumes([volume])
        return self.preprocessor(hu_source, metadata)(name, item)

    def check_findings(
        self, findings: str | Sequence[str] | None, what: str = "findings"
    ) -> tuple[str, ...]:
        """The finding names to ask about (None: the model's), each checked (:class:`FindingError`)."""
        if findings is None:
            return self.findings
        names = [findings] if isinstance(findings, str) else list(findings)
        if not names:
            raise FindingError(what, "no finding named")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise FindingError(what, f"{name!r} is not a finding name (empty or not text)")
        names = [name.strip() for name in names]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise FindingError(what, f"{repeated[0]!r} is named twice")
        limit = self.tokenizer.context_length
        for name in names:
            for prompt in prompt_pairs([name])[0]:
                n = self.tokenizer.length(prompt)
                if n > limit:
                    raise FindingError(
                        what,
                        f"{name!r}: its prompt {prompt!r} is {n} tokens; the model's text "
                        f"context holds {limit}",
                    )
        return tuple(names)

    def predict(
        self,
        volumes: Any,
        findings: str | Sequence[str] | None = None,
        *,
        hu_source: str = "auto",
        metadata: Any = None,
        skip_unreadable: bool = False,
        batch_size: int = 4,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> Prediction:
        """Embeddings and zero-shot probabilities of ``volumes`` (see the module docstring).

        An input that cannot be read is a :class:`medcore.errors.DataError`; with
        ``skip_unreadable`` it is named on stderr, left out and listed in ``skipped``.
        ``num_workers``: DataLoader processes preprocessing the volumes (None: the device's
        default).
        """
        return self._run(
            volumes,
            self.check_findings(findings),
            hu_source=hu_source,
            metadata=metadata,
            skip_unreadable=skip_unreadable,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )

    def _run(
        self,
        volumes: Any,
        asked: tuple[str, ...],
        *,
        hu_source: str = "auto",
        metadata: Any = None,
        skip_unreadable: bool = False,
        batch_size: int = 4,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> Prediction:
        """:meth:`predict` for checked finding names (none: embeddings only)."""
        items = named_volumes(volumes)
        data = RawVolumes(items, self.preprocessor(hu_source, metadata))
        skipped: dict[str, str] = {}

        def forward(model: CTCLIP, batch: dict[str, Any]) -> dict[str, Any]:
            ok = [not e for e in batch["error"]]
            for index, error in zip(batch["index"].tolist(), batch["error"], strict=True):
                if not error:
                    continue
                name = items[index][0]
                if not skip_unreadable:
                    raise DataError(name, error)
                skipped[name] = error
                tqdm.write(f"skipped {name}: {error}", file=sys.stderr)
            keep = torch.tensor(ok, dtype=torch.bool, device=batch["volume"].device)
            dim = model.visual.proj.out_features
            feats = (
                model.encode_volume(batch["volume"][keep]).float()
                if any(ok)
                else torch.empty(0, dim, device=batch["volume"].device)
            )
            return {"index": batch["index"][keep], "features": feats}

        options = inference.PredictOptions(
            self.device,
            self.precision,
            batch_size,
            num_workers,
            shard=False,
            desc="ctclip" if progress else None,
        )
        out = inference.predict(self.model, data, forward, options)
        features = out["features"]
        names = [items[i][0] for i in out["index"].tolist()]
        probs = torch.empty(len(names), len(asked))
        if asked and len(names):
            with torch.inference_mode(), autocast(self.device, self.precision):
                prompts = prompt_features(self.model, self.tokenizer, asked, self.device).cpu()
            scale = self.model.scale().detach().float().cpu()
            probs = zero_shot_probs(features, prompts, scale)
        table = pd.DataFrame(
            probs.numpy(), index=pd.Index(names, name="volume"), columns=list(asked)
        )
        return Prediction(names, table, features, skipped)

    def zero_shot(
        self, volumes: Any, findings: str | Sequence[str] | None = None, **options: Any
    ) -> pd.DataFrame:
        """P(finding present) of each volume: a DataFrame volumes x findings (the model's
        findings, or any names; see :meth:`predict` for ``options``)."""
        return self.predict(volumes, findings, **options).probabilities

    def encode_volumes(self, volumes: Any, **options: Any) -> torch.Tensor:
        """L2-normalised volume embeddings ``[n, e]``, in input order (rows of
        ``zero_shot``'s index; see :meth:`predict` for ``options``, ``skip_unreadable`` aside)."""
        if options.get("skip_unreadable"):
            raise TypeError("encode_volumes keeps every row: use predict(skip_unreadable=True)")
        return self._run(volumes, (), **options).embeddings

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[n, e]``; a text longer than the model's context is
        truncated as in training (keeping its end token), and counted on stderr."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("texts", "expected one or more strings")
        limit = self.tokenizer.context_length
        long = sum(self.tokenizer.length(t) > limit for t in texts)
        if long:
            print(
                f"note: {long} of {len(texts)} texts exceed the model's {limit}-token context "
                "and are truncated (as in training)",
                file=sys.stderr,
            )
        tokens = self.tokenizer(texts).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.model.encode_text(tokens).float().cpu()
