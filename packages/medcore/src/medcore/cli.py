"""The command-line conventions every ``<pkg>-<verb>`` command shares.

- ``Command``: one console script declared as data (its flags and the ``module:function`` that
  runs the parsed arguments); every package's ``cli.py`` is a list of them.
- ``run_cli(main_fn, argv)``: user errors become one line ``error: <what>: <why>`` on stderr and
  exit code 2; Ctrl-C, SIGTERM and SIGUSR1 become exit 130 with a hint to resume (training
  stops at a step boundary and saves first, see :mod:`medcore.interrupts`). No traceback
  reaches the user.
- ``add_common_args``: the common flags, spelled the same everywhere, and ``common_overrides``,
  the ``--set`` items they stand for.
- Run setup (config, processes, run directory, resume) is :mod:`medcore.run`; tables are
  :mod:`medcore.tables`.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from medcore import interrupts, launch
from medcore.device import DEVICE_CHOICES
from medcore.errors import UserError
from medcore.trainer import TrainerConfig

C = TypeVar("C", bound="RunConfig")


@dataclass
class RunConfig:
    """Fields every package's top-level config has; packages subclass it and add sections.

    A subclass must define ``data`` (with ``data_dir``), ``model`` (with ``pretrained_weights``)
    and may rely on ``trainer`` as defined here.

    ``epochs_keys``: what ``--epochs N`` (and ``--smoke``'s one epoch) sets. A package that
    trains in phases with epochs of their own names them all; its ``trainer.epochs`` is then
    unused, and a config or ``--set`` that changes it is refused (:mod:`medcore.run`).
    """

    epochs_keys: ClassVar[tuple[str, ...]] = ("trainer.epochs",)

    seed: int = 42
    device: str = "auto"
    output_dir: str | None = None
    # CPU threads for torch; None keeps torch's default. Tiny demo tensors often run faster on
    # one thread than on several oversubscribed ones.
    num_threads: int | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


Flag = tuple[str | tuple[str, ...], dict[str, Any]]
"""``(name or names, argparse keyword arguments)`` of one flag or positional argument."""


@dataclass(frozen=True)
class Command:
    """A console script: ``prog`` parses ``flags`` and calls ``run`` (``"module:function"``).

    ``common`` adds :func:`add_common_args` (``True``: with the training flags, ``False``:
    without them, ``None``: none). The module is imported only when the command runs, so
    ``--help`` stays fast; errors and exit codes follow :func:`run_cli`, and a user error
    leaves no new run directory behind (:func:`medcore.run.undoing_refused_runs`).
    """

    prog: str
    description: str
    run: str
    flags: Sequence[Flag] = ()
    common: bool | None = None

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        for names, options in self.flags:
            parser.add_argument(*((names,) if isinstance(names, str) else names), **options)
        if self.common is not None:
            add_common_args(parser, train=self.common)
        return parser

    def __call__(self, argv: list[str] | None = None) -> int:
        module, function = self.run.split(":")
        parser = self.parser()

        def main() -> int | None:
            args = parser.parse_args(argv)  # first: --help imports nothing
            from medcore.run import undoing_refused_runs  # medcore.run imports this module

            with undoing_refused_runs():  # a refused run leaves no run directory behind
                return getattr(import_module(module), function)(args)

        return run_cli(main, self.prog)


def add_common_args(parser: argparse.ArgumentParser, train: bool = True) -> argparse.ArgumentParser:
    """Add the flags of DESIGN.md; ``train=False`` leaves out the training-only ones."""
    parser.add_argument(
        "--config",
        type=Path,
        help="research config (packaged NAME.yaml or a file); stands alone on the defaults",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="real data directory (default: the built-in demo data)"
    )
    parser.add_argument(
        "--output-dir", type=Path, help="run directory (default: runs/<pkg>/<timestamp>)"
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, help="device (default: auto)")
    parser.add_argument("--seed", type=int, help="random seed")
    _remember_argv(parser)
    if train:
        parser.add_argument(
            "--devices",
            type=int,
            metavar="N",
            help="processes (GPUs, or CPU ranks with --device cpu) on this machine; "
            "the command starts them itself (default: 1, or what torchrun/SLURM started)",
        )
        parser.add_argument(
            "--num-nodes", type=int, metavar="N", help="machines of a torchrun or SLURM job"
        )
        parser.add_argument(
            "--epochs",
            type=int,
            metavar="N",
            help="epochs of training (trainer.epochs); in a package that trains in phases, "
            "every phase's epochs (its README names the keys)",
        )
        parser.add_argument(
            "--smoke", action="store_true", help="run a few steps only (checks the setup)"
        )
        parser.add_argument(
            "--resume",
            metavar="PATH|latest",
            help="continue from a checkpoint, or from the newest run's latest.pt",
        )
        parser.add_argument(
            "--pretrained-weights",
            metavar="FILE|DIR|hf-hub:ORG/NAME[@REV]",
            help="pretrained backbone weights: a file, a snapshot directory, or a hub name "
            "(fetched only when online and HF_HUB_OFFLINE is unset)",
        )
        parser.add_argument(
            "--from-scratch",
            action="store_true",
            help="train from random initialisation a config that expects pretrained weights",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="resolve the config and build the model on the meta device; no data, no weights",
        )
    return parser


def _remember_argv(parser: argparse.ArgumentParser) -> None:
    """Keep the arguments a command was given on its namespace (``args._argv``): ``--devices N``
    starts the other ranks with exactly these."""
    parse = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = parse(args, namespace)
        ns._argv = list(sys.argv[1:] if args is None else args)
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def common_overrides(
    args: argparse.Namespace, epochs_keys: Sequence[str] = RunConfig.epochs_keys
) -> list[str]:
    """The ``--set`` items that the common flags stand for (``--epochs``: ``epochs_keys``)."""
    items: list[str] = []
    if getattr(args, "data_dir", None) is not None:
        items.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "device", None) is not None:
        items.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        items.append(f"seed={args.seed}")
    if getattr(args, "epochs", None) is not None:
        items += [f"{key}={args.epochs}" for key in epochs_keys]
    if getattr(args, "devices", None) is not None:
        items.append(f"trainer.devices={args.devices}")
    if getattr(args, "num_nodes", None) is not None:
        items.append(f"trainer.num_nodes={args.num_nodes}")
    if getattr(args, "pretrained_weights", None) is not None:
        items.append(f"model.pretrained_weights={args.pretrained_weights}")
    if getattr(args, "from_scratch", False):
        items.append("model.pretrained=false")
    if getattr(args, "output_dir", None) is not None:
        items.append(f"output_dir={args.output_dir}")
    return items


_PROG: list[str] = []  # the running command's name (run_cli), to start its other ranks


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(main_fn: Callable[[], int | None], prog: str | None = None) -> int:
    """Call ``main_fn``; turn user errors and interrupts into one line and an exit code.

    When the command started ranks of its own (``--devices N``), rank 0 waits for them, and a
    rank that died makes the whole command fail with that rank's exit code.
    """
    from medcore.distributed import cleanup_distributed

    _PROG.append(prog or "")
    try:
        with interrupts.handled():
            code = _run_main(main_fn, prog)
            if launch.launched_here():
                code = _wait_for_ranks(code, prog)
    except BaseException:
        if launch.launched_here():
            launch.finish(1)
        cleanup_distributed()
        raise
    finally:
        _PROG.pop()
    cleanup_distributed()
    return code


def _wait_for_ranks(code: int, prog: str | None) -> int:
    """Rank 0 of ``--devices N``: the command's exit code once the other ranks have ended."""
    try:
        children = launch.finish(code)
    except KeyboardInterrupt:  # a signal while the others finish: they are stopped at once
        launch.finish(1)
        _say_interrupted(prog)
        return 130
    if code == 0 and children:
        print(f"error: a rank exited with code {children}; job failed", file=sys.stderr)
        code = children if 0 < children < 128 else 1
    return code


def _say_interrupted(prog: str | None) -> None:
    from medcore.distributed import process_rank

    if process_rank() == 0:  # one line per job, whichever ranks the signal reached
        print(
            f"{prog or 'interrupted'}: interrupted; finished work is saved (resume with --resume latest)",
            file=sys.stderr,
        )


def _run_main(main_fn: Callable[[], int | None], prog: str | None) -> int:
    try:
        code = main_fn()
        return 0 if code is None else int(code)
    except UserError as exc:
        print(f"error: {exc.what}: {exc.why}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _consequence_of_dead_rank(exc)
        # Disk full, read-only or forbidden output: the user's environment, not a bug.
        print(f"error: {exc.filename or 'output'}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # interrupts.Interrupted: a signal, after training saved
        _say_interrupted(prog)
        return 130
    except Exception as exc:
        return _consequence_of_dead_rank(exc)


def _consequence_of_dead_rank(exc: BaseException) -> int:
    """A collective that failed because another rank died: one line naming that rank (which
    printed its own error); any other exception is a bug and keeps its traceback."""
    failed = launch.failed_rank()
    if failed is None:
        raise exc
    print(f"error: rank {failed[0]}: exited with code {failed[1]}; job stopped", file=sys.stderr)
    return failed[1] if 0 < failed[1] < 128 else 1


# Moved to medcore.run / medcore.tables; importable from here as before.
_MOVED = {
    "medcore.run": (
        "RunContext",
        "SMOKE_OVERRIDES",
        "continue_run",
        "default_run_dir",
        "find_run",
        "load_run_config",
        "resolve_config_arg",
        "setup_run",
    ),
    "medcore.tables": ("format_table", "markdown_table"),
}


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _MOVED.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'medcore.cli' has no attribute {name!r}")
