"""Helpers the packages' tests share: skip markers, tiny files, CLI capture, gloo DDP runs,
fault injection, and the checks that an override changes exactly the keys it names.

Needs pytest: install ``medcore[testing]`` (each package's ``test`` group does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import importlib.util
import inspect
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

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


def stopping_in_call(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
    """``fn`` that asks the run to stop (:func:`medcore.runtime.interrupts.request_stop`) in its
    ``n``-th call, as a signal arriving during that call would: given a Trainer's step function,
    ``fit`` stops at the end of the optimizer step that call belongs to, writes ``latest.pt``
    and raises Interrupted."""
    from medcore.runtime import interrupts

    calls = {"n": 0}

    def call(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            interrupts.request_stop(f"stop requested in call {n}")
        return fn(*args, **kwargs)

    return call


def signal_trainers_at(signal_name: str, where: str, n: int) -> None:
    """Make this process send itself ``signal_name`` (``"SIGTERM"``, ``"SIGINT"``, ...) in the
    ``n``-th call of a Trainer's step function (``where="step"``) or evaluation (``"eval"``),
    counted over every Trainer of the process (all the stages of a run): as a cluster's signal
    or a Ctrl-C arrives in the middle of that call. For a preemption test's victim process."""
    import signal

    from medcore.engine.trainer import Trainer

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


# -- config overrides (issue 24): shared by every package's tests/test_overrides.py ------------

Resolve = Callable[[list[str]], Any]
"""``resolve(argv)``: the config a command resolves from these flags (``["--set", "a.b=1"]``)."""

_ABSENT = object()
# What README examples write instead of a value: replaced by a value of the key's own type.
_PLACEHOLDERS = re.compile(r"^([A-Z]|\.\.\.|value)$")
_SET_EXAMPLE = re.compile(r"--set\s+([A-Za-z_][\w.]*)=([^\s`]+)")


def packaged_configs(package: str) -> list[str]:
    """The names of the configs ``<package>/configs/*.yaml`` ships (the demo's included)."""
    from importlib import resources

    folder = resources.files(package).joinpath("configs")
    return sorted(
        f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")
    )


def config_diff(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """The leaves in which two configs (or their ``to_dict`` trees) differ: dotted key ->
    (value in ``a``, value in ``b``); a key only one side has pairs with ``None``."""
    from medcore.config import to_dict

    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(x.keys() | y.keys(), key=str):
                walk(x.get(k, _ABSENT), y.get(k, _ABSENT), f"{key}{k}.")
        elif x != y:
            out[key.rstrip(".")] = (None if x is _ABSENT else x, None if y is _ABSENT else y)

    walk(to_dict(a), to_dict(b), "")
    return out


def _sample(tp: Any) -> list[Any]:
    """Values of type ``tp`` for a key that holds None (or an empty list) now."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [v for arg in args if arg is not type(None) for v in _sample(arg)]
    if origin is typing.Literal:
        return list(args)
    if origin is tuple:
        items = args[:-1] if args and args[-1] is Ellipsis else args
        return [[_sample(a)[0] for a in items]] if items and _sample(items[0]) else []
    if origin is list:
        item = _sample(args[0]) if args else [1]
        return [[item[0]] * 3] if item else []
    simple = {bool: [True], int: [3, 1], float: [0.5], str: ["probe"], Path: ["probe"]}
    return simple.get(tp, [1] if tp is Any else [])


def _changed(value: Any, tp: Any) -> list[Any]:
    """Values of type ``tp`` other than ``value``, the likeliest to be valid first."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return _sample(tp)
    if origin in (typing.Union, types.UnionType):
        return [v for arg in args if arg is not type(None) for v in _changed(value, arg)][:4]
    if origin is typing.Literal:
        return [a for a in args if a != value]
    if isinstance(value, (list, tuple)):
        first = _changed(value[0], args[0] if args else Any)
        out = [[first[0], *value[1:]]] if first else []
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return out if fixed or len(value) < 2 else [*out, list(value[:-1])]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value + 0.125, value / 2, value * 2 + 1]
    if isinstance(value, (str, Path)):
        return [f"{value}_probe"]
    return []


