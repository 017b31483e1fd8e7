"""Run setup for every ``<pkg>-train``: config, processes, device, seeding, run directory, resume.

- :func:`load_run_config`: the one way a command reads its config: the packaged demo preset
  only without ``--config``, a ``--config`` (packaged NAME or a file) standing alone on the
  dataclass defaults, then ``--set`` and the common flags.
- :func:`setup_run`: the above, a ``check`` of the config before anything is started or
  written, ``--devices N`` / torchrun / SLURM processes through Fabric, the run directory (held
  under one lock until the process ends) with the resolved ``config.yaml`` in it.

``--epochs N`` sets the config class's ``epochs_keys`` (``trainer.epochs``, or every phase's
epochs in a package that trains in phases), ``--smoke`` one epoch of each and
:data:`SMOKE_OVERRIDES`; everything else keeps the value the config declares.

A refused run leaves nothing behind. A user error (:class:`~medcore.errors.UserError`) that ends
the command before its first checkpoint removes what :func:`setup_run` and the run wrote into a
new run directory (the directory itself, or only the new entries of one the user made; never a
run being continued): see :func:`undoing_refused_runs`.

The one ``--resume`` rule. ``--resume latest`` continues the newest run of the package (or the
run in ``--output-dir``); ``--resume PATH`` continues the run that holds the checkpoint
``PATH`` (a checkpoint from elsewhere starts a new run from its weights). A resumed run takes
its own ``config.yaml`` as base config, so the interrupted run's flags need not be repeated.
A run made of stages (:mod:`medcore.cli.stages`) skips its finished stages and resumes the
unfinished one from that stage's ``checkpoints/latest.pt``; ``--resume PATH`` may also name
the run directory itself.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as _dt
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from medcore.cli import launch
from medcore.cli.command import _PROG
from medcore.cli.flags import common_overrides
from medcore.config import RunConfig, load_config, packaged_config_path, read_yaml, save_config
from medcore.engine.rng import seed_everything
from medcore.errors import ConfigError, TrainingDiverged, UserError
from medcore.io import RunLock
from medcore.runtime.device import resolve_device
from medcore.runtime.distributed import DistInfo, fabric_precision, launched_world, make_fabric

C = TypeVar("C")

# --smoke: besides one epoch of every ``epochs_keys`` entry of the config.
SMOKE_OVERRIDES = [
    "trainer.max_steps_per_epoch=2",
    "trainer.eval_every_steps=0",
]

# Where a run keeps what ``--resume latest`` continues from: one training, or stages.
SINGLE_LAYOUT = ("checkpoints/latest.pt",)
STAGED_LAYOUT = ("config.yaml",)


@dataclass
class RunContext:
    """What ``setup_run`` resolved: config, device, process group and run directory.

    ``resume``: the checkpoint a single training continues from. ``resuming``: the run
    continues an interrupted one (for staged runs: finished stages are skipped).
    """

    cfg: Any
    device: torch.device
    dist: DistInfo
    run_dir: Path
    resume: Path | None
    lock: RunLock | None = None
    resuming: bool = False

    def release(self) -> None:
        """Give up the run directory's lock (the process's exit does it otherwise)."""
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None


def default_run_dir(package: str) -> Path:
    """``runs/<package>/<date-time>``, with a ``-N`` suffix if a run started in the same second."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / package / stamp
    n = 1
    while run_dir.exists():
        run_dir = run_dir.with_name(f"{stamp}-{n}")
        n += 1
    return run_dir


