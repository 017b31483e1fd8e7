"""What a Trainer checkpoint holds and how it is written and restored.

:class:`LoopState` is where a run is (epoch, position in it, step, best metric, history): one
dataclass, saved into every checkpoint as its fields and restored whole. The
:class:`Checkpointer` writes checkpoints on rank 0 (every rank takes part: sharded tensors and
RNG states are gathered) and restores a run exactly from ``latest.pt``.

Every checkpoint holds the weights, the loop state, the precision and world size, and the
task's ``extra_state`` (model config, normalisation: what evaluation reads). ``latest.pt``
also holds what continuing needs: optimizer, scheduler and GradScaler states and every rank's
RNG states. Best and final files leave those out (a third of ``latest.pt`` under Adam).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medcore.config import TrainerConfig
from medcore.engine.optim import Schedule
from medcore.engine.rng import rng_state, seed_everything, set_rng_state
from medcore.errors import CheckpointError
from medcore.runtime import distributed as dist_utils
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint, unwrap_model

if TYPE_CHECKING:
    from lightning_fabric import Fabric


@dataclass
class Best:
    """The best evaluation so far: the monitored metric's value and name, and its checkpoint."""

    value: float | None = None
    name: str | None = None
    path: str | None = None  # a string: checkpoints hold primitives only


@dataclass
class LoopState:
    """Where the training loop is; every checkpoint holds it (its fields as top-level keys)."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    global_step: int = 0  # optimizer steps taken
    best: Best = field(default_factory=Best)
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    nonfinite_streak: int = 0  # optimizer steps skipped in a row for a non-finite loss
    history: list[dict[str, float]] = field(default_factory=list)  # every evaluation's record

    def position(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> LoopState:
        """The loop state a checkpoint holds; keys it lacks keep their start values."""
        found = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state}
        found["best"] = Best(**(found.get("best") or {}))
        found["history"] = list(found.get("history", []))
        return cls(**found)


class Checkpointer:
    """Writes and restores a Trainer's checkpoints in ``run_dir/checkpoints``."""

    def __init__(
        self,
        fabric: Fabric,
        model: nn.Module,
        train_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        cfg: TrainerConfig,
        *,
        directory: Path,
        kind: str,
        seed: int,
        extra_state: dict[str, Any],
    ) -> None:
        self.fabric = fabric
        self.model = model  # the task's module: its state_dict has the task's names
        self.train_model = train_model  # Fabric's wrapper (an FSDP module gathers its shards)
        self.optimizer = optimizer
        self.schedule = schedule
        self.cfg = cfg
        self.directory = directory
        self.kind = kind
        self.seed = seed
        self.extra_state = extra_state
        self.precision: str = fabric.strategy.precision.precision
        self.fsdp = dist_utils.is_fsdp(fabric)
        self.is_main = fabric.global_rank == 0
        self.last_good: Path | None = None  # the latest.pt written or resumed from
        self.latest_at: tuple[int, int, int] | None = None  # the position it holds
        self.latest_time = time.monotonic()  # when it was written (or training began)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """Fabric's GradScaler under 16-mixed precision, else None."""
        return getattr(self.fabric.strategy.precision, "scaler", None)

    def _model_and_optimizer_state(
        self, with_optimizer: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.fsdp:
            # Every rank takes part; rank 0 receives the full (unsharded) tensors on the CPU.
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_state_dict,
            )

            module = self.train_model._forward_module
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            if with_optimizer:
                return get_state_dict(module, self.optimizer, options=options)
            return get_model_state_dict(module, options=options), None
        optimizer = self.optimizer.state_dict() if with_optimizer else None
        return unwrap_model(self.model).state_dict(), optimizer

    def payload(self, state: LoopState, resumable: bool) -> dict[str, Any]:
        """The checkpoint of ``state``; every rank must call it (it gathers sharded tensors and
        every rank's RNG state). ``resumable``: with what continuing the run needs."""
        model_state, optimizer_state = self._model_and_optimizer_state(resumable)
        payload: dict[str, Any] = {"model": model_state}
        if resumable:
            rngs = dist_utils.all_gather_object(rng_state())
            scaler = self.scaler
            payload |= {
                "optimizer": optimizer_state,
                "scheduler": self.schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rngs[0],
                "rng_ranks": rngs,
            }
        return payload | {
            **dataclasses.asdict(state),
            "world_size": self.fabric.world_size,
            "precision": self.precision,
            "saved_at": _dt.datetime.now().isoformat(timespec="seconds"),
            **self.extra_state,
        }

    def save(self, name: str, state: LoopState) -> Path | None:
        """Write ``checkpoints/name`` on rank 0 (every rank calls it); returns its path there.

        ``latest.pt`` holds everything a resume needs; any other file (best, final) the
        weights and what evaluation reads.
        """
        latest = name == "latest.pt"
        payload = self.payload(state, resumable=latest)
        path = self.directory / name
        if self.is_main:
            save_checkpoint(payload, path, kind=self.kind)
        if latest:
            self.last_good = path
            self.latest_at = state.position()
            self.latest_time = time.monotonic()
        return path if self.is_main else None

    def load(self, path: str | Path) -> LoopState:
        """Restore weights, optimizer, scheduler, scaler and RNG states from ``path``; returns
        the loop state to continue from."""
        state = load_checkpoint(path, map_location="cpu", kind=self.kind)
        if "model" in state and "optimizer" not in state and "rng" not in state:
            raise CheckpointError(
                path,
                "holds the model weights only (a best or final checkpoint); to continue its "
                "run, resume from the run's checkpoints/latest.pt (--resume latest --output-dir "
                "RUN)",
            )
        missing = [
            k for k in ("model", "optimizer", "epoch", "global_step", "rng") if k not in state
        ]
        if missing:
            raise CheckpointError(
                path, f"not a resumable training checkpoint (missing {', '.join(missing)})"
            )
        try:
            self._load_model_and_optimizer(state["model"], state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                path, f"does not match this model/config ({str(exc).splitlines()[0][:160]})"
            ) from None
        self.schedule.load_state_dict(state.get("scheduler"))
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        loop = LoopState.from_checkpoint(state)
        self._restore_rng(state, path, loop.global_step)
        self.last_good = Path(path)
        return loop

    def _load_model_and_optimizer(self, model_state: Any, optimizer_state: Any) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.train_model._forward_module,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optimizer_state,
                options=StateDictOptions(full_state_dict=True),
            )
            return
        unwrap_model(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def _restore_rng(self, state: dict[str, Any], path: str | Path, global_step: int) -> None:
        """Each rank continues its own random streams (dropout, augmentation)."""
        ranks = state.get("rng_ranks")
        world, rank = self.fabric.world_size, self.fabric.global_rank
        if ranks is not None and len(ranks) == world:
            set_rng_state(ranks[rank])
        elif (world == 1 and ranks is None) or (ranks is not None and len(ranks) == 1):
            set_rng_state(state["rng"])
        else:
            saved = len(ranks) if ranks is not None else 1
            if self.is_main:
                print(
                    f"warning: {path}: saved by {saved} rank(s), resumed on {world}: the random "
                    "streams restart from the seed; the run continues, not bit-identically",
                    file=sys.stderr,
                )
            seed_everything(self.seed + rank + 1_000_003 * global_step)

    def best_filename(self, epoch: int, value: float) -> str:
        if self.cfg.best_name:
            return self.cfg.best_name
        date = _dt.date.today().strftime("%Y%m%d")
        return f"{self.cfg.checkpoint_prefix}_{date}_epoch={epoch:03d}_metric={value:.4f}.pt"
