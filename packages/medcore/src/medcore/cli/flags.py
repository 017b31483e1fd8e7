"""Flags as data: a command's flags (:class:`Flag`), each with the config key it stands for, and
the one function that turns the flags a command was given into config overrides
(:func:`flag_overrides`).

The common flags of DESIGN.md are spelled the same in every command (:func:`common_flags`). A
flag with a ``key`` sets that key of the config when it is given, after ``--set``: ``--seed 3``
is ``seed=3``, ``--from-scratch`` is ``model.pretrained=false``, ``--epochs N`` sets every key
of the config class's ``epochs_keys``. A package declares its own flags the same way
(``Flag("--model", {"choices": MODELS}, "model.name")``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from medcore.config import RunConfig
from medcore.runtime.device import DEVICE_CHOICES

EPOCHS = "<epochs_keys>"
"""The ``key`` of a flag that sets every key of the config class's ``epochs_keys``."""
OWN_VALUE = "<the flag's value>"
"""The ``value`` of a flag that sets its key to the value it was given."""


class Flag(NamedTuple):
    """One flag or positional argument: argparse's names and keyword options, and the config
    key it stands for (``None``: it sets none).

    A flag with a key sets it when the flag is given: to the flag's own value, or to ``value``
    (a switch such as ``--from-scratch``). Such a flag has no default of its own (None, or
    False for a switch), so a command line without it keeps the config's value.
    """

    names: str | tuple[str, ...]
    options: dict[str, Any]
    key: str | None = None
    value: Any = OWN_VALUE

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds the flag's value (argparse's rule)."""
        if "dest" in self.options:
            return self.options["dest"]
        names = (self.names,) if isinstance(self.names, str) else self.names
        long = [n for n in names if n.startswith("--")] or list(names)
        return long[0].lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return self.options.get(
            "default", False if self.options.get("action") == "store_true" else None
        )


@dataclass(frozen=True)
class Invocation:
    """How a command was called: its console script and arguments (``--devices N`` starts the
    other ranks with exactly these) and its flags (the config keys they stand for)."""

    prog: str
    argv: tuple[str, ...]
    flags: tuple[Flag, ...]


def common_flags(train: bool = True) -> list[Flag]:
    """The flags of DESIGN.md; ``train=False`` leaves out the training-only ones."""
    flags = [
        Flag(
            "--config",
            {
                "type": Path,
                "help": "research config (packaged NAME.yaml or a file); stands alone on the defaults",
            },
        ),
        Flag(
            "--set",
            {
                "dest": "overrides",
                "action": "append",
                "default": [],
                "metavar": "KEY=VALUE",
                "help": "override a config value, e.g. --set trainer.lr=3e-4 (repeatable)",
            },
        ),
        Flag(
            "--data-dir",
            {"type": Path, "help": "real data directory (default: the built-in demo data)"},
            "data.data_dir",
        ),
        Flag(
            "--output-dir",
            {"type": Path, "help": "run directory (default: runs/<pkg>/<timestamp>)"},
            "output_dir",
        ),
        Flag("--device", {"choices": DEVICE_CHOICES, "help": "device (default: auto)"}, "device"),
        Flag("--seed", {"type": int, "help": "random seed"}, "seed"),
    ]
    if not train:
        return flags
    return [
        *flags,
        Flag(
            "--devices",
            {
                "type": int,
                "metavar": "N",
                "help": "processes (GPUs, or CPU ranks with --device cpu) on this machine; the "
                "command starts them itself (default: 1, or what torchrun/SLURM started)",
            },
            "trainer.devices",
        ),
        Flag(
            "--num-nodes",
            {"type": int, "metavar": "N", "help": "machines of a torchrun or SLURM job"},
            "trainer.num_nodes",
        ),
        Flag(
            "--epochs",
            {
                "type": int,
                "metavar": "N",
                "help": "epochs of training (trainer.epochs); in a package that trains in "
                "phases, every phase's epochs (its README names the keys)",
            },
            EPOCHS,
        ),
        Flag(
            "--smoke", {"action": "store_true", "help": "run a few steps only (checks the setup)"}
        ),
        Flag(
            "--resume",
            {
                "metavar": "PATH|latest",
                "help": "continue from a checkpoint, or from the newest run's latest.pt",
            },
        ),
        Flag(
            "--pretrained-weights",
            {
                "metavar": "FILE|DIR|hf-hub:ORG/NAME[@REV]",
                "help": "pretrained backbone weights: a file, a snapshot directory, or a hub name "
                "(fetched only when online and HF_HUB_OFFLINE is unset)",
            },
            "model.pretrained_weights",
        ),
        Flag(
            "--from-scratch",
            {
                "action": "store_true",
                "help": "train from random initialisation a config that expects pretrained weights",
            },
            "model.pretrained",
            False,
        ),
        Flag(
            "--dry-run",
            {
                "action": "store_true",
                "help": "resolve the config and build the model on the meta device; no data, no weights",
            },
        ),
    ]


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> argparse.ArgumentParser:
    for flag in flags:
        if flag.key is not None and flag.default not in (None, False):
            raise ValueError(f"{flag.names}: a flag that sets {flag.key} has no default of its own")
        names = (flag.names,) if isinstance(flag.names, str) else flag.names
        parser.add_argument(*names, **flag.options)
    return parser


def add_common_args(parser: argparse.ArgumentParser, train: bool = True) -> argparse.ArgumentParser:
    """Add the flags of DESIGN.md; ``train=False`` leaves out the training-only ones."""
    return add_flags(parser, common_flags(train))


def flag_overrides(
    args: argparse.Namespace, epochs_keys: Sequence[str] = RunConfig.epochs_keys
) -> list[tuple[str, Any]]:
    """The ``(key, value)`` overrides of the flags given in ``args``: those of the command that
    parsed them (its :class:`Invocation`), or the common flags for a parser of one's own."""
    invocation = getattr(args, "invocation", None)
    flags = invocation.flags if invocation is not None else common_flags(train=True)
    items: list[tuple[str, Any]] = []
    for flag in flags:
        given = getattr(args, flag.dest, flag.default)
        if flag.key is None or given == flag.default:
            continue
        value = given if flag.value == OWN_VALUE else flag.value
        if isinstance(value, Path):
            value = os.fspath(value)
        keys = epochs_keys if flag.key == EPOCHS else (flag.key,)
        items += [(key, value) for key in keys]
    return items
