"""Runs made of named stages: cxrlandmarks' phases, histommnet's folds, binensemble's models.

A stage is a named step of one run, with its own sub-directory ``<run_dir>/<name>`` (``name``
may be a relative path, e.g. ``cv/metric/fold1``). :func:`run_stage` runs it and, when it
returns, records it finished in ``<name>/stage.json`` together with its result (a JSON-able
dict: metrics, the paths of what it wrote). The run holds one lock (``start_run``'s) for all
its stages, and one ``--resume`` rule (see :mod:`medcore.cli.run_setup`) applies: a resumed run
skips every finished stage, returning the result it recorded, and resumes the unfinished one
from its ``checkpoints/latest.pt``. A signal (:mod:`medcore.runtime.interrupts`) ends the run
with :class:`~medcore.runtime.interrupts.Interrupted` from inside the running stage, after its
trainer saved: that stage stays unfinished and no later stage starts.

A finished stage's ``checkpoints/latest.pt`` (weights, optimizer state and RNG states, only
ever read to resume the stage) is deleted when the stage is recorded finished: a resumed run
skips the stage. Its best and final checkpoints stay. (A histommnet fold's ``latest.pt`` is
about 0.7 GB for the paper's backbone, so five folds keep 3.5 GB less.)

    with start_run(resolve_run(args, Config, "pkg", staged=True)) as run:
        for fold in range(5):
            run_stage(run, f"fold{fold}", lambda stage: train_fold(stage.dir, stage.resume))
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcore.cli.run_setup import RunContext
from medcore.errors import UserError
from medcore.io import atomic_write_json
from medcore.runtime.distributed import barrier
from medcore.weights.checkpoint import release_spares

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Stage:
    """What a stage's function gets: its name, its directory, the checkpoint to resume from."""

    name: str
    dir: Path
    resume: Path | None


def finished_result(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The recorded result of stage ``name`` of ``run_dir``, or None when it did not finish."""
    marker = Path(run_dir) / name / STAGE_FILE
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(
            marker, f"unreadable stage record ({exc}); delete it to rerun the stage"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        raise UserError(marker, "not a stage record; delete it to rerun the stage")
    return record["result"]


def run_stage(
    ctx: RunContext,
    name: str,
    fn: Callable[[Stage], dict[str, Any] | None],
    *,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run stage ``name`` of the run (every rank calls it), or skip it when a resumed run
    finished it already; returns the stage's result either way."""
    stage_dir = ctx.run_dir / name
    if ctx.resuming:
        done = finished_result(ctx.run_dir, name)
        if done is not None:
            if ctx.dist.is_main and not quiet:
                print(f"{name}: finished before the interruption; skipped", file=sys.stderr)
            return done
    marker = stage_dir / STAGE_FILE
    if ctx.dist.is_main and marker.is_file():
        marker.unlink()  # a stage that reruns is unfinished until it returns again
    latest = stage_dir / "checkpoints" / "latest.pt"
    resume = latest if ctx.resuming and latest.is_file() else None
    if resume is not None and ctx.dist.is_main and not quiet:
        print(f"{name}: resuming from {resume}", file=sys.stderr)
    result = dict(fn(Stage(name, stage_dir, resume)) or {})
    if ctx.dist.is_main:
        atomic_write_json(marker, {"stage": name, "finished": True, "result": result})
        # Only a resume reads it, and a resumed run skips a finished stage.
        latest.unlink(missing_ok=True)
        release_spares(latest.parent)
    barrier()
    return result
