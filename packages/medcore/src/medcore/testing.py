"""Helpers the packages' tests share: skip markers, tiny files, CLI capture, gloo DDP runs.

Needs pytest: install ``medcore[testing]`` (each package's ``test`` group does).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import inspect
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

skip_if_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load_function(file: str, name: str) -> Callable[..., Any]:
    # Test modules are imported by file (pytest --import-mode=importlib), so a spawned child
    # cannot import them by module name: load the defining file directly instead.
    spec = importlib.util.spec_from_file_location(f"_gloo_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _gloo_entry(
    rank: int, world_size: int, port: int, file: str, name: str, args: tuple[Any, ...]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _load_function(file, name)(rank, world_size, *args)
        # Tear down together: a rank that closes its sockets while its peer still finishes a
        # collective, or a DDP reducer still holding the group, can abort the peer.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown on success: gloo's worker threads can still be alive there and
    # abort the process ("terminate called without an active exception", pytorch#179291),
    # failing a run whose results are already written. A raising rank still exits through
    # torch's spawn wrapper, which reports its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined by gloo.

    ``fn`` must be a module-level function of a file (a test file is fine). Results travel
    through files the test names in ``args``; a failing rank fails the call.
    """
    file, name = inspect.getfile(fn), fn.__name__
    mp.spawn(
        _gloo_entry, args=(world_size, free_port(), file, name, args), nprocs=world_size, join=True
    )


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array ([H, W] or [H, W, 3|4]) as PNG with Pillow."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def random_image(size: tuple[int, int] = (32, 32), channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (*size, channels) if channels > 1 else size
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def call_main(
    main: Callable[[list[str]], int], argv: list[str], capsys: Any
) -> tuple[int, str, str]:
    """Run a command's ``main(argv)`` and return (exit code, stdout, stderr)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- fault-suite helpers (issue 9): shared by every package's tests/test_faults.py -------------


def error_line(err: str) -> str:
    """The single ``error: ...`` line of a command's stderr; fails on a traceback or on 0 / 2+.

    A progress bar cut short by the error may share the line, so the text before ``error:``
    is dropped.
    """
    assert "Traceback" not in err, err
    lines = [line[line.index("error:") :] for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def assert_refused_while_running(code: int, err: str, target: str | Path, pid: int) -> None:
    """A second job aimed at ``target`` while process ``pid`` works there was refused: exit 2
    and one ``error:`` line naming both the target and the running job's pid."""
    assert code == 2, err
    line = error_line(err)
    assert str(target) in line and f"in use by another running job (pid {pid})" in line, line


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class RunsCode:
    """A pickle payload: unpickling it creates the directory ``marker`` (any code could run).

    Put one in a checkpoint to prove a command refuses it: after the command, ``marker`` must
    not exist; a ``torch.load(path, weights_only=False)`` would create it.
    """

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.marker,))


def write_unsafe_checkpoint(path: str | Path, marker: str | Path, kind: str | None = None) -> Path:
    """A checkpoint that looks like ``kind``'s but carries a :class:`RunsCode` payload."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"model": {"w": torch.zeros(1)}, "x": RunsCode(marker)}
    if kind is not None:
        payload["kind"] = kind
    torch.save(payload, path)
    return path


def wait_until(
    condition: Callable[[], bool],
    proc: Any,
    log: str | Path | None = None,
    timeout: float = 400.0,
    poll: float = 0.1,
) -> None:
    """Wait for ``condition()`` while the subprocess ``proc`` is alive (a fault-test victim).

    Fails with the victim's stderr log when it exits first or the time runs out.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(poll)
    text = Path(log).read_text(errors="replace") if log is not None and Path(log).exists() else ""
    state = "timed out" if proc.poll() is None else f"exited with {proc.returncode}"
    raise AssertionError(f"the victim process {state} before the condition held\n{text}")


class PauseAt:
    """A call counter for fault runners: the ``n``-th call writes this process's PID to
    ``marker`` and sleeps, so the test can kill the process exactly there (``kill -9``)."""

    def __init__(self, marker: str | Path, n: int) -> None:
        self.marker, self.n, self.calls = Path(marker), n, 0

    @property
    def next_pauses(self) -> bool:
        """Whether the next call is the one that pauses."""
        return self.calls + 1 == self.n

    def __call__(self) -> None:
        import time

        self.calls += 1
        if self.calls == self.n:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def checkpoint_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The places (``"optimizer/state/3/exp_avg"``) where two checkpoint values differ: tensors
    bit for bit, dicts and sequences item by item, anything else by ``==``."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for k in a for d in checkpoint_differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in checkpoint_differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def signal_trainers_at(signal_name: str, where: str, n: int) -> None:
    """Make this process send itself ``signal_name`` (``"SIGTERM"``, ``"SIGINT"``, ...) in the
    ``n``-th call of a Trainer's step function (``where="step"``) or evaluation (``"eval"``),
    counted over every Trainer of the process (all the stages of a run): as a cluster's signal
    or a Ctrl-C arrives in the middle of that call. For a preemption test's victim process."""
    import signal

    from medcore.trainer import Trainer

    signum = getattr(signal, signal_name)
    attr = "step_fn" if where == "step" else "evaluate_fn"
    calls = {"n": 0}
    init = Trainer.__init__

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signum)
            return fn(*args, **kwargs)

        return call

    def counting_init(self: Trainer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, attr) is not None:
            setattr(self, attr, counted(getattr(self, attr)))

    Trainer.__init__ = counting_init  # type: ignore[method-assign]


def signalled_command(
    entry: str, signal_name: str, where: str, n: int, argv: list[str]
) -> list[str]:
    """The command line that runs ``entry`` (a console script's ``"module:function"``) with
    ``argv`` under :func:`signal_trainers_at` (``--devices N``: rank 0 signals itself)."""
    module, function = entry.split(":")
    code = (
        "import sys; from medcore.testing import signal_trainers_at; "
        f"signal_trainers_at({signal_name!r}, {where!r}, {int(n)}); "
        f"from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *argv]


@contextlib.contextmanager
def disk_full_on(name: str = "latest.pt", nth: int = 2) -> Iterator[None]:
    """While active, the ``nth`` ``os.replace`` onto a file called ``name`` fails with ENOSPC:
    the disk fills up just as a checkpoint is renamed into place. Other renames go through."""
    real = os.replace
    seen = [0]

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == name:
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real(src, dst, **kwargs)

    os.replace = replace
    try:
        yield
    finally:
        os.replace = real


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width x height`` RGB pixels, with almost no data
    (a decompression-bomb-sized header in a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def hub_snapshot(home: str | Path, repo: str, files: dict[str, bytes], rev: str = "0" * 40) -> Path:
    """Write ``files`` into a Hugging Face cache under ``home`` (what ``HF_HOME`` points at) in
    the hub's own layout: ``hub/models--ORG--NAME/blobs/<sha256>``, ``snapshots/<rev>/<name>``
    links to the blobs, ``refs/main`` naming the revision. Returns the snapshot directory.

    Lets weight-loading tests resolve ``hf-hub:ORG/NAME`` offline, as a user's cache would.
    """
    import hashlib

    folder = Path(home) / "hub" / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / rev
    for sub in (folder / "blobs", snap, folder / "refs"):
        sub.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / sha).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    (folder / "refs" / "main").write_text(rev)
    return snap