def _set_item(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return f"{key}={text.removesuffix(chr(10)).removesuffix(chr(10) + '...').strip()}"


def override_probes(cfg: Any) -> dict[str, list[str]]:
    """For every key of every section of ``cfg`` (at any depth; for a ``dict`` field, one
    entry, or every key of each entry that is a section), ``--set`` items that change that key
    alone, the likeliest to be valid first. A section that holds None has no values to keep
    and is left out."""
    probes: dict[str, list[str]] = {}

    def walk(node: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            key, value, tp = f"{prefix}{f.name}", getattr(node, f.name), hints[f.name]
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            elif value is None and any(map(dataclasses.is_dataclass, typing.get_args(tp))):
                continue
            elif isinstance(value, dict) and any(map(dataclasses.is_dataclass, value.values())):
                for entry, section in value.items():
                    walk(section, f"{key}.{entry}.")
            elif isinstance(value, dict):
                vt = (typing.get_args(tp) or (Any, Any))[1]
                entry = next(iter(value), "probe")
                current = value.get(entry)
                values = _changed(current, vt) if entry in value else _sample(vt)
                probes[f"{key}.{entry}"] = [_set_item(f"{key}.{entry}", v) for v in values]
            else:
                probes[key] = [_set_item(key, v) for v in _changed(value, tp)]

    walk(cfg, "")
    return probes


def _plain(value: Any) -> Any:
    from medcore.config import to_dict

    return to_dict({"v": value})["v"]


def _at(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, _ABSENT) if isinstance(tree, dict) else _ABSENT
    return tree


def assert_set_changes_only(resolve: Resolve, item: str, base: Any = None) -> None:
    """``--set item`` resolves to ``base`` (the config without it) with that one key changed
    to that value, and nothing else changed."""
    from medcore.config import parse_override, to_dict

    base = resolve([]) if base is None else base
    parts, value = parse_override(item)
    key = ".".join(parts)
    cfg = resolve(["--set", item])
    stray = [k for k in config_diff(base, cfg) if k != key and not k.startswith(f"{key}.")]
    assert not stray, f"--set {item} also changed {stray}"
    got = _at(to_dict(cfg), key)
    assert got == _plain(value) or (isinstance(got, float) and got == float(value)), (
        f"--set {item} resolved {key} to {got!r}"
    )


def assert_overrides_change_only_their_key(
    resolve: Resolve, alone_invalid: Sequence[str] = ()
) -> list[str]:
    """Override every key of every section of the resolved config, one at a time: each
    resolves to a config that differs in that key only. Returns the keys checked.

    ``alone_invalid``: the keys no value of which is valid without changing another key too
    (the config refuses each probe with a ConfigError); any other refused key fails.
    """
    from medcore.errors import ConfigError

    base = resolve([])
    checked, refused = [], {}
    for key, items in override_probes(base).items():
        errors = []
        for item in items:
            try:
                assert_set_changes_only(resolve, item, base)
            except ConfigError as exc:
                errors.append(f"{item}: {exc}")
                continue
            checked.append(key)
            break
        else:
            refused[key] = errors or ["no probe value for this type"]
    assert set(refused) == set(alone_invalid), refused
    return checked


def assert_epochs_set_only(resolve: Resolve, epochs_keys: Sequence[str], n: int = 3) -> list[str]:
    """``--epochs n`` sets every key of ``epochs_keys`` to n and changes nothing else;
    returns the keys whose value changed."""
    from medcore.config import to_dict

    base, cfg = resolve([]), resolve(["--epochs", str(n)])
    changed = sorted(config_diff(base, cfg))
    assert set(changed) <= set(epochs_keys), f"--epochs {n} changed {changed}"
    assert all(_at(to_dict(cfg), key) == n for key in epochs_keys)
    return changed


def assert_smoke_changes_only(resolve: Resolve, items: Sequence[str]) -> dict[str, Any]:
    """``--smoke`` changes the keys of its override ``items`` and nothing else (every section
    keeps its research structure); returns the changed keys and their new values."""
    from medcore.config import parse_override

    allowed = {".".join(parse_override(item)[0]) for item in items}
    diff = config_diff(resolve([]), resolve(["--smoke"]))
    assert set(diff) <= allowed, f"--smoke changed {sorted(set(diff) - allowed)}"
    return {key: new for key, (_, new) in diff.items()}


def readme_set_examples(*texts: str) -> list[str]:
    """The ``--set key=value`` items of README texts; a placeholder value (``N``, ``K``,
    ``...``) becomes ``?`` (:func:`assert_readme_set_examples` fills in one of the key's type),
    and the generic ``key=value`` / ``key.sub=value`` is left out."""
    items = []
    for text in texts:
        for key, value in _SET_EXAMPLE.findall(text):
            if key in ("key", "key.sub", "a.b"):
                continue
            items.append(f"{key}={'?' if _PLACEHOLDERS.match(value) else value}")
    return list(dict.fromkeys(items))


def package_readme_set_examples(package_dir: str | Path, package: str) -> list[str]:
    """The ``--set`` examples of a package's README and of the workspace README's lines that
    name one of the package's commands (``<package>-``)."""
    package_dir = Path(package_dir)
    texts = [(package_dir / "README.md").read_text(encoding="utf-8")]
    root = package_dir.parent.parent / "README.md"
    if root.is_file():
        lines = root.read_text(encoding="utf-8").splitlines()
        texts.append("\n".join(line for line in lines if f"{package}-" in line))
    return readme_set_examples(*texts)


def dry_run_config(command: Callable[[list[str]], int], argv: list[str], run_dir: Path) -> dict:
    """The ``config.yaml`` that ``command(argv + --dry-run)`` writes into ``run_dir``, without
    its ``output_dir`` (which differs between runs)."""
    code = command([*argv, "--dry-run", "--output-dir", str(run_dir)])
    assert code == 0, f"{argv} --dry-run exited {code}"
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    cfg.pop("output_dir")
    return cfg


def assert_readme_set_examples(resolve: Resolve, items: Sequence[str]) -> None:
    """Each README example resolves to the documented change only (a ``?`` value: a value
    of the key's type other than the config's)."""
    base = resolve([])
    probes = override_probes(base)
    for item in items:
        key, value = item.split("=", 1)
        if value == "?":
            assert key in probes, f"README: --set {key}: no such key"
            item = probes[key][0]
        assert_set_changes_only(resolve, item, base)


# ---------------------------------------------------------------------------------------------
# weights files as training frameworks write them

LIGHTNING_VERSION = "2.5.1"
_CHECKPOINT_CALLBACK = (
    "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
    "'every_n_epochs': 1, 'train_time_interval': None}"
)


class LightningLike(torch.nn.Module):
    """A LightningModule's parameters: ``net`` under the attribute ``attr`` (``self.model =
    net``), and a loss whose class weights are a buffer, so the state dict holds more than
    the network."""

    def __init__(self, net: torch.nn.Module, attr: str = "model", classes: int = 1000) -> None:
        super().__init__()
        setattr(self, attr, net)
        self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(classes))


def _progress(n: int) -> dict[str, int]:
    return {"ready": n, "started": n, "processed": n, "completed": n}


def lightning_checkpoint(
    lit: torch.nn.Module, hyper_parameters: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What Lightning's ``Trainer.save_checkpoint`` writes for ``lit`` after 3 epochs.

    The keys of ``_CheckpointConnector.dump_checkpoint`` (lightning/pytorch/trainer/connectors/
    checkpoint_connector.py), the loops' ``_Loop.state_dict`` progress trackers, ModelCheckpoint's
    state under its ``state_key``, and real AdamW and cosine-schedule states: one AdamW step on
    ``lit``'s first parameter (which changes it, as training does, before the weights are taken).
    Save it with ``torch.save`` (Lightning's ``_atomic_save`` writes the same archive).
    """
    optimizer = torch.optim.AdamW(lit.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    first = next(lit.parameters())
    first.grad = torch.ones_like(first)
    optimizer.step()
    scheduler.step()
    first.grad = None
    score = torch.tensor(0.4123)
    batches = {"total": _progress(120), "current": _progress(40), "is_last_batch": True}
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": 120},
        "epoch_loop.batch_progress": batches,
        "epoch_loop.scheduler_progress": {
            "total": {"ready": 3, "completed": 3},
            "current": {"ready": 1, "completed": 1},
        },
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {
                "step": {"total": {"ready": 120, "completed": 120}, "current": {}},
                "zero_grad": {"total": _progress(120), "current": _progress(40)},
            }
        },
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": batches,
        "epoch_progress": {"total": _progress(3), "current": _progress(3)},
    }
    evaluation = {"state_dict": {}, "batch_progress": batches}
    return {
        "epoch": 2,
        "global_step": 120,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": lit.state_dict(),
        "loops": {
            "fit_loop": fit_loop,
            "validate_loop": evaluation,
            "test_loop": evaluation,
            "predict_loop": evaluation,
        },
        "callbacks": {
            _CHECKPOINT_CALLBACK: {
                "monitor": "val_loss",
                "best_model_score": score,
                "best_model_path": "/runs/lightning_logs/version_0/checkpoints/epoch=2.ckpt",
                "current_score": score,
                "dirpath": "/runs/lightning_logs/version_0/checkpoints",
                "best_k_models": {"/runs/epoch=2.ckpt": score},
                "kth_best_model_path": "/runs/epoch=2.ckpt",
                "kth_value": score,
                "last_model_path": "",
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters or {"lr": 1e-3, "arch": "resnet18"},
    }


def ddp_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``DistributedDataParallel(net).state_dict()``, in a one-rank gloo group of this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        state = ddp.state_dict()
        del ddp  # the reducer holds the group
        gc.collect()
    finally:
        dist.destroy_process_group()
    return state


def fabric_save(net: torch.nn.Module, path: str | Path) -> None:
    """``fabric.save(path, {"model": ..., "optimizer": ..., "step": 3})`` of a set-up CPU Fabric."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})


# how -> a writer of ``net``'s weights to a path, the way that framework or habit saves them
SAVE_AS: dict[str, Callable[[torch.nn.Module, Path], Any]] = {
    "plain": lambda n, p: torch.save(n.state_dict(), p),
    "data_parallel": lambda n, p: torch.save(torch.nn.DataParallel(n).state_dict(), p),
    "ddp": lambda n, p: torch.save(ddp_state_dict(n), p),
    "compile": lambda n, p: torch.save(torch.compile(n).state_dict(), p),
    "data_parallel_of_compiled": lambda n, p: torch.save(
        torch.nn.DataParallel(torch.compile(n)).state_dict(), p
    ),
    "compiled_data_parallel": lambda n, p: torch.save(
        torch.compile(torch.nn.DataParallel(n)).state_dict(), p
    ),
    "lightning_model": lambda n, p: torch.save(lightning_checkpoint(LightningLike(n, "model")), p),
    "lightning_net": lambda n, p: torch.save(lightning_checkpoint(LightningLike(n, "net")), p),
    # self.encoder = torch.compile(net) in a LightningModule
    "lightning_compiled_attribute": lambda n, p: torch.save(
        lightning_checkpoint(LightningLike(torch.compile(n), "encoder")), p
    ),
    "fabric": fabric_save,
    "model_of_data_parallel": lambda n, p: torch.save(
        {"model": torch.nn.DataParallel(n).state_dict(), "epoch": 9}, p
    ),
    "state_dict": lambda n, p: torch.save({"state_dict": n.state_dict()}, p),
    "model_state_dict": lambda n, p: torch.save(
        {"model_state_dict": n.state_dict(), "epoch": 4}, p
    ),
    "net": lambda n, p: torch.save({"net": n.state_dict(), "acc": 0.9}, p),
}


def save_weights_as(how: str, net: torch.nn.Module, path: str | Path) -> Path:
    """Write ``net``'s weights to ``path`` as ``how`` (a key of :data:`SAVE_AS`) saves them."""
    SAVE_AS[how](net, Path(path))
    return Path(path)


def hub_snapshot_of(home: str | Path, repo: str, folder: str | Path, rev: str = "0" * 40) -> Path:
    """:func:`hub_snapshot` of the files of ``folder`` (e.g. an exported model), as a download
    of the hub repository ``repo`` leaves them in the cache under ``home``."""
    files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
    return hub_snapshot(home, repo, files, rev)


# -- layering (issue 26): a package's config and model import neither the trainer nor Lightning --

HEAVY_MODULES = ("lightning_fabric", "lightning", "medcore.engine.trainer", "medcore.cli")

_IMPORT_PROBE = """
import importlib, json, sys, traceback
heavy, modules = json.loads(sys.argv[1]), sys.argv[2:]
found = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in heavy and name not in found:
            frames = [
                f for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<") and "importlib" not in f.filename
            ]
            found[name] = [f"{f.filename}:{f.lineno}" for f in frames[-4:]]
        return None

sys.meta_path.insert(0, Watch())
report = {}
for module in modules:
    importlib.import_module(module)
    report[module] = dict(found)
    found.clear()
print(json.dumps(report))
"""


def assert_imports_stay_light(*modules: str, heavy: Sequence[str] = HEAVY_MODULES) -> None:
    """Import ``modules`` in order in a fresh interpreter; fail naming each ``heavy`` module one
    of them imported (the trainer, the CLI, Lightning), with the import chain that reached it.

    A package's ``config`` and ``model`` are what a user imports to build or load a model:
    they must not pull in the training machinery.
    """
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, json.dumps(list(heavy)), *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    pulled = {
        module: {name: " <- ".join(reversed(chain)) or "itself" for name, chain in found.items()}
        for module, found in report.items()
        if found
    }
    assert not pulled, f"imports that pull in {', '.join(heavy)}: {pulled}"