def find_run(
    package: str,
    output_dir: Path | None,
    layout: str | Sequence[str] = SINGLE_LAYOUT,
) -> tuple[Path, Path]:
    """``--resume latest``: (run directory, the newest file matching ``layout``) of
    ``output_dir``, or of the newest run of ``package`` under ``runs/``.

    ``layout``: glob patterns relative to the run directory (``checkpoints/latest.pt`` for one
    training; ``config.yaml`` for a run of stages, which resume themselves).
    """
    layouts = [layout] if isinstance(layout, str) else list(layout)
    if output_dir is not None:
        found = [
            (Path(output_dir), c) for pattern in layouts for c in Path(output_dir).glob(pattern)
        ]
        if not found:
            raise UserError("--resume latest", f"no {' or '.join(layouts)} in {output_dir}")
    else:
        runs = Path("runs") / package
        found = [
            (c.parents[len(Path(p).parts) - 1], c) for p in layouts for c in runs.glob(f"*/{p}")
        ]
        if not found:
            raise UserError(
                "--resume latest",
                f"no earlier run with a {Path(layouts[0]).name} under runs/{package}/",
            )
    return max(found, key=lambda rc: rc[1].stat().st_mtime)


def _run_holding(path: Path, package: str) -> Path:
    """The run directory (the nearest one with a config.yaml) that holds ``path``."""
    for parent in [path, *path.parents]:
        if (parent / "config.yaml").is_file():
            return parent
    raise UserError(
        f"--resume {path}",
        f"not inside a {package} run directory (no config.yaml above it); "
        "use --resume latest or the run directory",
    )


def continue_run(args: argparse.Namespace, run_dir: Path) -> None:
    """Point ``args`` at ``run_dir`` for a resumed run, with the run's own ``config.yaml`` as its
    base config unless ``--config`` is given (``--set`` still applies on top): the flags of the
    interrupted run need not be repeated, and defaults changed since do not leak in.
    """
    args.output_dir = Path(run_dir)
    saved = Path(run_dir) / "config.yaml"
    if getattr(args, "config", None) is None and saved.is_file():
        args.config = saved


def resolve_config_arg(args: argparse.Namespace, package: str) -> None:
    """Let ``--config NAME.yaml`` name a config shipped in ``package`` when no such file exists."""
    config = getattr(args, "config", None)
    if config is not None and not Path(config).is_file():
        with contextlib.suppress(ConfigError):  # not packaged either: loading reports the path
            args.config = packaged_config_path(package, str(config))


def load_run_config(
    args: argparse.Namespace,
    cfg_cls: type[C],
    package: str,
    default_config: str = "default",
    smoke_overrides: Sequence[str] = (),
    sections: Sequence[str] | None = None,
    base: Any = None,
) -> C:
    """The command's config: ``base`` (or the packaged demo preset when no ``--config`` is
    given), ``--config`` standing alone, ``--smoke``, ``--set`` and the common flags.

    ``sections``: the top-level keys this command takes from ``--config`` / ``--set`` (an
    evaluation command whose model is the checkpoint's): other keys of a ``--config`` are
    named in one note line and ignored, a ``--set`` of another key is a ConfigError.
    """
    resolve_config_arg(args, package)
    config = getattr(args, "config", None)
    epochs_keys = getattr(cfg_cls, "epochs_keys", RunConfig.epochs_keys)
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "smoke", False):
        smoke = [*(f"{key}=1" for key in epochs_keys), *SMOKE_OVERRIDES, *smoke_overrides]
        overrides = [*smoke, *overrides]
    flags = common_overrides(args, epochs_keys)
    if sections is None:
        source: Any = (
            config if config is not None else packaged_config_path(package, default_config)
        )
        layers = [base, source] if base is not None and config is not None else [base or source]
        cfg = load_config(cfg_cls, *layers, overrides=[*overrides, *flags])
        _refuse_unused_epochs(cfg, cfg_cls, epochs_keys)
        return cfg
    layer: dict[str, Any] = {}
    if config is not None:
        layer = read_yaml(config)
        unused = sorted(set(layer) - set(sections))
        if unused:
            print(
                f"note: {config}: not used by this command (it takes {', '.join(sections)}): "
                f"{', '.join(unused)}",
                file=sys.stderr,
            )
        layer = {k: v for k, v in layer.items() if k in sections}
    for item in overrides:
        if item.split("=", 1)[0].strip().split(".")[0] not in sections:
            raise ConfigError(f"--set {item}", f"this command takes only {', '.join(sections)}")
    start = base if base is not None else packaged_config_path(package, default_config)
    return load_config(cfg_cls, start, layer, overrides=[*overrides, *flags])


