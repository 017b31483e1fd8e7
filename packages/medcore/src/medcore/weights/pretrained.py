"""Pretrained weights the way users have them: a file, a snapshot directory or an ``hf-hub:`` name.

``resolve_weights`` finds the weights file (and the config beside it), ``load_pretrained`` reads
it safely, takes it out of the container and key prefix its training framework wrote (Lightning,
Fabric, DDP, torch.compile ...), converts the layout (see :mod:`medcore.weights.keys`) and loads it
into a module, printing one line with the counts; a missing tensor that is not a new head, or a
file of another architecture, is an error, never a silent random initialisation or partial
load. ``data_config`` gives the input normalisation the weights expect.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcore.errors import CheckpointError, UserError
from medcore.runtime.distributed import is_main_process
from medcore.weights import keys as layouts
from medcore.weights.checkpoint import load_checkpoint

HUB_PREFIX = "hf-hub:"
# Weight file names in a snapshot or local-dir download, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
# open_clip repositories on the hub also carry a transformers-format model.safetensors: a caller
# that wants the open_clip layout asks for these first.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
CONFIG_FILES = ("config.json", "open_clip_config.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
SUPPLY = (
    "pass --pretrained-weights FILE|DIR|hf-hub:ORG/NAME, "
    "or --from-scratch to train from random initialisation"
)

Converter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file found from the user's spec.

    ``config`` is the ``config.json`` and ``open_clip_config.json`` beside it (merged), with a
    ``preprocessor_config.json`` under the key ``"preprocessor"``; {} when there is none.
    ``source`` is what the user named, as shown in messages.
    """

    path: Path
    config: dict[str, Any]
    source: str


@dataclass
class LoadReport:
    """What a ``load_pretrained`` call loaded.

    ``matched`` of the module's ``total`` tensors came from the file; ``new`` are the module's
    keys left at their initialisation on purpose (the ``new`` patterns), ``missing`` the others
    (a load with any is refused); ``unexpected`` are file keys the module does not have;
    ``container`` the checkpoint entries the weights were taken from (e.g. ``("state_dict",)``
    of a Lightning checkpoint); ``prefix`` the key prefix stripped (e.g. ``"module."``), with
    ``outside`` file tensors not under it left out; ``unread`` the classes of non-tensor entries
    read as inert placeholders (see :func:`read_state_dict`); ``metadata`` the file's
    safetensors metadata or a medcore checkpoint's ``format``/``kind``.
    """

    matched: int
    total: int
    missing: list[str]
    unexpected: list[str]
    new: list[str]
    source: str
    what: str = "backbone"
    prefix: str = ""
    container: tuple[str, ...] = ()
    outside: int = 0
    unread: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """``loaded <what> weights from <source> (<where>): M/N tensors matched, k new (...), ...``."""
        new = f"{len(self.new)} new" + (f" ({_first(self.new)})" if self.new else "")
        unexpected = f"{len(self.unexpected)} unexpected" + (
            f" ({_first(self.unexpected)})" if self.unexpected else ""
        )
        where = [f"from entry {'/'.join(self.container)!r}"] if self.container else []
        if self.prefix:
            where.append(f"stripped prefix {self.prefix!r}")
        if self.outside:
            where.append(f"{_tensors(self.outside)} outside it left out")
        where_text = f" ({', '.join(where)})" if where else ""
        unread = (
            f"; not read: {_first(list(self.unread))} (objects torch cannot load safely, "
            "replaced by placeholders; no weights among them)"
            if self.unread
            else ""
        )
        return (
            f"loaded {self.what} weights from {self.source}{where_text}: {self.matched}/"
            f"{self.total} tensors matched, {new}, {len(self.missing)} missing, {unexpected}"
            f"{unread}"
        )


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _first(names: list[str], n: int = 3) -> str:
    more = f", ... {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------------------------
# resolving a spec


