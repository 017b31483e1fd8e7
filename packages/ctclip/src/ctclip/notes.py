"""The loud lines that name what a command left out: a count and the first few names."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def name_left_out(prefix: str, names: Sequence[str], what: str) -> None:
    """``<prefix><n> <what> (first: a, b, c)`` on stderr when ``names`` is not empty."""
    if names:
        first = ", ".join(list(names)[:3])
        print(f"{prefix}{len(names)} {what} (first: {first})", file=sys.stderr)
