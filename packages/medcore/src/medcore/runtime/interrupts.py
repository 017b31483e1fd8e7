"""Signals that end a run early: SIGINT (Ctrl-C), SIGTERM (SLURM's time limit and preemption,
``kill``, ``docker stop``, torchrun passing one on) and SIGUSR1 (SLURM's ``--signal``, sent
ahead of the time limit).

Every command installs the handlers (:func:`handled`, in :func:`medcore.cli.command.run_cli`). Two modes:

- While the Trainer trains (:func:`deferred`), a signal only sets a flag. The loop reads it
  (:func:`requested`) at each optimizer-step boundary and after each evaluation, every rank of
  a distributed job agrees on it in the all-reduce it makes there anyway, and the job saves the
  state that belongs to the last finished step and raises :class:`Interrupted`. Nothing is cut
  off inside a step, so nothing must be undone (BatchNorm statistics, RNG states).
- Anywhere else (data preparation, the evaluation after training), a signal raises
  :class:`Interrupted` at once, as Ctrl-C raises KeyboardInterrupt.

A second signal ends the process at once with exit code 130: checkpoint writes are atomic, so
``latest.pt`` stays the last complete one. A process forked while the handlers are installed (a
DataLoader worker) leaves the decision to its parent: during training it ignores the signals
(the parent stops it when the loop ends), elsewhere it behaves as without these handlers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from medcore.runtime.distributed import process_rank

SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run; what finished is saved. ``args[0]`` names the signal."""


class _State:
    owner: int | None = None  # the process that installed the handlers
    depth = 0
    deferring = 0
    pending: str | None = None  # the first signal received, by name
    previous: dict[int, Any] = {}  # noqa: RUF012 (one process-wide record)


def requested() -> bool:
    """Whether a signal asked this process to stop."""
    return _State.pending is not None


def signal_name() -> str:
    """The signal that asked this process to stop ("a signal" when none did here: another rank
    received it)."""
    return _State.pending or "a signal to another rank"


def request_stop(reason: str) -> None:
    """Ask this process to stop as a signal would, from code (a notebook's step function, a
    time budget, a test): during training the loop stops at the next step boundary, saves
    ``latest.pt`` and raises :class:`Interrupted` naming ``reason``; elsewhere it raises now."""
    if _State.pending is None:
        _State.pending = reason
    if not _State.deferring:
        raise Interrupted(reason)


def _default(signum: int) -> None:
    """What ``signum`` does without these handlers: KeyboardInterrupt for SIGINT, else the
    system's default action (the process ends)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _on_signal(signum: int, frame: Any) -> None:
    if os.getpid() != _State.owner:  # a forked child: its parent decides
        if not _State.deferring:
            _default(signum)
        return
    name = signal.Signals(signum).name
    if _State.pending is not None:
        if process_rank() == 0:
            print(
                f"{name} again: stopped at once; checkpoints/latest.pt holds the last saved step",
                file=sys.stderr,
            )
        sys.stderr.flush()
        os._exit(130)
    _State.pending = name
    if not _State.deferring:
        raise Interrupted(name)


@contextlib.contextmanager
def handled() -> Iterator[bool]:
    """Install the handlers for the block (re-entrant); yields whether they are installed
    (only the main thread can install signal handlers: elsewhere this is a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    if _State.depth == 0:
        _State.previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
        _State.owner = os.getpid()
        _State.pending = None
    _State.depth += 1
    try:
        yield True
    finally:
        _State.depth -= 1
        if _State.depth == 0:
            for signum, handler in _State.previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            _State.previous = {}
            _State.owner = None
            _State.pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a (first) signal only sets the flag that :func:`requested` reads."""
    with handled() as installed:
        _State.deferring += installed
        try:
            yield
        finally:
            _State.deferring -= installed