def _refuse_unused_epochs(cfg: Any, cfg_cls: type, epochs_keys: Sequence[str]) -> None:
    """A package whose epochs are its phases' leaves ``trainer.epochs`` unused: a value other
    than the declared one (a ``--set`` or a config file) would be silently ignored."""
    if "trainer.epochs" in epochs_keys:
        return
    if cfg.trainer.epochs != cfg_cls().trainer.epochs:
        raise ConfigError(
            "trainer.epochs",
            f"not used here: the epochs are {', '.join(epochs_keys)}; --epochs N sets them "
            f"all, --set {epochs_keys[0]}=N one",
        )


def _resume_target(
    args: argparse.Namespace, cfg: Any, package: str, staged: bool
) -> tuple[Path | None, Path | None]:
    """(run directory to continue, checkpoint to resume a single training from)."""
    resume_arg = getattr(args, "resume", None)
    if not resume_arg:
        return None, None
    output_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if resume_arg == "latest":
        run_dir, found = find_run(package, output_dir, STAGED_LAYOUT if staged else SINGLE_LAYOUT)
        return run_dir, None if staged else found
    path = Path(resume_arg)
    if staged:
        if not path.exists():
            raise UserError(path, "no such run directory or checkpoint")
        return _run_holding(path.resolve() if path.is_dir() else path, package), None
    if not path.is_file():
        raise UserError(path, "checkpoint not found")
    # Continue in the given run, or else in the run that wrote the checkpoint, with that run's
    # settings (a checkpoint from elsewhere starts a new run from its weights).
    if output_dir is not None:
        return output_dir, path
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    return None, path


def setup_run(
    args: argparse.Namespace,
    cfg_cls: type[C],
    package: str,
    default_config: str = "default",
    smoke_overrides: Sequence[str] = (),
    *,
    staged: bool = False,
    check: Callable[[Any], None] | None = None,
) -> RunContext:
    """Resolve config, processes, device, seeding and the run directory of a training command.

    ``check(cfg)`` runs on the final config before any process is started or anything is
    written: a UserError it raises leaves no run directory behind. ``staged``: the run is made
    of :mod:`medcore.cli.stages` (the ``--resume`` rule of the module docstring).
    """

    def load() -> Any:
        return load_run_config(args, cfg_cls, package, default_config, smoke_overrides)

    cfg = load()
    run_to_continue, resume = _resume_target(args, cfg, package, staged)
    if run_to_continue is not None:
        continue_run(args, run_to_continue)
        cfg = load()
    if check is not None:
        check(cfg)

    fabric = _start_processes(cfg, args)
    dist = DistInfo(
        rank=fabric.global_rank, local_rank=fabric.local_rank, world_size=fabric.world_size
    )
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + dist.rank)

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(package)
    run_dir = Path(fabric.broadcast(str(run_dir)))
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    lock: RunLock | None = None
    if dist.is_main:
        new_run = _NewRun.before(run_dir) if run_to_continue is None else None
        # Taken before anything is written, held until the process ends: a second job aimed at
        # the same run directory is refused instead of overwriting this one's files.
        lock = RunLock(run_dir, directory=True).__enter__()
        atexit.register(lock.__exit__, None, None, None)
        if new_run is not None and _WATCHERS:
            _WATCHERS[-1].append(new_run)
        save_config(cfg, run_dir / "config.yaml")
    fabric.barrier()
    return RunContext(
        cfg=cfg,
        device=fabric.device,
        dist=dist,
        run_dir=run_dir,
        resume=resume,
        lock=lock,
        resuming=run_to_continue is not None or resume is not None,
    )


