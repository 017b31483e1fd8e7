"""Exported models: a folder in the Hugging Face model-repository layout, and its upload.

An exported folder holds three files:

- ``model.safetensors``: the model's tensors under their state-dict names, then the package's
  large extra arrays (a retrieval gallery's embeddings ...) under ``extras/<name>``; the header
  metadata names the ``kind``, ``package`` and ``format_version``.
- ``config.json``: ``kind`` (e.g. ``"cxrlandmarks.ResNetLandmarkRegressor"``), ``package``,
  ``package_version``, ``medcore_version``, ``format_version`` (:data:`FORMAT_VERSION`),
  ``model_config`` (what rebuilds the model), ``preprocessing`` (normalisation mean/std, input
  size, interpolation, orientation, HU window ...: whatever the package's transforms read),
  ``labels`` (the names of the model's outputs, in output order: classes, findings, landmarks),
  ``thresholds`` (decision thresholds by name), ``extras`` (other JSON values, e.g. a gallery's
  labels), ``extra_tensors`` (the names of the extra arrays in ``model.safetensors``) and
  ``exported_from`` (the checkpoint's file name).
- ``README.md``: the model card (:mod:`medcore.report.model_card`).

:func:`write_export` writes the folder atomically; :func:`push_to_hub` uploads it.
:mod:`medcore.weights.sources` reads it back (a folder, ``model.safetensors`` beside its
``config.json``, or ``hf-hub:ORG/NAME``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from medcore.errors import CheckpointError, UserError
from medcore.io import RunLock, atomic_write_json, atomic_write_text, json_default
from medcore.report.model_card import CardFile, ModelCard, render_card
from medcore.weights.checkpoint import export_safetensors

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
EXTRA_PREFIX = "extras/"
LOGIN = (
    "log in with `hf auth login` (`huggingface-cli login` in older huggingface_hub) or set HF_TOKEN"
)


@dataclass
class ModelExport:
    """Everything an exported folder holds; a package's export function returns one.

    See the module docstring for the meaning of each field in ``config.json``.
    ``package_version`` defaults to the installed version of ``package``. ``card`` is None for
    a model read back from an export (its card stays in its ``README.md``).
    """

    kind: str
    package: str
    model_config: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    extra_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    card: ModelCard | None = None
    package_version: str = ""
    exported_from: str = ""

    def config(self) -> dict[str, Any]:
        """The ``config.json`` of this export."""
        return {
            "kind": self.kind,
            "package": self.package,
            "package_version": self.package_version or _installed_version(self.package),
            "medcore_version": _installed_version("medcore"),
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config,
            "preprocessing": self.preprocessing,
            "labels": list(self.labels),
            "thresholds": dict(self.thresholds),
            "extras": self.extras,
            "extra_tensors": sorted(self.extra_tensors),
            "exported_from": self.exported_from,
        }

    def checkpoint(self) -> dict[str, Any]:
        """The export as a medcore checkpoint dict (``kind``, ``model``, ``model_config`` and the
        other config.json entries), for :func:`medcore.engine.inference.load_model`'s ``state``."""
        return {**self.config(), "model": dict(self.tensors)}

    def safetensors_metadata(self) -> dict[str, str]:
        # "format": "pt" is what transformers and the hub's file viewer expect of a torch file.
        return {
            "format": "pt",
            "kind": self.kind,
            "package": self.package,
            "format_version": str(FORMAT_VERSION),
        }


def _installed_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # a source tree run without installation
        return "0.0.0"


def _check(export: ModelExport) -> dict[str, torch.Tensor]:
    """The tensors to write (the model's, then the extras under their prefix); a malformed
    export is a programming error of the package, a ValueError."""
    clash = [k for k in export.tensors if k.startswith(EXTRA_PREFIX)]
    if clash:
        raise ValueError(f"model tensor names may not start with {EXTRA_PREFIX!r}: {clash[:3]}")
    if not export.tensors:
        raise ValueError(f"{export.kind}: an export needs the model's tensors")
    if not all(isinstance(x, str) for x in export.labels):
        raise ValueError("labels must be strings (the names of the model's outputs)")
    # NaN/inf are not JSON: a config.json with them is unreadable to the hub and to browsers.
    json.dumps(export.config(), allow_nan=False, default=json_default)
    return {**export.tensors, **{EXTRA_PREFIX + k: v for k, v in export.extra_tensors.items()}}