def resolve_weights(spec: str | Path, files: Sequence[str] = WEIGHT_FILES) -> ResolvedWeights:
    """Find the weights file of ``spec``: a file, a directory, or ``hf-hub:ORG/NAME[@REV]``.

    In a directory or hub snapshot the first of ``files`` present is taken (else a single
    weights file of any name, e.g. an exported ``model.safetensors``). A hub name is looked up in
    the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and downloaded only when online and
    ``HF_HUB_OFFLINE`` is unset; a cached snapshot is used as it is. Every failure is a one-line
    CheckpointError (a UserError) saying what was looked for.
    """
    text = str(spec)
    files = tuple(files)
    if text.startswith(HUB_PREFIX):
        return _resolve_hub(text[len(HUB_PREFIX) :], text, files)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_dir(path, text, files)
    if not path.is_file():
        raise CheckpointError(
            text, "checkpoint not found (expected a weights file, a directory or hf-hub:ORG/NAME)"
        )
    return ResolvedWeights(path, _read_configs(path.parent), text)


def _resolve_dir(path: Path, source: str, files: tuple[str, ...]) -> ResolvedWeights:
    for name in files:
        if (path / name).is_file():
            return ResolvedWeights(path / name, _read_configs(path), source)
    # A single weights file of another name (e.g. the model.safetensors of an exported folder).
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return ResolvedWeights(found[0], _read_configs(path), source)
    sharded = (path / "model.safetensors.index.json").is_file()
    why = (
        "sharded weights (model.safetensors.index.json) are not supported: merge them into one file"
        if sharded
        else f"no weights file in this directory (looked for {', '.join(files)}"
        + (
            f"; found several: {', '.join(p.name for p in found)}, name one"
            if found
            else " or a single *.safetensors/*.pt/*.pth/*.bin"
        )
        + ")"
    )
    raise CheckpointError(source, why)


def _read_configs(folder: Path) -> dict[str, Any]:
    """config.json and open_clip_config.json of a weights folder merged, preprocessor inside."""
    config: dict[str, Any] = {}
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            config.update(read_json_object(folder / name))
    if (folder / PREPROCESSOR_FILE).is_file():
        config["preprocessor"] = read_json_object(folder / PREPROCESSOR_FILE)
    return config


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (a weights config); anything else is a CheckpointError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"unreadable JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_hub(name: str, source: str, files: tuple[str, ...]) -> ResolvedWeights:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = name.partition("@")
    revision = revision or None
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(source, "expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    cache = hub_cache_dir()
    get = (
        f"run once online without HF_HUB_OFFLINE, or fetch it with `hf download {repo_id}` "
        "(huggingface-cli download in older huggingface_hub)"
    )
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        )
    except HFValidationError as exc:
        raise UserError(
            source, f"not a valid hub name ({str(exc).splitlines()[0][:120]})"
        ) from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        folder = None
    if folder is not None and any((folder / n).is_file() for n in files):
        return _resolve_dir(folder, source, files)
    if hub_offline():
        at = f" at revision {revision}" if revision else ""
        raise CheckpointError(
            source, f"not in the Hugging Face cache {cache}{at} and HF_HUB_OFFLINE is set: {get}"
        )
    for filename in files:
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: caught first
            raise CheckpointError(
                source,
                f"the hub cannot be reached and the weights are not in the cache {cache}: {get}",
            ) from None
        except EntryNotFoundError:
            continue
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
            raise CheckpointError(
                source, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            ) from None
        except HfHubHTTPError as exc:
            raise CheckpointError(
                source, f"download failed ({str(exc).splitlines()[0][:160]})"
            ) from None
        for extra in (*CONFIG_FILES, PREPROCESSOR_FILE):
            try:
                hf_hub_download(repo_id, extra, revision=revision, cache_dir=cache)
            except (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError):
                continue
        return ResolvedWeights(path, _read_configs(path.parent), source)
    raise CheckpointError(source, f"the repository has none of {', '.join(files)}")


# ---------------------------------------------------------------------------------------------
# reading and loading


