"""The Trainer's checkpoints: what a checkpoint holds, writing it on rank 0, and exact resume.

A mixin of :class:`medcore.engine.trainer.Trainer` (it reads and sets the loop state the Trainer
owns); split out so that the loop and the checkpoint format each read on their own.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medcore.engine.rng import rng_state, seed_everything, set_rng_state
from medcore.errors import CheckpointError
from medcore.runtime import distributed as dist_utils
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint, unwrap_model


class CheckpointState:
    """``state_dict`` / ``load_state`` and the rank-0 checkpoint writes of the Trainer."""

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

    def state_dict(self, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint payload; every rank must call it (it gathers sharded tensors and
        every rank's RNG state).

        ``resumable``: with what continuing the run needs (optimizer, scheduler, scaler, every
        rank's RNG states); without it, the weights and what evaluation reads (the model's
        config and normalisation from ``extra_state``, epoch, step, metrics): best and final
        files, a third of ``latest.pt`` under Adam (its two moments per weight stay out).
        """
        model_state, optimizer_state = self._model_and_optimizer_state(resumable)
        state: dict[str, Any] = {"model": model_state}
        if resumable:
            rngs = dist_utils.all_gather_object(rng_state())
            scaler = self.scaler
            state |= {
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rngs[0],
                "rng_ranks": rngs,
                "nonfinite_streak": self.nonfinite_streak,
            }
        return state | {
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best": {
                "value": self.best_value,
                "name": self.best_name,
                "path": str(self.best_path) if self.best_path else None,
            },
            "bad_evals": self.bad_evals,
            "history": self.history,
            "saved_at": _dt.datetime.now().isoformat(timespec="seconds"),
            **self.extra_state,
        }

    def _position(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    def _save(self, name: str) -> Path | None:
        """Write ``checkpoints/name`` on rank 0; every rank calls it (state gathering).

        ``latest.pt`` holds everything a resume needs; any other file (best, final) the
        weights and what evaluation reads (:meth:`state_dict`).
        """
        latest = name == "latest.pt"
        state = self.state_dict(resumable=latest)
        path = self.ckpt_dir / name
        if self.is_main:
            save_checkpoint(state, path, kind=self.kind)
        if latest:
            self.last_good_checkpoint = path
            self._latest_position = self._position()
            self._latest_time = time.monotonic()
        return path if self.is_main else None

    def load_state(self, path: str | Path) -> None:
        """Restore everything needed to continue a run exactly where ``path`` left it."""
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
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state.get("batch_in_epoch", 0))
        self.global_step = int(state["global_step"])
        best = state.get("best") or {}
        self.best_value = best.get("value")
        self.best_name = best.get("name")
        self.best_path = Path(best["path"]) if best.get("path") else None
        self.bad_evals = int(state.get("bad_evals", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.history = list(state.get("history", []))
        self._restore_rng(state, path)
        self.last_good_checkpoint = Path(path)

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

    def _restore_rng(self, state: dict[str, Any], path: str | Path) -> None:
        """Each rank continues its own random streams (dropout, augmentation)."""
        ranks = state.get("rng_ranks")
        world = self.dist.world_size
        if ranks is not None and len(ranks) == world:
            set_rng_state(ranks[self.dist.rank])
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
            seed_everything(self.seed + self.dist.rank + 1_000_003 * self.global_step)

    def _best_filename(self, epoch: int, value: float) -> str:
        if self.cfg.best_name:
            return self.cfg.best_name
        date = _dt.date.today().strftime("%Y%m%d")
        return f"{self.cfg.checkpoint_prefix}_{date}_epoch={epoch:03d}_metric={value:.4f}.pt"