def _previous_export(target: Path) -> dict[str, Any] | None:
    """The config.json of an export already at ``target`` (None: not an export)."""
    try:
        config = json.loads((target / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(config, dict) and {"kind", "format_version"} <= config.keys():
        return config
    return None


def _check_target(target: Path, kind: str, overwrite: bool) -> bool:
    """Whether ``target`` holds a previous export to replace (False: absent or an empty
    folder); any other content is refused with one line, untouched."""
    if not target.exists():
        return False
    if not target.is_dir():
        raise UserError(target, "exists and is not a folder: choose another --output")
    content = sorted(p.name for p in target.iterdir())
    if not content:
        return False
    previous = _previous_export(target)
    if previous is None:
        raise UserError(
            target, "not empty and not a previous export: choose another or an empty --output"
        )
    if previous["kind"] != kind:
        raise UserError(
            target, f"holds a {previous['kind']} export, not {kind}: choose another --output"
        )
    if not overwrite:
        raise UserError(target, f"already holds a {kind} export: pass --overwrite to replace it")
    others = [name for name in content if name not in EXPORT_FILES]
    if others:
        raise UserError(
            target,
            f"holds files that are not part of an export ({', '.join(others[:3])}): they would "
            "be lost; choose another --output",
        )
    return True


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent``, with the mode ``mkdir`` gives under the umask (not
    mkdtemp's private 0700, which the rename would carry to the result)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir(0o777)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary folder name in {parent}")


def write_export(
    export: ModelExport,
    output: str | Path,
    *,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Write ``export`` as a model folder at ``output``; returns the folder.

    The files are written into a new folder beside ``output`` and renamed onto it at the end,
    so ``output`` never holds half an export. An existing folder is replaced only when it is a
    previous export of the same kind, holding nothing else, and ``overwrite`` is set. A folder
    lock refuses a second export into the same place while one runs. ``repo_id`` names the hub
    repository in the card's how-to-load example.
    """
    target = Path(output).expanduser().absolute()
    tensors = _check(export)
    target.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(target, directory=False):
        replace = _check_target(target, export.kind, overwrite)
        staged = _new_dir(target.parent, f".{target.name}.export-")
        try:
            export_safetensors(
                tensors, staged / WEIGHTS_FILE, metadata=export.safetensors_metadata()
            )
            atomic_write_json(staged / CONFIG_FILE, export.config())
            atomic_write_text(staged / CARD_FILE, _card_text(export, staged, tensors, repo_id))
            _move_into_place(staged, target, replace)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return target


def _card_text(
    export: ModelExport, staged: Path, tensors: Mapping[str, torch.Tensor], repo_id: str | None
) -> str:
    card = export.card or ModelCard(title=export.kind, description=f"A {export.package} model.")
    params = sum(t.numel() for k, t in tensors.items() if not k.startswith(EXTRA_PREFIX))
    n = len(export.extra_tensors)
    extras = f", and {n} extra array{'s' * (n != 1)}" if n else ""
    files = [
        CardFile(
            WEIGHTS_FILE,
            f"weights: {len(export.tensors)} tensors, {params:,} numbers{extras}",
            (staged / WEIGHTS_FILE).stat().st_size,
        ),
        CardFile(
            CONFIG_FILE,
            "kind, model config, preprocessing, labels, thresholds",
            (staged / CONFIG_FILE).stat().st_size,
        ),
        CardFile(CARD_FILE, "this model card"),
    ]
    return render_card(card, package=export.package, kind=export.kind, repo_id=repo_id, files=files)


def _move_into_place(staged: Path, target: Path, replace: bool) -> None:
    if not replace:
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()  # an empty folder: rmdir refuses anything else
        os.rename(staged, target)
        return
    # A folder cannot be renamed over a non-empty one: the old export steps aside first and is
    # put back if the new one cannot take its place.
    old = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_files(folder: str | Path) -> list[tuple[str, int]]:
    """``(name, size in bytes)`` of the files of an exported folder, in the layout's order."""
    folder = Path(folder)
    return [(name, (folder / name).stat().st_size) for name in EXPORT_FILES]


# ---------------------------------------------------------------------------------------------
# upload


def check_hub_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is ``ORG/NAME``; else a one-line UserError."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or repo_id.startswith("hf-hub:"):
        raise UserError("--push-to-hub", f"expected ORG/NAME, got {repo_id!r}")
    return repo_id


def check_can_push(repo_id: str) -> str:
    """The token to upload ``repo_id`` with; offline or logged out is a one-line UserError.

    Called before anything is written, so a push that cannot happen fails first.
    """
    from huggingface_hub import get_token

    from medcore.weights.pretrained import hub_offline

    check_hub_repo_id(repo_id)
    if hub_offline():
        raise UserError("--push-to-hub", "HF_HUB_OFFLINE is set: unset it to upload")
    token = get_token()
    if not token:
        raise UserError("--push-to-hub", f"no Hugging Face token: {LOGIN}")
    return token


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
) -> str:
    """Upload an exported folder to the hub model repository ``repo_id``; returns the commit URL.

    The repository is created when absent (``private`` then applies), the branch ``revision``
    too. Refused with one line when ``HF_HUB_OFFLINE`` is set, without a token, when the folder
    is not an export, and when the hub answers with an error.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    token = check_can_push(repo_id)
    config = _previous_export(folder)
    if config is None or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            folder, "not an exported model folder (config.json + model.safetensors)"
        )
    # A connection that fails raises the HTTP library's own error (requests' or httpx's,
    # by huggingface_hub version): the classes HfHubHTTPError derives from catch it.
    network = tuple(
        c for c in HfHubHTTPError.__mro__[1:] if c not in (Exception, BaseException, object)
    )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            allow_patterns=list(EXPORT_FILES),
            commit_message=f"Upload {config['kind']} ({config.get('package_version', '?')})",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        detail = (exc.server_message or str(exc)).strip().splitlines()[0][:160]
        login = f"; {LOGIN}" if status == 401 else ""
        raise UserError(
            repo_id, f"the hub refused the upload (HTTP {status}: {detail}){login}"
        ) from None
    except (*network, OSError) as exc:
        raise UserError(
            repo_id, f"cannot reach the hub ({str(exc).splitlines()[0][:160]})"
        ) from None
    return str(getattr(commit, "commit_url", commit))
