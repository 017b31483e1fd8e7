"""The flags every ``<pkg>-<verb>`` command shares, spelled the same everywhere, and the
``--set`` items they stand for (``common_overrides``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from medcore.config import RunConfig
from medcore.runtime.device import DEVICE_CHOICES


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
        parser.add_argument(
            "--epochs",
            type=int,
            metavar="N",
            help="epochs of training (trainer.epochs); in a package that trains in phases, "
            "every phase's epochs (its README names the keys)",
        )
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


def common_overrides(
    args: argparse.Namespace, epochs_keys: Sequence[str] = RunConfig.epochs_keys
) -> list[str]:
    """The ``--set`` items that the common flags stand for (``--epochs``: ``epochs_keys``)."""
    items: list[str] = []
    if getattr(args, "data_dir", None) is not None:
        items.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "device", None) is not None:
        items.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        items.append(f"seed={args.seed}")
    if getattr(args, "epochs", None) is not None:
        items += [f"{key}={args.epochs}" for key in epochs_keys]
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