@dataclass(frozen=True)
class _NewRun:
    """A run directory as it was before :func:`setup_run` wrote into it."""

    run_dir: Path
    created: tuple[Path, ...]  # the directories setup_run creates, run_dir first (may be none)
    entries: frozenset[str]  # what an existing run_dir held

    @classmethod
    def before(cls, run_dir: Path) -> _NewRun:
        run_dir = Path(run_dir).absolute()
        created = tuple(p for p in (run_dir, *run_dir.parents) if not p.exists())
        entries = frozenset(os.listdir(run_dir)) if run_dir.is_dir() else frozenset()
        return cls(run_dir, created, entries)

    def added(self) -> list[Path]:
        """What the run added to its directory (all of it, when the run made the directory)."""
        if not self.run_dir.is_dir():
            return []
        if self.created:
            return [self.run_dir]
        return [e for e in self.run_dir.iterdir() if e.name not in self.entries]

    def wrote_checkpoint(self) -> bool:
        def checkpoint(path: Path) -> bool:
            return path.suffix in (".pt", ".safetensors")

        return any(checkpoint(p) or any(map(checkpoint, p.rglob("*"))) for p in self.added())

    def undo(self) -> None:
        """Remove what the run added: its new directories (those still empty once the run
        directory is gone, so that a sibling run made meanwhile stays), or its new entries."""
        if self.created and self.run_dir.is_dir():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for parent in self.created[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()
            return
        for entry in self.added():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# The new run directories of the commands that run under undoing_refused_runs (innermost last).
_WATCHERS: list[list[_NewRun]] = []


@contextlib.contextmanager
def undoing_refused_runs() -> Iterator[None]:
    """Run a command so that a user error that ends it before its first checkpoint leaves no
    trace: each run directory :func:`setup_run` made inside is removed again (or, if the user
    made it, emptied of what the run added). A run being continued is never touched, nor one
    that wrote a checkpoint or whose training diverged (its logs are the diagnosis).
    ``medcore.cli.command.Command`` runs every command under it."""
    _WATCHERS.append([])
    try:
        yield
    except UserError as exc:
        if not isinstance(exc, TrainingDiverged):
            for new_run in reversed(_WATCHERS[-1]):
                if not new_run.wrote_checkpoint():
                    new_run.undo()
        raise
    finally:
        _WATCHERS.pop()


def _start_processes(cfg: Any, args: argparse.Namespace) -> Any:
    """This process's Fabric: joins the ranks torchrun/SLURM started, or starts ``--devices N``
    ranks on this machine first (see medcore.cli.launch)."""
    tcfg = cfg.trainer
    world, local, nodes = launched_world()
    if world > 1:
        for flag, asked, found in (
            ("--devices", tcfg.devices, local),
            ("--num-nodes", tcfg.num_nodes if tcfg.num_nodes != 1 else None, nodes),
        ):
            if asked is not None and asked != found:
                raise UserError(flag, f"is {asked}, but the launcher started {found} per job")
    elif (tcfg.devices or 1) > 1:
        if tcfg.num_nodes > 1:
            raise UserError(
                "--num-nodes", "a multi-node job is started by torchrun or SLURM on every node"
            )
        device = resolve_device(cfg.device)  # no CUDA context yet in rank 0: only a count
        if device.type == "mps":
            raise UserError("--devices", "MPS is one device; use --devices 1")
        if device.type == "cuda" and torch.cuda.device_count() < tcfg.devices:
            raise UserError(
                "--devices", f"{tcfg.devices} asked, {torch.cuda.device_count()} GPUs visible"
            )
        launch.spawn_local(tcfg.devices, _PROG[-1] if _PROG else None, getattr(args, "_argv", None))
    elif tcfg.num_nodes > 1:
        raise UserError(
            "--num-nodes", "a multi-node job is started by torchrun or SLURM on every node"
        )
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device = resolve_device(cfg.device, local_rank=local_rank)
    return make_fabric(
        device,
        strategy=tcfg.strategy,
        precision=fabric_precision(device, tcfg.amp, tcfg.amp_dtype, tcfg.precision),
        find_unused_parameters=tcfg.find_unused_parameters,
    )
