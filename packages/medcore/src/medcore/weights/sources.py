"""Where a trained model comes from: a run, a checkpoint, an exported folder or a hub name.

:func:`read_model_source` reads any of them into one :class:`ModelSource` (the tensors, the
config, where they came from), checking that it is a model of the caller's package:

- a run directory: the package's ``find_in_run`` names the checkpoint that is the run's model
  (:func:`checkpoint_in_run` finds one by name patterns, e.g. best, then final);
- a checkpoint (``.pt``) written by medcore's trainer: read with ``weights_only=True``; its
  ``model`` are the tensors, its other entries (``model_config``, ``kind``, ...) the config;
- an exported folder (:mod:`medcore.weights.export`), or its ``model.safetensors`` with the
  ``config.json`` beside it;
- ``hf-hub:ORG/NAME[@REV]``: an export in the Hugging Face cache, through the resolver of
  :mod:`medcore.weights.pretrained` (downloaded only when online and ``HF_HUB_OFFLINE`` is unset).

A source of another package or model, a weights file without its config, a folder with neither
an export nor a run's checkpoint, and an export in a newer format are refused with a one-line
:class:`ModelSourceError` (commands exit 2; Python callers get the exception).
:func:`model_export` gives every source the exported form, so a package's ``load`` has one path.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from medcore.errors import CheckpointError
from medcore.io import json_default
from medcore.weights.checkpoint import load_checkpoint
from medcore.weights.export import (
    CONFIG_FILE,
    EXTRA_PREFIX,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ModelExport,
)
from medcore.weights.pretrained import HUB_PREFIX, read_json_object, resolve_weights

Origin = Literal["run", "checkpoint", "export", "hub"]
Kinds = str | Collection[str]
# How many folders above a checkpoint its run directory (the one holding config.yaml) may be:
# <run>/checkpoints/best.pt, or <run>/<stage>/checkpoints/best.pt of a staged run.
_RUN_DEPTH = 3
_JSON_PARTS = ("preprocessing", "labels", "thresholds", "extras")


class ModelSourceError(CheckpointError):
    """A source that is not a model of the caller's package: another package's or model's, a
    weights file without its config, a folder with neither an export nor a run, a newer format."""


@dataclass(frozen=True)
class ModelSource:
    """A model read from a source, before any module is built.

    ``tensors`` are the model's weights by state-dict name. ``config`` is the ``config.json`` of
    an export, or the entries of a checkpoint other than its weights (``kind``,
    ``model_config``, ``history`` ...); both have ``kind`` and ``model_config`` at the top.
    ``origin`` says which kind of source it was, ``source`` what the caller named, ``path`` the
    local weights file read (a hub name's file in the cache). ``run_dir``: the run directory the
    model was trained in, when known (the card's data and metrics come from there).
    ``extra_tensors``: an export's extra arrays, by name.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    origin: Origin
    source: str
    path: Path
    run_dir: Path | None = None
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def exported(self) -> bool:
        """Whether this is an exported model (a folder, its files or a hub name)."""
        return self.origin in ("export", "hub")

    @property
    def model_config(self) -> dict[str, Any]:
        return self.config["model_config"]

    def checkpoint(self) -> dict[str, Any]:
        """A medcore checkpoint dict (``kind``, ``model``, ``model_config`` ...), for
        :func:`medcore.engine.inference.load_model`'s ``state``."""
        return {**self.config, "model": self.tensors}

    def as_export(self) -> ModelExport:
        """The :class:`ModelExport` an exported source was written from (without its card)."""
        if not self.exported:
            raise ValueError(f"{self.source}: a {self.origin}, not an export")
        c = self.config
        return ModelExport(
            kind=self.kind,
            package=str(c.get("package", "")),
            model_config=c["model_config"],
            tensors=self.tensors,
            preprocessing=dict(c.get("preprocessing") or {}),
            labels=list(c.get("labels") or []),
            thresholds=dict(c.get("thresholds") or {}),
            extras=dict(c.get("extras") or {}),
            extra_tensors=self.extra_tensors,
            package_version=str(c.get("package_version", "")),
            exported_from=str(c.get("exported_from", "")),
        )


FindInRun = Callable[[Path], Path | None]
Describe = Callable[[ModelSource], ModelExport]


def kind_matches(found: str, kind: Kinds) -> bool:
    """Whether the model identity ``found`` is one of ``kind``: exact kinds or prefixes ending
    in ``.`` (``"ctclip."``), one or a collection."""
    kinds = [kind] if isinstance(kind, str) else list(kind)
    return any(found.startswith(k) if k.endswith(".") else found == k for k in kinds)


def _wanted(kind: Kinds) -> str:
    kinds = [kind] if isinstance(kind, str) else sorted(kind)
    return " or ".join(k.rstrip(".") for k in kinds)


def _package(kind: Kinds) -> str:
    first = kind if isinstance(kind, str) else sorted(kind)[0]
    return first.split(".")[0]


def checkpoint_in_run(run_dir: str | Path, patterns: Sequence[str]) -> Path | None:
    """The first of ``patterns`` (glob patterns relative to ``run_dir``, in order of preference,
    e.g. ``("checkpoints/best*.pt", "checkpoints/final.pt")``) that names a file; None when
    none does. A pattern matching several files is a one-line CheckpointError."""
    run_dir = Path(run_dir)
    for pattern in patterns:
        found = sorted(p for p in run_dir.glob(pattern) if p.is_file())
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(run_dir)) for p in found[:3])
            raise CheckpointError(
                run_dir, f"several checkpoints match {pattern} ({names}): name one"
            )
        if found:
            return found[0]
    return None


