"""Typed configs: dataclasses loaded from YAML, ``--set a.b=value`` overrides, strict keys.

Each package declares its config as nested dataclasses and ships YAML files under
``<pkg>/configs/``. Loading checks every key and value type, so a typo in a YAML file or on
the command line is a one-line error naming the key, not a silent default.

A YAML layer or an override changes exactly the keys it names. A section (a dataclass field)
given as a mapping is merged into the section it replaces: the value its parent declares (a
``default_factory`` such as ``trainer: TrainerConfig = field(default_factory=research_trainer)``,
at any depth), not the section class's own defaults. A ``dict`` field is a value: a mapping
given whole replaces it, while ``--set a.field.key=v`` changes that one entry.

The sections every package's config has are here too: :class:`RunConfig` (the top level a
package's config subclasses) and :class:`TrainerConfig` (its ``trainer:`` section). This module
imports neither torch nor the trainer, so a package's ``config`` stays light to import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from medcore.errors import ConfigError
from medcore.io import atomic_write_text

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Entries(dict):
    """The mapping a dotted ``--set`` path made on its way to a key: the entries it names are
    merged into the value already there (a ``dict`` field's), where a mapping given whole
    replaces it."""


def _coerce(value: Any, tp: Any, key: str, current: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where it is lossless.

    ``current``: the value ``value`` replaces (the parent's declared default, or what an
    earlier layer set); a section given as a mapping is merged into it.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, current)
            except ConfigError as exc:
                errors.append(exc.why)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        out = [_coerce(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        known = current if isinstance(current, dict) else {}
        out = dict(known) if isinstance(value, _Entries) else {}
        for k, v in value.items():
            name = _coerce(k, kt, key)
            # An entry that is a section merges into the entry of the same name.
            out[name] = _coerce(v, vt, f"{key}.{k}", known.get(name))
        return out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a section (mapping), got {value!r}")
        base = current if isinstance(current, tp) else None
        return _build(tp, value, prefix=f"{key}.", base=base)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(key, f"expected a path, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _declared(f: dataclasses.Field) -> Any:
    """The value a dataclass field takes when it is not given (None when it has no default)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """``cls`` from ``data``: the keys it names set, every other field as in ``base`` (an
    instance to change), or else as ``cls`` declares it."""
    if base is not None:
        cls = type(base)  # a default_factory may return a subclass of the annotation
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}",
            f"unknown config key (valid keys here: {', '.join(sorted(fields))})",
        )
    kwargs = {
        name: _coerce(
            value,
            hints[name],
            f"{prefix}{name}",
            getattr(base, name) if base is not None else _declared(fields[name]),
        )
        for name, value in data.items()
    }
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(prefix.rstrip(".") or cls.__name__, str(exc)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of ``cfg`` (paths as strings, tuples as lists) fit for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a (possibly partial) mapping; every key it does not name keeps its
    declared default (a section's: the value its parent's field declares)."""
    return _build(cls, data)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the top level of a config must be a mapping")
    return data


def packaged_config_path(package: str, name: str) -> Path:
    """Path of ``<package>/configs/<name>.yaml`` inside an installed package."""
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    ref = resources.files(package).joinpath("configs", filename)
    if not ref.is_file():
        raise ConfigError(f"{package}/configs/{filename}", "no such packaged config")
    return Path(str(ref))


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}", "expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}", "empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


Override = str | tuple[str, Any]
"""A ``--set`` item ``"a.b=value"`` (the value parsed as YAML), or ``("a.b", value)``: a key
and a value already typed (a command-line flag's, see :mod:`medcore.cli.flags`)."""


def overrides_to_dict(
    items: Sequence[Override], base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply overrides to (a copy of) ``base``.

    The dotted path merges into sections and into ``dict`` fields (``--set
    data.split_ratios.train=0.8`` keeps the other ratios); the value replaces what is there, so
    ``--set model.extra={}`` empties a mapping and ``--set model.weights=null`` clears a value.
    """
    out = _deep_merge({}, base or {})
    for item in items:
        if isinstance(item, str):
            parts, value = parse_override(item)
            where = f"--set {item}"
        else:
            key, value = item
            parts, where = key.split("."), key
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = _Entries()
            elif isinstance(child, dict):
                # Copy on write (base layers stay untouched), keeping what made the mapping.
                child = node[part] = type(child)(child)
            else:
                raise ConfigError(where, f"{part} is a value here, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[T],
    *sources: str | Path | dict[str, Any] | None,
    overrides: Sequence[Override] = (),
) -> T:
    """Build ``cls`` from YAML files / dicts applied in order, then the overrides."""
    data: dict[str, Any] = {}
    for src in sources:
        if src is None:
            continue
        layer = src if isinstance(src, dict) else read_yaml(src)
        data = _deep_merge(data, layer)
    if overrides:
        data = overrides_to_dict(overrides, data)
    return _build(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomic)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class TrainerConfig:
    """Training-loop settings shared by every package (the ``trainer:`` section of a config)."""

    epochs: int = 10
    batch_size: int | None = None  # None: the device default (CUDA 16, MPS 8, CPU 4)
    num_workers: int | None = None  # None: the device default (CUDA 8, MPS 0, CPU 2)
    max_steps_per_epoch: int | None = None  # cap batches per epoch (CPU-sized demos, --smoke)
    drop_last: bool = False
    # A last training batch with fewer samples than this (per rank) is dropped, with a note:
    # BatchNorm cannot normalise one sample (e.g. 1393 images at batch 24 leave 1).
    min_batch_size: int = 2
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: Literal["cosine", "plateau", "step", "none"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    step_size: int = 10  # epochs, for the step scheduler
    gamma: float = 0.1
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    amp: bool = True
    amp_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    eval_every_steps: int = 0  # 0: evaluate at the end of every epoch
    monitor: list[str] = field(default_factory=lambda: ["val/loss"])  # first present one is used
    monitor_mode: Literal["max", "min"] = "min"
    early_stopping_patience: int = 0  # evaluations without improvement; 0 disables
    checkpoint_prefix: str = "model"
    best_name: str | None = None  # fixed file name for the best checkpoint, e.g. phase1_best.pt
    save_every_steps: int = 0  # extra latest.pt saves inside an epoch (0: epoch ends only)
    # Epoch-end latest.pt at most every this many seconds of training (0: every epoch). For
    # epochs of a few seconds (laptop demos, small datasets on a GPU), where writing the model
    # and optimizer state every epoch costs a tenth of the run; the last epoch, an early stop,
    # Ctrl-C and SIGTERM (SLURM's time limit and preemption) always write it.
    save_interval_s: float = 0.0
    log_every_steps: int = 10
    max_nonfinite_steps: int = 5
    channels_last: bool = False
    compile: bool = False
    find_unused_parameters: bool = False
    # Fabric: "auto" is one device, or DDP over the launched ranks; "fsdp" shards parameters,
    # gradients and optimizer state across GPUs (ctclip's DINOv2 ViT-L/G, binensemble full).
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    devices: int | None = None  # processes on this machine (--devices); None: 1 or the launcher's
    num_nodes: int = 1  # machines of a torchrun / SLURM job (--num-nodes)
    # Fabric precision ("bf16-mixed", "16-mixed", "32-true", ...); None: from amp / amp_dtype.
    precision: (
        Literal["bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true", "64-true"] | None
    ) = None
    persistent_workers: bool = True  # keep loader workers across epochs (False: fresh per epoch)

    def __post_init__(self) -> None:
        if self.grad_accum_steps < 1:
            raise ValueError("grad_accum_steps must be >= 1")
        if self.devices is not None and self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")


@dataclass
class RunConfig:
    """Fields every package's top-level config has; packages subclass it and add sections.

    A subclass must define ``data`` (with ``data_dir``), ``model`` (with ``pretrained_weights``)
    and may rely on ``trainer`` as defined here.

    ``epochs_keys``: what ``--epochs N`` (and ``--smoke``'s one epoch) sets. A package that
    trains in phases with epochs of their own names them all; its ``trainer.epochs`` is then
    unused, and a config or ``--set`` that changes it is refused (:mod:`medcore.cli.run_setup`).
    """

    epochs_keys: ClassVar[tuple[str, ...]] = ("trainer.epochs",)

    seed: int = 42
    device: str = "auto"
    output_dir: str | None = None
    # CPU threads for torch; None keeps torch's default. Tiny demo tensors often run faster on
    # one thread than on several oversubscribed ones.
    num_threads: int | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
