"""Console scripts: ``cxrlandmarks-train``, ``cxrlandmarks-eval``, ``cxrlandmarks-predict``."""

from __future__ import annotations

import argparse
from pathlib import Path

from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES


def train(argv: list[str] | None = None) -> int:
    from cxrlandmarks.train import train_command

    parser = argparse.ArgumentParser(
        prog="cxrlandmarks-train",
        description="4-phase landmark training (no arguments: the built-in synthetic demo)",
    )
    add_common_args(parser)
    parser.add_argument(
        "--phase",
        choices=["1", "2", "3", "4", "all"],
        default="all",
        help="phase to train; 'all' chains 1-4, each starting from the previous best",
    )
    parser.add_argument(
        "--preset",
        choices=["default", "paper"],
        help="packaged config: 'default' (CPU demo) or 'paper' (the spec's values); "
        "default: paper with --data-dir, else default",
    )
    parser.add_argument(
        "--init-from", type=Path, help="checkpoint the first selected phase starts from"
    )
    args = parser.parse_args(argv)
    return run_cli(lambda: train_command(args), "cxrlandmarks-train")


def evaluate(argv: list[str] | None = None) -> int:
    from cxrlandmarks.evaluate import evaluate_command

    parser = argparse.ArgumentParser(
        prog="cxrlandmarks-eval", description="Evaluate checkpoints on a split"
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        default=[],
        help="checkpoint to evaluate (repeat to compare phases)",
    )
    parser.add_argument(
        "--run-dir", type=Path, help="evaluate every phase checkpoint of a training run"
    )
    parser.add_argument("--split", choices=["train", "val", "test", "all"], default="test")
    parser.add_argument(
        "--splits", type=Path, help="splits.json (default: the one in the checkpoint's run)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default: the one used in training)"
    )
    parser.add_argument(
        "--output-dir", type=Path, help="where reports go (default: <run>/eval_<split>)"
    )
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--tta-flip", action="store_true", help="average with the flipped image")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate_command(args), "cxrlandmarks-eval")


def predict(argv: list[str] | None = None) -> int:
    from cxrlandmarks.predict import predict_command

    parser = argparse.ArgumentParser(
        prog="cxrlandmarks-predict", description="Landmarks for new images"
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument(
        "--checkpoint",
        action="append",
        type=Path,
        required=True,
        help="model checkpoint (repeat for an ensemble)",
    )
    parser.add_argument("--tta-flip", action="store_true", help="average with the flipped image")
    parser.add_argument("--output-dir", type=Path, default=Path("predictions"))
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    args = parser.parse_args(argv)
    return run_cli(lambda: predict_command(args), "cxrlandmarks-predict")
