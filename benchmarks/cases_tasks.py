"""Case 1 (trainer overhead per task package) and case 7 (inference throughput).

Case 1 runs each package's real ``<pkg>-train`` on its demo data and intercepts medcore's
``Trainer.fit``: the real loop (dataset reads from disk, loader, augmentation, AMP policy,
logging, checkpointing; evaluation switched off) is timed there, then the same model and
``step_fn`` run the bare forward/backward/step on one batch already in memory, same process.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from pathlib import Path

import torch
from common import Row, best_time, fmt_s, sync

from medcore.engine import trainer as trainer_mod
from medcore.engine.batching import move_to_device
from medcore.runtime.device import autocast
from medcore.weights.checkpoint import unwrap_model

TASKS = ("ctclip", "ctretrieval", "cxrlandmarks", "histommnet", "binensemble")


class _Captured(Exception):
    """Raised after the first fit: one training loop is all the case needs."""


def capture(
    package: str,
    device: torch.device,
    steps: int,
    run_fit: bool = True,
    extra: tuple = (),
    epochs: int = 1,
) -> dict:
    """Run ``<package>-train`` on its demo config up to medcore's ``Trainer.fit`` and capture it.

    With ``run_fit`` the real loop runs ``steps`` batches (evaluation off) and is timed: from
    the first step's start (the start-up before it, DataLoader and first batch, is reported
    apart) to the end of ``fit`` (final checkpoint included). Returns the trainer and timings.
    """
    cli = importlib.import_module(f"{package}.cli")
    measured: dict = {}
    original = trainer_mod.Trainer.fit

    def timed_fit(self, resume=None):
        measured["trainer"] = self
        if not run_fit:
            raise _Captured
        self.evaluate_fn = None
        step_fn = self.step_fn

        def first_step_timed(model, batch):
            measured.setdefault("first_step", time.perf_counter())
            return step_fn(model, batch)

        self.step_fn = first_step_timed
        save = self.checkpoints.save
        measured["save_s"] = 0.0

        def timed_save(name, state):
            t0 = time.perf_counter()
            try:
                return save(name, state)
            finally:
                measured["save_s"] += time.perf_counter() - t0

        self.checkpoints.save = timed_save
        # The loader alone, first: a dataset that caches decoded images (cxrlandmarks) is then
        # warm for the timed loop, as in every epoch after the first of a real run.
        measured["loader"] = _loader_rate(self)
        sync(self.device)
        start = time.perf_counter()
        try:
            original(self, resume=resume)
            sync(self.device)
        finally:
            self.step_fn = step_fn
            self.checkpoints.save = save
        end = time.perf_counter()
        measured["startup_s"] = measured["first_step"] - start
        measured["real_s"] = end - measured["first_step"]
        measured["batches"] = self.data.batches_per_epoch * self.cfg.epochs
        raise _Captured

    argv = [
        "--device",
        device.type,
        "--epochs",
        str(epochs),
        "--set",
        f"trainer.max_steps_per_epoch={steps}",
        "--set",
        "trainer.grad_accum_steps=1",
        "--set",
        "trainer.save_every_steps=0",
        *(arg for item in extra for arg in ("--set", item)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if run_fit:  # warm-up: demo data generated and cached, imports and first calls paid
            cli.train(["--smoke", "--output-dir", str(Path(tmp) / "warm"), *argv])
        trainer_mod.Trainer.fit = timed_fit
        try:
            cli.train(["--output-dir", str(Path(tmp) / "run"), *argv])
        except _Captured:
            pass
        finally:
            trainer_mod.Trainer.fit = original
    if "trainer" not in measured:
        raise RuntimeError(f"{package}-train did not reach medcore's Trainer.fit")
    return measured


def one_batch(trainer) -> object:
    return move_to_device(
        next(iter(trainer.data.epoch(0, 0))), trainer.device, trainer.cfg.channels_last
    )


def train_step(trainer, batch, amp=None) -> None:
    """One bare forward/backward/optimizer step of the captured trainer on ``batch``: what the
    real loop does per batch minus loading, logging, checkpointing and its safety checks."""
    amp = trainer.amp if amp is None else amp
    with autocast(trainer.device, amp):
        out = trainer.step_fn(trainer.train_model, batch)
    loss = out[0] if isinstance(out, tuple) else out
    trainer.fabric.backward(loss.float())  # Fabric's precision plugin scales it under 16-mixed
    # The configuration's own optimizer step: gradient clipping, scaler, scheduler included.
    trainer._optimizer_step()


def _bare_rate(trainer, batches: int) -> tuple[float, int]:
    """Samples/s of forward/backward/step on one in-memory batch, repeated ``batches`` times."""
    batch = one_batch(trainer)
    n = trainer_mod.batch_size_of(batch)
    trainer.train_model.train()
    train_step(trainer, batch)
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(batches):
        train_step(trainer, batch)
    sync(trainer.device)
    return n * batches / (time.perf_counter() - start), n


def _loader_rate(trainer) -> float:
    """Samples/s of the training DataLoader alone (reading, decoding, augmenting, collating)."""
    start, n = time.perf_counter(), 0
    for batch in trainer.data.epoch(0, 0):
        n += trainer_mod.batch_size_of(batch)
    return n / (time.perf_counter() - start)


def overhead(package: str, device: torch.device, quick: bool) -> Row:
    # Several short epochs: each one's loader start and every checkpoint the demo config writes
    # (latest.pt at most every 30 s: the last epoch's) are counted, as in a real run, and the
    # timed window is long enough to be stable on a busy machine.
    steps, epochs = (12, 3) if quick else (40, 5)
    measured = capture(package, device, steps, epochs=epochs)
    trainer = measured["trainer"]
    real_batches = measured["batches"]
    bare, n = _bare_rate(trainer, real_batches)
    real = real_batches * trainer.batch_size / measured["real_s"]
    loader = measured["loader"]
    unwrap_model(trainer.model).to("cpu")
    ratio = real / bare
    # Where the time goes: a loop that only loads would run at `loader` samples/s; loading in
    # the main process (num_workers 0) and the step then add up: 1 / (1/bare + 1/loader).
    serial = 1 / (1 / bare + 1 / loader)
    return Row(
        f"1 trainer overhead: {package} ({real_batches} steps, batch {n})",
        f"{real:.1f} samples/s",
        f"bare loop {bare:.1f} samples/s",
        ratio,
        ">= 0.90",
        ratio >= 0.90,
        f"loader alone {loader:.0f} samples/s (workers {trainer.data.num_workers}), load+step "
        f"in series {serial / bare:.2f}; checkpoint writes {measured['save_s']:.2f} s of "
        f"{measured['real_s']:.2f} s; start-up {measured['startup_s']:.2f} s not counted",
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


# -- 7: inference throughput of the demo-sized models ------------------------------------------


def _images_per_s(fn, images: torch.Tensor, device: torch.device, repeats: int) -> float:
    return images.shape[0] / best_time(fn, device, repeats=repeats)


def _inference_rows(device: torch.device, quick: bool) -> list[Row]:
    from binensemble.tta import TTA_VIEWS, tta_embed
    from cxrlandmarks.predict import predict_batches

    repeats = 3 if quick else 10
    rows = []
    for package in ("cxrlandmarks", "binensemble"):
        trainer = capture(package, device, steps=1, run_fit=False)["trainer"]
        model = unwrap_model(trainer.model).eval()
        image = one_batch(trainer)["image"]
        gen = torch.Generator().manual_seed(0)
        images = torch.randn((32, *image.shape[1:]), generator=gen).to(device)

        def bare(model=model, images=images, amp=trainer.amp) -> None:
            with torch.no_grad(), autocast(device, amp):
                model(images)

        if package == "cxrlandmarks":

            def ours(model=model, images=images, amp=trainer.amp) -> None:
                with autocast(device, amp):
                    predict_batches([model], images, tta_flip=False)

            what, ref_what = "predict_batches", "model(x)"
            views = 1
        else:

            def ours(model=model, images=images, amp=trainer.amp) -> None:
                with torch.no_grad(), autocast(device, amp):
                    tta_embed(model, images, TTA_VIEWS)

            what, ref_what = f"tta_embed, {len(TTA_VIEWS)} views", "one view model(x)"
            views = len(TTA_VIEWS)
        rate = _images_per_s(ours, images, device, repeats)
        ref = _images_per_s(bare, images, device, repeats)
        size = "x".join(str(v) for v in images.shape[-2:])
        rows.append(
            Row(
                f"7 inference: {package} demo model, batch 32 at {size}",
                f"{rate:.1f} images/s ({what})",
                f"{ref:.1f} images/s ({ref_what})",
                rate / ref,
                "report",
                None,
                f"expected ratio about 1/{views} (one forward per view)" if views > 1 else "",
            )
        )
    return rows


def case_inference(device: torch.device, quick: bool) -> list[Row]:
    return _inference_rows(device, quick)


# -- 8: bf16 against fp32, model FLOP utilisation (GPU) ------------------------------------


def _matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the practical peak of this device."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = best_time(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * n**3 / t


def _step_flops(trainer, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(trainer, batch)
    return counter.get_total_flops()


def case_amp(device: torch.device, quick: bool) -> list[Row]:
    from medcore.runtime.device import amp_policy

    # BENCH_AMP_ON_CPU=1 runs it on CPU too (bf16 autocast): a check of the case's code path.
    if device.type != "cuda" and os.environ.get("BENCH_AMP_ON_CPU") != "1":
        return [
            Row(
                "8 bf16 vs fp32, MFU (all tasks)",
                "skipped",
                "-",
                float("nan"),
                "GPU only",
                None,
                "no CUDA device: run `uv run nox -s bench` on a GPU machine",
            )
        ]
    peak = _matmul_peak(device, torch.bfloat16)
    repeats = 5 if quick else 20
    rows = []
    for package in TASKS:
        try:
            trainer = capture(package, device, steps=1, run_fit=False)["trainer"]
            batch = one_batch(trainer)
            trainer.train_model.train()
            bf16 = amp_policy(device, True, dtype="bf16")
            fp32 = amp_policy(device, False)
            times = {}
            for name, policy in (("fp32", fp32), ("bf16", bf16)):
                times[name] = best_time(
                    lambda t=trainer, b=batch, policy=policy: train_step(t, b, policy),
                    device,
                    repeats,
                )
            flops = _step_flops(trainer, batch)
            mfu = flops / times["bf16"] / peak
            speedup = times["fp32"] / times["bf16"]
            rows.append(
                Row(
                    f"8 bf16 vs fp32 step: {package} (batch {trainer_mod.batch_size_of(batch)})",
                    f"bf16 {fmt_s(times['bf16'])}, MFU {mfu:.1%}",
                    f"fp32 {fmt_s(times['fp32'])}",
                    speedup,
                    "report",
                    None,
                    f"{flops / 1e9:.1f} GFLOP/step (flop_counter) vs bf16 matmul {peak / 1e12:.1f} TFLOP/s",
                )
            )
            unwrap_model(trainer.model).to("cpu")
        except Exception as exc:
            rows.append(
                Row(
                    f"8 bf16 vs fp32 step: {package}",
                    "error",
                    "-",
                    float("nan"),
                    "report",
                    False,
                    f"{type(exc).__name__}: {str(exc)[:120]}",
                )
            )
    return rows


CASES = {"overhead": case_overhead, "inference": case_inference, "gpu_amp": case_amp}
