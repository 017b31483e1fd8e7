"""Exceptions that mean "the user's input is wrong", reported as one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment, never a bug.

    Rendered by :func:`medcore.cli.command.run_cli` as ``error: <what>: <why>`` on stderr, exit code 2.
    """

    def __init__(self, what: str | Path, why: str) -> None:
        self.what = str(what)
        self.why = why
        super().__init__(f"{self.what}: {why}")


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type or an unreadable config file."""


class DataError(UserError):
    """A data file that is missing, unreadable, corrupt or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, unsafe or from another model."""


class TrainingDiverged(UserError):
    """The loss was not finite for too many consecutive steps."""
