"""The command-line conventions every ``<pkg>-<verb>`` command shares.

- ``Command``: one console script declared as data (its flags and the ``module:function`` that
  runs the parsed arguments); every package's ``cli.py`` is a list of them.
- ``run_cli(main_fn, prog)``: user errors become one line ``error: <what>: <why>`` on stderr
  and exit code 2; Ctrl-C, SIGTERM and SIGUSR1 become exit 130 with a hint to resume (training
  stops at a step boundary and saves first, see :mod:`medcore.runtime.interrupts`). No
  traceback reaches the user.
- The common flags and the config keys they stand for: :mod:`medcore.cli.flags`.
- Run setup (config, processes, run directory, resume) is :mod:`medcore.cli.run_setup`; tables are
  :mod:`medcore.report.tables`.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

from medcore.cli import launch
from medcore.cli.flags import Flag, Invocation, add_flags, common_flags
from medcore.errors import UserError
from medcore.runtime import interrupts


@dataclass(frozen=True)
class Command:
    """A console script: ``prog`` parses ``flags`` and calls ``run`` (``"module:function"``).

    A flag is a :class:`~medcore.cli.flags.Flag` (or a plain ``(names, options)`` tuple).
    ``common`` adds :func:`~medcore.cli.flags.common_flags` (``True``: with the training
    flags, ``False``: without them, ``None``: none). The module is imported only when the
    command runs, so ``--help`` stays fast; errors and exit codes follow :func:`run_cli`.
    """

    prog: str
    description: str
    run: str
    flags: Sequence[Flag | tuple] = ()
    common: bool | None = None

    def all_flags(self) -> tuple[Flag, ...]:
        own = tuple(Flag(*flag) for flag in self.flags)
        return own if self.common is None else (*own, *common_flags(train=self.common))

    def parser(self) -> argparse.ArgumentParser:
        return add_flags(
            argparse.ArgumentParser(prog=self.prog, description=self.description), self.all_flags()
        )

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The parsed arguments, with the :class:`~medcore.cli.flags.Invocation` that
        ``--devices N`` relaunches and that maps the flags onto config keys."""
        parser = self.parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        parser.set_defaults(invocation=Invocation(self.prog, tuple(argv), self.all_flags()))
        return parser.parse_args(argv)

    def __call__(self, argv: list[str] | None = None) -> int:
        module, function = self.run.split(":")

        def main() -> int | None:
            args = self.parse_args(argv)  # first: --help imports nothing
            return getattr(import_module(module), function)(args)

        return run_cli(main, self.prog)


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(main_fn: Callable[[], int | None], prog: str | None = None) -> int:
    """Call ``main_fn``; turn user errors and interrupts into one line and an exit code.

    When the command started ranks of its own (``--devices N``), rank 0 waits for them, and a
    rank that died makes the whole command fail with that rank's exit code.
    """
    from medcore.runtime.distributed import cleanup_distributed

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
    from medcore.runtime.distributed import process_rank

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
