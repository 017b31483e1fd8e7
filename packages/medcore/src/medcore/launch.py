"""``--devices N`` on one machine: the command starts its other N-1 ranks itself.

The process the user started becomes rank 0; ranks 1..N-1 are fresh interpreters that run the
same console-script entry point with the same arguments (``python -m medcore.launch PROG
ARGS...``), so a package's ``main([...])`` called from a test launches exactly like its console
script. The environment they get (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``NODE_RANK``) is the one Fabric's ``LightningEnvironment`` reads, so Fabric then
sets up the process group (gloo on CPU, NCCL on CUDA) as it does under torchrun or SLURM.

Fabric's own launcher re-runs ``sys.argv``, which is pytest's when a test calls ``main``; hence
this one. A rank that fails ends the whole job: a watcher in rank 0 terminates the other ranks
and, if rank 0 is stuck in a collective, ends it too after a short grace period.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from medcore.errors import UserError

GRACE_S = 5.0
_CHILDREN: list[subprocess.Popen] = []
_FAILED: list[tuple[int, int]] = []  # (rank, exit code) of ranks that died
_DONE = threading.Event()  # rank 0 finished the command itself: the watcher stands down
_SAVED_ENV: dict[str, str | None] = {}  # rank 0's environment before it became rank 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def entry_point(prog: str) -> str:
    """``module:function`` of the console script ``prog`` (e.g. ``histommnet.cli:train``);
    a ``prog`` that is already ``module:function`` names itself."""
    if ":" in prog:
        return prog
    found = importlib.metadata.entry_points(group="console_scripts", name=prog)
    if not found:
        raise UserError("--devices", f"cannot relaunch {prog!r}: no such console script installed")
    return next(iter(found)).value


def spawn_local(devices: int, prog: str | None, argv: Sequence[str] | None) -> None:
    """Start ranks 1..devices-1 of this command and make this process rank 0."""
    if prog is None or argv is None:
        raise UserError(
            "--devices", "this command cannot start its own ranks; run it under torchrun instead"
        )
    entry_point(prog)  # fail here, in one process, if the command cannot be found
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(devices),
        "LOCAL_WORLD_SIZE": str(devices),
        "NODE_RANK": "0",
        "MEDCORE_LAUNCHED": "1",
    }
    for rank in range(1, devices):
        child_env = {**os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        _CHILDREN.append(
            subprocess.Popen(
                [sys.executable, "-m", "medcore.launch", prog, *argv],
                env=child_env,
                start_new_session=True,  # a Ctrl-C reaches rank 0, which ends the others
            )
        )
    _DONE.clear()
    rank0 = {**env, "RANK": "0", "LOCAL_RANK": "0"}
    _SAVED_ENV.update({k: os.environ.get(k) for k in rank0})
    os.environ.update(rank0)
    threading.Thread(target=_watch, name="medcore-rank-watcher", daemon=True).start()


def _watch() -> None:
    """Rank 0's watcher: the first rank to die with an error ends the job within seconds."""
    while _CHILDREN:
        for rank, proc in enumerate(list(_CHILDREN), start=1):
            code = proc.poll()
            if code is None or code == 0:
                continue
            _FAILED.append((rank, code))
            terminate_children()
            if _DONE.wait(GRACE_S):  # rank 0 usually sees the dead peer and ends by itself
                return
            print(f"error: rank {rank}: exited with code {code}; job stopped", file=sys.stderr)
            sys.stderr.flush()
            os._exit(code if 0 < code < 128 else 1)
        if all(p.poll() == 0 for p in _CHILDREN):
            return
        time.sleep(0.2)


def failed_rank(wait: float = 3.0) -> tuple[int, int] | None:
    """(rank, exit code) of a started rank that died, if one did; waits up to ``wait`` seconds
    for the watcher to see it (rank 0 may notice the dead peer first)."""
    if not _CHILDREN:
        return _FAILED[0] if _FAILED else None
    deadline = time.monotonic() + wait
    while not _FAILED and time.monotonic() < deadline:
        time.sleep(0.05)
    return _FAILED[0] if _FAILED else None


def terminate_children() -> None:
    """End every rank this process started (their own errors were already printed)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)


def wait_children(timeout: float = 120.0) -> int:
    """Wait for the started ranks to finish; the first non-zero exit code, else 0."""
    deadline = time.monotonic() + timeout
    code = 0
    for proc in _CHILDREN:
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminate_children()
            rc = 1
        code = code or rc
    _CHILDREN.clear()
    return code


def launched_here() -> bool:
    """Whether this process started ranks of its own (``spawn_local``)."""
    return bool(_CHILDREN) or bool(_SAVED_ENV)


def finish(ok: bool) -> int:
    """End of rank 0's command: wait for the other ranks (``ok``) or stop them, then give the
    process its environment back (a test that called ``main`` continues in it)."""
    _DONE.set()
    code = wait_children() if ok else 0
    if not ok:
        terminate_children()
        wait_children(timeout=GRACE_S)
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_ENV.clear()
    _FAILED.clear()
    return code


def main() -> None:
    """``python -m medcore.launch PROG ARGS...``: run console script PROG's entry point."""
    prog, argv = sys.argv[1], sys.argv[2:]
    module, _, func = entry_point(prog).partition(":")
    fn = importlib.import_module(module)
    for part in func.split("."):
        fn = getattr(fn, part)
    code = fn(argv)
    # Skip interpreter teardown: gloo's threads can abort it after a finished run (pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    main()
