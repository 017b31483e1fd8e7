"""Run setup for every ``<pkg>-train``: config, processes, device, seeding, run directory, resume.

A command reads top to bottom::

    request = resolve_run(args, Config, "pkg")      # config and resume target; nothing written
    check(request.cfg)                              # the package's own checks, inline
    with start_run(request) as run:                 # processes, Fabric, seeds, run directory
        Trainer(model, run.cfg.trainer, fabric=run.fabric, ...).fit(resume=run.resume)

- :func:`load_run_config`: the one way a command reads its config: the packaged demo preset
  only without ``--config``, a ``--config`` (packaged NAME or a file) standing alone on the
  dataclass defaults, then ``--smoke``, ``--set`` and the flags (each flag sets the config key
  it declares, :mod:`medcore.cli.flags`; a flag wins over ``--set``).
- :func:`resolve_run`: the above and the ``--resume`` rule, as a :class:`RunRequest`.
- :func:`start_run`: ``--devices N`` / torchrun / SLURM processes and the process's one Fabric,
  the run directory (locked while the run lasts) with the resolved ``config.yaml`` in it.

``--epochs N`` sets the config class's ``epochs_keys`` (``trainer.epochs``, or every phase's
epochs in a package that trains in phases), ``--smoke`` one epoch of each and
:data:`SMOKE_OVERRIDES`; everything else keeps the value the config declares.

A refused run leaves nothing behind: a check that fails comes before :func:`start_run`, and a
user error (:class:`~medcore.errors.UserError`) that ends its block before the first
checkpoint removes what the run wrote into a new run directory.

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
import contextlib
import dataclasses
import datetime as _dt
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from medcore.cli import launch
from medcore.cli.flags import Invocation, flag_overrides
from medcore.config import (
    Override,
    RunConfig,
    load_config,
    packaged_config_path,
    read_yaml,
    save_config,
)
from medcore.engine.rng import seed_everything
from medcore.errors import ConfigError, TrainingDiverged, UserError
from medcore.io import RunLock
from medcore.runtime.device import resolve_device
from medcore.runtime.distributed import DistInfo, launched_world, make_fabric

if TYPE_CHECKING:
    from lightning_fabric import Fabric

C = TypeVar("C")

# --smoke: besides one epoch of every ``epochs_keys`` entry of the config.
SMOKE_OVERRIDES = [
    "trainer.max_steps_per_epoch=2",
    "trainer.eval_every_steps=0",
]

# Where a run keeps what ``--resume latest`` continues from: one training, or stages.
SINGLE_LAYOUT = ("checkpoints/latest.pt",)
STAGED_LAYOUT = ("config.yaml",)


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


def _config_file(config: Path | None, package: str) -> Path | None:
    """``--config``: a file, or else the name of a config shipped in ``package``."""
    if config is not None and not Path(config).is_file():
        with contextlib.suppress(ConfigError):  # not packaged either: loading reports the path
            return packaged_config_path(package, str(config))
    return config


def _overrides(
    args: argparse.Namespace, cfg_cls: type, smoke_overrides: Sequence[str]
) -> tuple[list[str], list[Override]]:
    """(``--smoke``'s and ``--set``'s items, the flags' overrides): flags win over ``--set``."""
    epochs_keys = getattr(cfg_cls, "epochs_keys", RunConfig.epochs_keys)
    items = list(getattr(args, "overrides", []) or [])
    if getattr(args, "smoke", False):
        items = [*(f"{key}=1" for key in epochs_keys), *SMOKE_OVERRIDES, *smoke_overrides, *items]
    return items, [*flag_overrides(args, epochs_keys)]


def _training_config(
    cfg_cls: type[C],
    package: str,
    default_config: str,
    config: Path | None,
    overrides: Sequence[Override],
    base: Any = None,
) -> C:
    source: Any = config if config is not None else packaged_config_path(package, default_config)
    layers = [base, source] if base is not None and config is not None else [base or source]
    cfg = load_config(cfg_cls, *layers, overrides=overrides)
    _refuse_unused_epochs(cfg, cfg_cls)
    return cfg


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
    given), ``--config`` standing alone, ``--smoke``, ``--set`` and the flags.

    ``sections``: the top-level keys this command takes from ``--config`` / ``--set`` (an
    evaluation command whose model is the checkpoint's): other keys of a ``--config`` are
    named in one note line and ignored, a ``--set`` of another key is a ConfigError.
    """
    config = _config_file(getattr(args, "config", None), package)
    items, flags = _overrides(args, cfg_cls, smoke_overrides)
    if sections is None:
        return _training_config(cfg_cls, package, default_config, config, [*items, *flags], base)
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
    for item in items:
        if item.split("=", 1)[0].strip().split(".")[0] not in sections:
            raise ConfigError(f"--set {item}", f"this command takes only {', '.join(sections)}")
    start = base if base is not None else packaged_config_path(package, default_config)
    return load_config(cfg_cls, start, layer, overrides=[*items, *flags])


def _refuse_unused_epochs(cfg: Any, cfg_cls: type) -> None:
    """A package whose epochs are its phases' leaves ``trainer.epochs`` unused: a value other
    than the declared one (a ``--set`` or a config file) would be silently ignored."""
    epochs_keys = getattr(cfg_cls, "epochs_keys", RunConfig.epochs_keys)
    if "trainer.epochs" in epochs_keys:
        return
    if cfg.trainer.epochs != cfg_cls().trainer.epochs:
        raise ConfigError(
            "trainer.epochs",
            f"not used here: the epochs are {', '.join(epochs_keys)}; --epochs N sets them "
            f"all, --set {epochs_keys[0]}=N one",
        )


def _resume_target(
    resume_arg: str | None, cfg: Any, package: str, staged: bool
) -> tuple[Path | None, Path | None]:
    """(run directory to continue, checkpoint to resume a single training from)."""
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


@dataclass(frozen=True)
class RunRequest:
    """A run as the command line asks for it, before anything is started or written.

    ``resume``: the checkpoint a single training continues from. ``continues``: the run
    directory of an interrupted run this one continues (None: a new run directory).
    ``invocation``: the command line, which ``--devices N`` starts its other ranks with.
    """

    cfg: Any
    package: str
    resume: Path | None = None
    continues: Path | None = None
    invocation: Invocation | None = None

    @property
    def resuming(self) -> bool:
        """The run continues an interrupted one (a staged run skips its finished stages)."""
        return self.continues is not None or self.resume is not None


def resolve_run(
    args: argparse.Namespace,
    cfg_cls: type,
    package: str,
    default_config: str = "default",
    smoke_overrides: Sequence[str] = (),
    *,
    staged: bool = False,
) -> RunRequest:
    """The config and resume target of a run (the ``--resume`` rule of the module docstring):
    a function of the parsed arguments and the files they name, which reads ``args`` only.

    ``staged``: the run is made of :mod:`medcore.cli.stages`. A package checks the config it
    returns (and may replace it, ``dataclasses.replace(request, cfg=...)``) before
    :func:`start_run`.
    """
    cfg = load_run_config(args, cfg_cls, package, default_config, smoke_overrides)
    continues, resume = _resume_target(getattr(args, "resume", None), cfg, package, staged)
    if continues is not None:
        # The interrupted run's own config.yaml is the base unless --config is given (--set
        # and the flags still apply on top): its flags need not be repeated, and defaults
        # changed since do not leak in.
        config = getattr(args, "config", None)
        saved = continues / "config.yaml"
        if config is None and saved.is_file():
            config = saved
        items, flags = _overrides(args, cfg_cls, smoke_overrides)
        cfg = _training_config(
            cfg_cls,
            package,
            default_config,
            _config_file(config, package),
            [*items, *flags, ("output_dir", str(continues))],
        )
    return RunRequest(cfg, package, resume, continues, invocation=getattr(args, "invocation", None))


@dataclass
class RunContext:
    """A started run (:func:`start_run`): its config (``output_dir`` is ``run_dir``), the
    process's one Fabric (device, precision, strategy and process group of every Trainer of the
    run), and where the run lives.

    ``resume``: the checkpoint a single training continues from. ``resuming``: the run
    continues an interrupted one (for staged runs: finished stages are skipped).
    """

    cfg: Any
    fabric: Fabric
    dist: DistInfo
    run_dir: Path
    resume: Path | None = None
    resuming: bool = False

    @property
    def device(self) -> torch.device:
        return self.fabric.device


@contextlib.contextmanager
def start_run(request: RunRequest) -> Iterator[RunContext]:
    """Start the run of ``request`` for the block: processes (``--devices N``, torchrun, SLURM)
    and this process's Fabric, threads and seeds, the run directory (locked for the block, so a
    second job aimed at it is refused) with the resolved ``config.yaml`` in it.

    A user error that ends the block before the run's first checkpoint removes what the run
    wrote into a new run directory (the directory itself, or only the new entries of one the
    user made; never a run being continued, nor one whose training diverged: its logs are the
    diagnosis).
    """
    cfg = request.cfg
    fabric = _start_processes(cfg, request.invocation)
    dist = DistInfo(
        rank=fabric.global_rank, local_rank=fabric.local_rank, world_size=fabric.world_size
    )
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + dist.rank)

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(request.package)
    run_dir = Path(fabric.broadcast(str(run_dir)))
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    new_run: _NewRun | None = None
    with contextlib.ExitStack() as held:
        if dist.is_main:
            before = _NewRun.before(run_dir)
            # Taken before anything is written: a job aimed at a run directory in use is
            # refused instead of overwriting that job's files.
            held.enter_context(RunLock(run_dir, directory=True))
            new_run = before if request.continues is None else None
            save_config(cfg, run_dir / "config.yaml")
        fabric.barrier()
        try:
            yield RunContext(cfg, fabric, dist, run_dir, request.resume, request.resuming)
        except UserError as exc:
            diverged = isinstance(exc, TrainingDiverged)
            if new_run is not None and not diverged and not new_run.wrote_checkpoint():
                new_run.undo()
            raise


@dataclass(frozen=True)
class _NewRun:
    """A run directory as it was before :func:`start_run` wrote into it."""

    run_dir: Path
    created: tuple[Path, ...]  # the directories start_run creates, run_dir first (may be none)
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


def _start_processes(cfg: Any, invocation: Invocation | None) -> Fabric:
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
        if invocation is None:
            raise UserError(
                "--devices",
                "this command cannot start its own ranks; run it under torchrun instead",
            )
        launch.spawn_local(tcfg.devices, invocation.prog, invocation.argv)
    elif tcfg.num_nodes > 1:
        raise UserError(
            "--num-nodes", "a multi-node job is started by torchrun or SLURM on every node"
        )
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    return make_fabric(resolve_device(cfg.device, local_rank=local_rank), tcfg)