def read_model_source(
    source: str | Path, kind: Kinds, *, find_in_run: FindInRun | None = None
) -> ModelSource:
    """Read the model ``source`` names and check that it is a ``kind`` model.

    ``kind``: an exact kind, a prefix ending in ``.`` or a collection of these (as
    :func:`medcore.engine.inference.load_model` takes). ``find_in_run(run_dir)``: the checkpoint
    that is a run directory's model, or None when the folder holds none; without it a folder
    must be an export.
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        resolved = resolve_weights(text, files=(WEIGHTS_FILE,))
        return _read_export(resolved.path.parent, kind, text, "hub", resolved.path)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
            return _read_export(path, kind, text, "export")
        found = find_in_run(path) if find_in_run is not None else None
        if found is None:
            run = " nor a run directory with a checkpoint" if find_in_run is not None else ""
            raise ModelSourceError(
                text, f"neither an exported model folder ({CONFIG_FILE} + {WEIGHTS_FILE}){run}"
            )
        read = _read_file(Path(found), kind, text)
        if read.exported:  # the run's model is an export already: read as one
            return read
        return dataclasses.replace(read, origin="run", run_dir=path.absolute())
    if not path.is_file():
        raise CheckpointError(
            text,
            "not found (expected a run directory, a checkpoint, an exported model folder or "
            "hf-hub:ORG/NAME)",
        )
    return _read_file(path, kind, text)


def model_export(source: ModelSource, describe: Describe) -> ModelExport:
    """The exported form of any source: an export as it was written, a run or checkpoint
    through the package's ``describe`` (its export function), so that a package's ``load``
    reads every source through one path."""
    if source.exported:
        return source.as_export()
    export = describe(source)
    if export.kind != source.kind:
        raise ValueError(f"describe() of a {source.kind} source returned a {export.kind} export")
    # The values as config.json holds them (tuples as lists, numpy numbers as floats ...), so
    # that a model loaded from its run and from its export are given the same settings.
    as_json = json.loads(json.dumps(export.config(), default=json_default))
    return dataclasses.replace(export, **{f: as_json[f] for f in ("model_config", *_JSON_PARTS)})


def _run_dir_of(checkpoint: Path) -> Path | None:
    for folder in list(checkpoint.absolute().parents)[:_RUN_DEPTH]:
        if (folder / "config.yaml").is_file():
            return folder
    return None


def _read_file(path: Path, kind: Kinds, source: str) -> ModelSource:
    if path.suffix == ".safetensors":
        if (path.parent / CONFIG_FILE).is_file():
            return _read_export(path.parent, kind, source, "export", path)
        found = _safetensors_metadata(path).get("kind")
        if found and not kind_matches(found, kind):
            raise ModelSourceError(source, f"this is a {found} export, not {_wanted(kind)}")
        raise ModelSourceError(source, _bare(kind))
    state = load_checkpoint(path, map_location="cpu")
    found = str(state.get("kind") or "")
    if not kind_matches(found, kind):
        what = f"a {found}" if found else "an unlabelled"
        raise ModelSourceError(source, f"this is {what} checkpoint, not {_wanted(kind)}")
    weights = state.get("model")
    if not isinstance(weights, dict) or not weights:
        raise ModelSourceError(source, "holds no model weights")
    if not isinstance(state.get("model_config"), dict):
        raise ModelSourceError(source, "has no model_config to rebuild the model from")
    config = {k: v for k, v in state.items() if k != "model"}
    return ModelSource(
        found, dict(weights), config, "checkpoint", source, path, run_dir=_run_dir_of(path)
    )


def _bare(kind: Kinds) -> str:
    package = _package(kind)
    return (
        f"a weights file without its {CONFIG_FILE}: not loadable as a {package} model (pass the "
        f"run directory or its .pt checkpoint, or an exported folder: {package}-export)"
    )


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({str(exc)[:120]})") from None


def _read_export(
    folder: Path, kind: Kinds, source: str, origin: Origin, weights: Path | None = None
) -> ModelSource:
    weights = weights or folder / WEIGHTS_FILE
    if not (folder / CONFIG_FILE).is_file():
        raise ModelSourceError(source, _bare(kind))
    config = read_json_object(folder / CONFIG_FILE)
    if not {"kind", "format_version", "model_config"} <= config.keys():
        named = (
            f" it names architecture {config['architecture']}:" if "architecture" in config else ""
        )
        raise ModelSourceError(
            source,
            f"{CONFIG_FILE} is not a {_package(kind)}-export config (it has no kind, "
            f"format_version and model_config;{named} weights of another library)",
        )
    version = config["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        by = f" by {config.get('package', '?')} {config.get('package_version', '?')}"
        raise ModelSourceError(
            source,
            f"exported in format version {version}{by}; this medcore reads versions up to "
            f"{FORMAT_VERSION}: upgrade medcore and {_package(kind)}",
        )
    found = str(config["kind"])
    if not kind_matches(found, kind):
        raise ModelSourceError(source, f"this is a {found} export, not {_wanted(kind)}")
    if not weights.is_file():
        raise ModelSourceError(source, f"{CONFIG_FILE} without the {WEIGHTS_FILE} beside it")
    stamped = _safetensors_metadata(weights).get("kind")
    if stamped and stamped != found:
        raise ModelSourceError(
            source, f"{weights.name} holds a {stamped} export but {CONFIG_FILE} describes {found}"
        )
    tensors = load_checkpoint(weights)["model"]
    extras = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    named = set(config.get("extra_tensors") or [])
    if named != set(extras):
        raise ModelSourceError(
            source,
            f"{weights.name} and {CONFIG_FILE} disagree on the extra arrays "
            f"({', '.join(sorted(named ^ set(extras))[:3])})",
        )
    model = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    return ModelSource(found, model, config, origin, source, weights, extra_tensors=extras)