@dataclass(frozen=True)
class WeightsFile:
    """The tensors of a weights file and where they were found in it.

    ``tensors`` come from inside the checkpoint's ``container`` entries (e.g. ``("state_dict",)``);
    ``metadata`` is a safetensors file's header metadata (e.g. ``{"kind": ...}`` of a medcore
    export) or a checkpoint's string entries (``format``, ``kind``, Lightning's version); ``unread``
    the classes of non-tensor entries that were read as inert placeholders.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    container: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()


class _Unread:
    """Stands in for an object that torch does not rebuild under ``weights_only``.

    Lightning and research checkpoints carry hyper-parameters next to the weights (an
    ``argparse.Namespace``, a ``pathlib`` path, an enum value). Torch's safe loader
    refuses the whole file for them; mapped to this class (``torch.serialization.safe_globals``),
    each such object becomes an instance that keeps nothing and runs nothing: the named class is
    never imported or called, and tensors are still rebuilt only by torch's allow-listed functions.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unread:
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass


def _unsafe_globals(path: Path) -> tuple[str, ...]:
    """The classes and functions a ``torch.save`` archive names that ``weights_only`` refuses.

    Read from the pickle's opcodes without running them; () for a file that is not a zip archive
    (then :func:`medcore.weights.checkpoint.load_checkpoint` says what it is).
    """
    try:
        return tuple(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError):
        return ()


