"""The command-line conventions every ``<pkg>-<verb>`` command shares.

- ``run_cli(main_fn, argv)``: user errors become one line ``error: <what>: <why>`` on stderr and
  exit code 2; Ctrl-C becomes exit 130 with a hint to resume. No traceback reaches the user.
- ``add_common_args``: the common flags, spelled the same everywhere.
- ``setup_run``: config (packaged YAML, ``--config``, ``--set``, common flags), device, seeding,
  torchrun process group, and the run directory with the resolved config in it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime as _dt
import errno
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from medcore import launch
from medcore.config import load_config, packaged_config_path, save_config
from medcore.device import DEVICE_CHOICES, resolve_device
from medcore.distributed import DistInfo, fabric_precision, launched_world, make_fabric
from medcore.errors import ConfigError, UserError
from medcore.io import RunLock
from medcore.trainer import TrainerConfig, seed_everything

C = TypeVar("C", bound="RunConfig")


@dataclass
class RunConfig:
    """Fields every package's top-level config has; packages subclass it and add sections.

    A subclass must define ``data`` (with ``data_dir``), ``model`` (with ``pretrained_weights``)
    and may rely on ``trainer`` as defined here.
    """

    seed: int = 42
    device: str = "auto"
    output_dir: str | None = None
    # CPU threads for torch; None keeps torch's default. Tiny demo tensors often run faster on
    # one thread than on several oversubscribed ones.
    num_threads: int | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def add_common_args(parser: argparse.ArgumentParser, train: bool = True) -> argparse.ArgumentParser:
    """Add the flags of DESIGN.md; ``train=False`` leaves out the training-only ones."""
    parser.add_argument(
        "--config",
        type=Path,
        help="research config (packaged NAME.yaml or a file); stands alone on the defaults",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="real data directory (default: the built-in demo data)"
    )
    parser.add_argument(
        "--output-dir", type=Path, help="run directory (default: runs/<pkg>/<timestamp>)"
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, help="device (default: auto)")
    parser.add_argument("--seed", type=int, help="random seed")
    _remember_argv(parser)
    if train:
        parser.add_argument(
            "--devices",
            type=int,
            metavar="N",
            help="processes (GPUs, or CPU ranks with --device cpu) on this machine; "
            "the command starts them itself (default: 1, or what torchrun/SLURM started)",
        )
        parser.add_argument(
            "--num-nodes", type=int, metavar="N", help="machines of a torchrun or SLURM job"
        )
        parser.add_argument("--epochs", type=int, help="number of epochs")
        parser.add_argument(
            "--smoke", action="store_true", help="run a few steps only (checks the setup)"
        )
        parser.add_argument(
            "--resume",
            metavar="PATH|latest",
            help="continue from a checkpoint, or from the newest run's latest.pt",
        )
        parser.add_argument(
            "--pretrained-weights",
            metavar="FILE|DIR|hf-hub:ORG/NAME[@REV]",
            help="pretrained backbone weights: a file, a snapshot directory, or a hub name "
            "(fetched only when online and HF_HUB_OFFLINE is unset)",
        )
        parser.add_argument(
            "--from-scratch",
            action="store_true",
            help="train from random initialisation a config that expects pretrained weights",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="resolve the config and build the model on the meta device; no data, no weights",
        )
    return parser


def _remember_argv(parser: argparse.ArgumentParser) -> None:
    """Keep the arguments a command was given on its namespace (``args._argv``): ``--devices N``
    starts the other ranks with exactly these."""
    parse = parser.parse_known_args

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = parse(args, namespace)
        ns._argv = list(sys.argv[1:] if args is None else args)
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` items that the common flags stand for."""
    items: list[str] = []
    if getattr(args, "data_dir", None) is not None:
        items.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "device", None) is not None:
        items.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        items.append(f"seed={args.seed}")
    if getattr(args, "epochs", None) is not None:
        items.append(f"trainer.epochs={args.epochs}")
    if getattr(args, "devices", None) is not None:
        items.append(f"trainer.devices={args.devices}")
    if getattr(args, "num_nodes", None) is not None:
        items.append(f"trainer.num_nodes={args.num_nodes}")
    if getattr(args, "pretrained_weights", None) is not None:
        items.append(f"model.pretrained_weights={args.pretrained_weights}")
    if getattr(args, "from_scratch", False):
        items.append("model.pretrained=false")
    if getattr(args, "output_dir", None) is not None:
        items.append(f"output_dir={args.output_dir}")
    return items


SMOKE_OVERRIDES = [
    "trainer.epochs=1",
    "trainer.max_steps_per_epoch=2",
    "trainer.eval_every_steps=0",
]


