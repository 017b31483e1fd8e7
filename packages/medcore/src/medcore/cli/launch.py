"""``--devices N`` on one machine: the command starts its other N-1 ranks itself.

The process the user started becomes rank 0; ranks 1..N-1 are fresh interpreters that run the
same console-script entry point with the same arguments (``python -m medcore.cli.launch PROG
ARGS...``), so a package's ``main([...])`` called from a test launches exactly like its console
script. The environment they get (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``NODE_RANK``) is the one Fabric's ``LightningEnvironment`` reads, so Fabric then
sets up the process group (gloo on CPU, NCCL on CUDA) as it does under torchrun or SLURM.

Fabric's own launcher re-runs ``sys.argv``, which is pytest's when a test calls ``main``; hence
this one. A rank that fails ends the whole job: a watcher in rank 0 kills the other ranks and,
if rank 0 is stuck in a collective, ends it too after a short grace period. The started ranks
end with the command that started them, however it ends (``kill -9`` included): Linux's
parent-death signal, elsewhere a watchdog on the parent's pid. They run in their own session,
so a Ctrl-C in the terminal reaches rank 0 alone, which stops the job at a step boundary with
every rank (:mod:`medcore.runtime.interrupts`).
"""

from __future__ import annotations

import contextlib
import ctypes
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
# A rank stopped on a signal: rank 0 stops at the same step boundary and may still be writing
# latest.pt (seconds to a minute for billions of parameters); it is not cut off.
INTERRUPTED = 130
SAVE_GRACE_S = 300.0
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


def spawn_local(devices: int, prog: str, argv: Sequence[str]) -> None:
    """Start ranks 1..devices-1 of command ``prog`` (a console script, or ``module:function``)
    with arguments ``argv``, and make this process rank 0."""
    entry_point(prog)  # fail here, in one process, if the command cannot be found
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(devices),
        "LOCAL_WORLD_SIZE": str(devices),
        "NODE_RANK": "0",
        "MEDCORE_LAUNCHED": "1",
        "MEDCORE_PARENT_PID": str(os.getpid()),
    }
    for rank in range(1, devices):
        child_env = {**os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        _CHILDREN.append(
            subprocess.Popen(
                [sys.executable, "-m", "medcore.cli.launch", prog, *argv],
                env=child_env,
                # A Ctrl-C reaches rank 0 alone, which stops the others at the next step.
                # The parent-death signal is tied to the thread that starts the process: this
                # one, which runs the command until its ranks have ended.
                start_new_session=True,
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
            if code != INTERRUPTED:
                terminate_children()
            # Rank 0 usually sees the dead peer (or stops with the interrupted one) by itself.
            if _DONE.wait(SAVE_GRACE_S if code == INTERRUPTED else GRACE_S):
                return
            terminate_children()
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
    """End every rank this process started, with their DataLoader workers, at once and
    silently (their own errors were already printed; rank 0 writes every checkpoint)."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def wait_children(timeout: float = 120.0) -> int:
    """Wait for the started ranks to finish (those still running after ``timeout`` are
    killed); the first non-zero exit code, else 0."""
    deadline = time.monotonic() + timeout
    code = 0
    for proc in _CHILDREN:
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminate_children()
            proc.wait()
            rc = 1
        code = code or rc
    _CHILDREN.clear()
    return code


def launched_here() -> bool:
    """Whether this process started ranks of its own (``spawn_local``)."""
    return bool(_CHILDREN) or bool(_SAVED_ENV)


def finish(exit_code: int) -> int:
    """End of rank 0's command, which exits with ``exit_code``: wait for the other ranks (0,
    and 130: they stopped at the same step, on the same signal) or stop them, then give the
    process its environment back (a test that called ``main`` continues in it). Returns the
    first non-zero exit code of the other ranks after a successful command, else 0."""
    _DONE.set()
    code = wait_children() if exit_code == 0 else 0
    if exit_code == INTERRUPTED:
        wait_children(timeout=GRACE_S)
    elif exit_code != 0:
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


def _end_with_parent() -> None:
    """A started rank ends, at once and silently, when the command that started it ends."""
    parent = int(os.environ.get("MEDCORE_PARENT_PID", "0"))
    if not parent:
        return
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the signal was armed
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _parent_ended(wait: float) -> bool:
    """Whether the command that started this rank has ended (or ends within ``wait`` seconds:
    its sockets close before its death is signalled, so a collective fails first)."""
    parent = int(os.environ.get("MEDCORE_PARENT_PID", "0"))
    deadline = time.monotonic() + wait
    while parent and os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return bool(parent)


def main() -> None:
    """``python -m medcore.cli.launch PROG ARGS...``: run console script PROG's entry point."""
    _end_with_parent()
    prog, argv = sys.argv[1], sys.argv[2:]
    module, _, func = entry_point(prog).partition(":")
    fn = importlib.import_module(module)
    for part in func.split("."):
        fn = getattr(fn, part)
    try:
        code = fn(argv)
    except Exception:
        if _parent_ended(wait=1.0):  # killed with it: the command's end says it all
            os._exit(1)
        raise
    # Skip interpreter teardown: gloo's threads can abort it after a finished run (pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    main()