def _load_with_placeholders(path: Path, unread: tuple[str, ...], source: str) -> dict[str, Any]:
    names = _first(list(unread))
    try:
        with torch.serialization.safe_globals([(_Unread, name) for name in unread]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            source,
            f"refused: contains pickled objects that could run code on load ({names}; "
            f"{_reason(exc)})",
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(
            source,
            f"a pickled object ({names}), not a dict of weights: save model.state_dict() instead",
        )
    return raw


def _reason(exc: Exception) -> str:
    """The line of torch's safe-load error that says what was refused (not its general advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [
        line
        for line in lines
        if not line.startswith(
            ("Weights only load failed", "Please file", "Check the documentation")
        )
    ]
    return (specific or lines or ["unsafe content"])[0][:160]


def read_state_dict(spec: str | Path | ResolvedWeights) -> WeightsFile:
    """The tensors of a weights file, unwrapped from checkpoint containers (see :class:`WeightsFile`).

    Every file is read with ``torch.load(weights_only=True)``. A checkpoint whose non-tensor
    entries name classes the safe loader refuses (hyper-parameters of a Lightning checkpoint) is
    read with those objects replaced by inert placeholders, listed in ``unread``; a file whose
    objects still cannot be read that way (or that names ``os``/``sys``) is refused.
    """
    resolved = spec if isinstance(spec, ResolvedWeights) else resolve_weights(spec)
    path = resolved.path
    container: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()  # safetensors files hold nothing but tensors
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state = load_checkpoint(path)["model"]
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    else:
        unread = _unsafe_globals(path)
        raw = (
            _load_with_placeholders(path, unread, resolved.source)
            if unread
            else load_checkpoint(path)
        )
        metadata = {k: v for k, v in raw.items() if isinstance(v, str)}
        state, container = layouts.unwrap(raw)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(resolved.source, "contains no weight tensors")
    return WeightsFile(tensors, metadata, container, unread)


def _module_layout(target: dict[str, torch.Tensor], convert: Converter | None) -> layouts.Layout:
    """The conversion of a file's tensors (their prefix stripped) to ``target``'s names.

    HF-transformers and torch.hub DINOv2 become timm's layout unless the module has that layout
    itself; ``convert`` (the package's own layout) runs in between.
    """
    hf_module = layouts.is_hf_dinov2(target) is not None
    hub_module = bool({"mask_token", "register_tokens"} & set(target))

    def layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not hf_module and layouts.is_hf_dinov2(state) == "":
            state = layouts.hf_dinov2_to_timm(state)
        if convert is not None:
            state = convert(dict(state))  # a copy: converters may edit what they are given
        return state if hub_module else layouts.hub_dinov2_to_timm(state)

    return layout


def load_pretrained(
    module: nn.Module,
    spec: str | Path | ResolvedWeights,
    convert: Converter | None = None,
    *,
    new: Iterable[str] = (),
    what: str = "backbone",
) -> LoadReport:
    """Load pretrained weights into ``module``, print one line with the counts, return the report.

    ``spec`` is a file, a directory or ``hf-hub:ORG/NAME[@REV]`` (see :func:`resolve_weights`).
    One resolution serves every package: the weights are taken out of their checkpoint container
    (Lightning, Fabric, research code, medcore), then the key prefix the training framework added
    (DDP ``module.``, torch.compile ``_orig_mod.``, a LightningModule's attribute, a whole model's
    ``backbone.`` ...) is found by matching against the module's own keys and shapes, through the
    layout conversion (HF-transformers and torch.hub DINOv2 -> timm, then ``convert``, a package's
    own layout, e.g. torchvision names -> a Sequential's indices or position-embedding
    resampling), so ``convert`` never sees a prefix. ``new`` are glob patterns of the module's
    keys that are meant to start fresh (a new head): they are listed, not an error.

    Refused with a one-line CheckpointError, before anything is loaded: a missing tensor (a
    partial file); a tensor of another shape, a file that matches under half of the module, or
    one with more numbered blocks than the module (another architecture, named by what the file
    looks like, with the counts).
    """
    if any(t.is_meta for t in module.state_dict().values()):
        # A dry run builds on the meta device, where loading would silently do nothing.
        raise ValueError(
            "cannot load weights into a module on the meta device (a dry run loads none)"
        )
    resolved = spec if isinstance(spec, ResolvedWeights) else resolve_weights(spec)
    weights = read_state_dict(resolved)
    target = module.state_dict()
    layout = _module_layout(target, convert)
    prefix = layouts.best_prefix(weights.tensors, target, layout)
    under = layouts.strip_prefix(weights.tensors, prefix)
    state = layout(under)
    usable = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    # BatchNorm's step counter is not a weight; old torchvision files lack it.
    absent = [k for k in target if k not in usable and not k.endswith("num_batches_tracked")]
    patterns = list(new)
    fresh = [k for k in absent if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    report = LoadReport(
        matched=len(usable),
        total=len(usable) + len(absent),
        missing=[k for k in absent if k not in fresh],
        unexpected=sorted(set(state) - set(target)),  # a shape mismatch is missing, not this
        new=fresh,
        source=resolved.source,
        what=what,
        prefix=prefix,
        container=weights.container,
        outside=len(weights.tensors) - len(under),
        unread=weights.unread,
        metadata=weights.metadata,
    )
    why = _refusal(report, state, target, weights.tensors)
    if why:  # checked before loading: a refused file leaves the module untouched
        raise CheckpointError(resolved.source, why)
    module.load_state_dict(usable, strict=False)
    if is_main_process() and os.environ.get("RANK", "0") == "0":  # once, not per DDP rank
        print(report.line(), flush=True)
    return report


def _refusal(
    report: LoadReport,
    state: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor],
) -> str | None:
    """Why the file does not fit the module (None when it does), in one line with the counts."""
    extra = layouts.extra_blocks(report.unexpected, target)
    if not report.missing and not extra:
        return None
    reshaped = [k for k in report.missing if k in state]
    absent = [k for k in report.missing if k not in state]
    if not reshaped and not extra and report.matched >= 0.5 * report.total:
        return (
            f"partial weights for the {report.what}: {report.matched}/{report.total} tensors "
            f"matched, {len(absent)} missing ({_first(absent)})"
        )
    parts = [f"{report.matched} of the {report.what}'s {report.total} tensors match"]
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} have another shape ({_first(reshaped)}; {k}: file "
            f"{tuple(state[k].shape)}, {report.what} {tuple(target[k].shape)})"
        )
    if absent:
        parts.append(f"{len(absent)} are missing ({_first(absent)})")
    if extra:
        parts.append(f"the file has {_tensors(len(extra))} of blocks it lacks ({_first(extra)})")
    return f"wrong architecture: the file looks like {layouts.describe(raw)}; {', '.join(parts)}"


# ---------------------------------------------------------------------------------------------
# no silent random initialisation


def missing_weights_error(what: str, hint: str = "") -> UserError:
    """The error for "pretrained weights expected, none given": says how to supply them."""
    return UserError(what, f"pretrained weights expected but none given: {SUPPLY}. {hint}".strip())


def require_pretrained(
    pretrained: bool, weights: str | Path | None, what: str, hint: str = ""
) -> None:
    """Raise the one-line error when a config expects pretrained weights and none were given."""
    if pretrained and not weights:
        raise missing_weights_error(what, hint)