@dataclass
class RunContext:
    """What ``setup_run`` resolved: config, device, process group and run directory."""

    cfg: Any
    device: torch.device
    dist: DistInfo
    run_dir: Path
    resume: Path | None
    lock: RunLock | None = None

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
    layout: str | Sequence[str] = "checkpoints/latest.pt",
) -> tuple[Path, Path]:
    """``--resume latest``: (run directory, its newest checkpoint) of ``output_dir``, or of the
    newest run of ``package`` under ``runs/``.

    ``layout`` is where a run keeps the checkpoint to continue from, as glob patterns relative
    to the run directory: ``checkpoints/latest.pt`` for one training, e.g.
    ``phase*/checkpoints/latest.pt`` for a run made of stages, each resumed by itself.
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


def find_latest_checkpoint(package: str, output_dir: Path | None) -> Path:
    """``--resume latest``: the latest.pt of ``output_dir``, or of the newest run of ``package``."""
    return find_run(package, output_dir)[1]


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


def setup_run(
    args: argparse.Namespace,
    cfg_cls: type[C],
    package: str,
    default_config: str = "default",
    smoke_overrides: Sequence[str] = (),
) -> RunContext:
    """Resolve config, device, seeding, DDP and the run directory for a training command."""
    resolve_config_arg(args, package)

    def load() -> Any:
        # A --config stands alone on the dataclass defaults; the packaged demo preset is the
        # config only when none is given (it is never layered under a research config).
        config = getattr(args, "config", None)
        sources: list[Any] = [
            config if config is not None else packaged_config_path(package, default_config)
        ]
        overrides = list(getattr(args, "overrides", []) or [])
        if getattr(args, "smoke", False):
            overrides = [*SMOKE_OVERRIDES, *smoke_overrides, *overrides]
        return load_config(cfg_cls, *sources, overrides=[*overrides, *common_overrides(args)])

    cfg = load()

    resume: Path | None = None
    resume_arg = getattr(args, "resume", None)
    if resume_arg == "latest":
        resume = find_latest_checkpoint(package, Path(cfg.output_dir) if cfg.output_dir else None)
    elif resume_arg:
        resume = Path(resume_arg)
        if not resume.is_file():
            raise UserError(resume, "checkpoint not found")
    if resume is not None:
        # Continue in the given run, or else in the run that wrote the checkpoint, with that
        # run's settings (a checkpoint from elsewhere starts a new run from its weights).
        if cfg.output_dir:
            continue_run(args, Path(cfg.output_dir))
        elif resume.parent.name == "checkpoints":
            continue_run(args, resume.parent.parent)
        cfg = load()

    fabric = _start_processes(cfg, args)
    dist = DistInfo(
        rank=fabric.global_rank, local_rank=fabric.local_rank, world_size=fabric.world_size
    )
    device = fabric.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + dist.rank)

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(package)
    run_dir = Path(fabric.broadcast(str(run_dir)))
    cfg = dataclasses.replace(cfg, output_dir=str(run_dir))
    lock: RunLock | None = None
    if dist.is_main:
        # Taken before anything is written, held until the process ends: a second job aimed at
        # the same run directory is refused instead of overwriting this one's files.
        lock = RunLock(run_dir, directory=True).__enter__()
        atexit.register(lock.__exit__, None, None, None)
        save_config(cfg, run_dir / "config.yaml")
    fabric.barrier()
    return RunContext(cfg=cfg, device=device, dist=dist, run_dir=run_dir, resume=resume, lock=lock)


def _start_processes(cfg: Any, args: argparse.Namespace) -> Any:
    """This process's Fabric: joins the ranks torchrun/SLURM started, or starts ``--devices N``
    ranks on this machine first (see medcore.launch)."""
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


_PROG: list[str] = []  # the running command's name (run_cli), to start its other ranks


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_cli(main_fn: Callable[[], int | None], prog: str | None = None) -> int:
    """Call ``main_fn``; turn user errors and Ctrl-C into one line and an exit code.

    When the command started ranks of its own (``--devices N``), rank 0 waits for them, and a
    rank that died makes the whole command fail with that rank's exit code.
    """
    from medcore.distributed import cleanup_distributed

    _PROG.append(prog or "")
    try:
        code = _run_main(main_fn, prog)
    except BaseException:
        if launch.launched_here():
            launch.finish(ok=False)
        cleanup_distributed()
        raise
    finally:
        _PROG.pop()
    if launch.launched_here():
        children = launch.finish(ok=code == 0)
        if code == 0 and children:
            print(f"error: a rank exited with code {children}; job failed", file=sys.stderr)
            code = children if 0 < children < 128 else 1
    cleanup_distributed()
    return code


def _run_main(main_fn: Callable[[], int | None], prog: str | None) -> int:
    try:
        code = main_fn()
        return 0 if code is None else int(code)
    except UserError as exc:
        print(f"error: {exc.what}: {exc.why}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _consequence_of_dead_rank(exc)
        # Disk full, read-only or forbidden output: the user's environment, not a bug.
        print(f"error: {exc.filename or 'output'}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{prog or 'interrupted'}: interrupted; finished work is saved (resume with --resume latest)",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        return _consequence_of_dead_rank(exc)


def _consequence_of_dead_rank(exc: BaseException) -> int:
    """A collective that failed because another rank died: one line naming that rank (which
    printed its own error); any other exception is a bug and keeps its traceback."""
    failed = launch.failed_rank()
    if failed is None:
        raise exc
    print(f"error: rank {failed[0]}: exited with code {failed[1]}; job stopped", file=sys.stderr)
    return failed[1] if 0 < failed[1] < 128 else 1


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f"
) -> str:
    """A plain-text table for printing metric tables in the terminal."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    head = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = [
        "  ".join(
            v.rjust(w) if i else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join([head, sep, *body])


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f"
) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (for reports beside the CSVs)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
