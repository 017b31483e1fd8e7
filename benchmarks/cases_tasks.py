"""Case 1 (trainer overhead per task package) and case 7 (inference throughput).

Case 1 runs each package's real ``<pkg>-train`` on its demo data and intercepts medcore's
``Trainer.fit``: the real loop (dataset reads from disk, loader, augmentation, AMP policy,
logging, checkpointing; evaluation switched off) is timed there, then the same model and
``step_fn`` run the bare forward/backward/step on one batch already in memory, same process.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

import torch
from common import Row, sync

from medcore import trainer as trainer_mod
from medcore.checkpoint import unwrap_model
from medcore.device import autocast
from medcore.trainer import move_to_device

TASKS = ("ctclip", "ctretrieval", "cxrlandmarks", "histommnet", "binensemble")


class _Captured(Exception):
    """Raised after the first fit: one training loop is all the case needs."""


def _measure_fit(steps: int) -> tuple[dict, object]:
    measured: dict = {}
    original = trainer_mod.Trainer.fit

    def timed_fit(self, resume=None, stop_after_steps=None):
        self.evaluate_fn = None
        sync(self.device)
        start = time.perf_counter()
        original(self, resume=resume, stop_after_steps=stop_after_steps)
        sync(self.device)
        measured["real_s"] = time.perf_counter() - start
        measured["batches"] = self.batches_per_epoch * self.cfg.epochs
        measured["trainer"] = self
        raise _Captured

    return measured, (original, timed_fit)


def _bare_rate(trainer, batches: int) -> tuple[float, int]:
    """Samples/s of forward/backward/step on one in-memory batch, repeated ``batches`` times."""
    batch = move_to_device(
        next(iter(trainer._loader(0, 0))), trainer.device, trainer.cfg.channels_last
    )
    n = trainer_mod.batch_size_of(batch)
    model = trainer.train_model
    model.train()

    def one() -> None:
        with autocast(trainer.device, trainer.amp):
            out = trainer.step_fn(model, batch)
        loss = out[0] if isinstance(out, tuple) else out
        trainer.scaler.scale(loss.float()).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.optimizer.zero_grad(set_to_none=True)

    one()
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(batches):
        one()
    sync(trainer.device)
    return n * batches / (time.perf_counter() - start), n


def overhead(package: str, device: torch.device, quick: bool) -> Row:
    steps = 8 if quick else 30
    cli = importlib.import_module(f"{package}.cli")
    measured, (original, timed_fit) = _measure_fit(steps)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--device",
            device.type,
            "--epochs",
            "1",
            "--set",
            f"trainer.max_steps_per_epoch={steps}",
            "--set",
            "trainer.grad_accum_steps=1",
            "--set",
            "trainer.save_every_steps=0",
        ]
        # Warm-up run: demo data generated and cached, imports and first-call costs paid.
        cli.train(["--smoke", "--output-dir", str(Path(tmp) / "warm"), *argv])
        argv = ["--output-dir", str(Path(tmp) / "run"), *argv]
        trainer_mod.Trainer.fit = timed_fit
        try:
            cli.train(argv)
        except _Captured:
            pass
        finally:
            trainer_mod.Trainer.fit = original
        if "trainer" not in measured:
            raise RuntimeError(f"{package}-train did not reach medcore's Trainer.fit")
        trainer = measured["trainer"]
        real_batches = measured["batches"]
        bare, n = _bare_rate(trainer, real_batches)
        real = real_batches * trainer.batch_size / measured["real_s"]
        unwrap_model(trainer.model).to("cpu")
    ratio = real / bare
    return Row(
        f"1 trainer overhead: {package} ({real_batches} steps, batch {n})",
        f"{real:.1f} samples/s",
        f"bare loop {bare:.1f} samples/s",
        ratio,
        ">= 0.90",
        ratio >= 0.90,
    )


def case_overhead(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    for package in TASKS:
        try:
            rows.append(overhead(package, device, quick))
        except Exception as exc:  # one package failing must not hide the others' rows
            rows.append(
                Row(
                    f"1 trainer overhead: {package}",
                    "error",
                    "-",
                    float("nan"),
                    ">= 0.90",
                    False,
                    f"{type(exc).__name__}: {str(exc)[:120]}",
                )
            )
    return rows


CASES = {"overhead": case_overhead}
