"""Timing, memory and reporting helpers shared by the benchmark cases.

Every case measures a ratio of two things run in the same process on the same data, so the
result holds on a noisy machine: absolute numbers move with the machine, ratios much less.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Row:
    case: str
    measured: str
    reference: str
    ratio: float
    target: str
    passed: bool | None  # None: a measurement reported without a target
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(
    fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1
) -> float:
    """Best wall time of ``repeats`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> int:
    """Reset the process's peak-RSS mark to its current RSS (Linux); returns that RSS in bytes.

    Without the reset, the peak of the imports (torch alone is hundreds of MiB) would hide a
    smaller peak of the measured code. Elsewhere falls back to the lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # 5: reset the peak RSS (VmHWM), Linux >= 4.0
        return (_status_kib("VmRSS") or 0) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak_rss` (Linux), else of the process."""
    hwm = _status_kib("VmHWM")
    return (
        hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


@contextlib.contextmanager
def added_peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """``out["bytes"]``: the peak memory the block adds (``max_memory_allocated`` on CUDA, the
    peak RSS on CPU), set when the block ends; the device is synchronised on both sides."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    out: dict[str, int] = {}
    yield out
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    out["bytes"] = peak - base


def _child(fn: Callable[[], Any], queue: Any) -> None:
    gc.collect()
    base = reset_peak_rss()
    result = fn()
    queue.put((peak_rss() - base, result))


def peak_rss_in_child(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak resident memory growth (bytes) of ``fn`` run in a fresh process, and its result.

    A fresh process per measurement is the only clean way to read a CPU peak: ru_maxrss never
    goes down within a process. ``fn`` must be picklable (a module-level function/partial).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def ab_comparison(
    plain: tuple[float, float, int], saving: tuple[float, float, int], device: torch.device
) -> tuple[float, float, float, str]:
    """Two runs of one step, ``(loss, grad sum, peak bytes)`` each, without and with a memory
    saving: (memory ratio, |loss difference|, relative grad-sum difference, what was measured)."""
    (loss_a, grad_a, mem_a), (loss_c, grad_c, mem_c) = plain, saving
    what = "CUDA peak allocated" if device.type == "cuda" else "peak RSS"
    return mem_c / mem_a, abs(loss_a - loss_c), abs(grad_a - grad_c) / max(abs(grad_a), 1e-12), what
