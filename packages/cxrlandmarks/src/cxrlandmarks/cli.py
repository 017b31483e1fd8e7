"""``cxrlandmarks-train|eval|predict``: commands and flags only (the commands: train.py,
evaluate.py, predict.py)."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from pathlib import Path

from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES


def _parser(prog: str, about: str, *, tta: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog, description=about)
    if tta:
        parser.add_argument("--tta-flip", action="store_true", help="also predict the mirror")
    return parser


def parse_train(argv: list[str] | None) -> Namespace:
    p = add_common_args(_parser("cxrlandmarks-train", "4-phase landmark training", tta=False))
    p.add_argument("--phase", choices=["1", "2", "3", "4", "all"], default="all")
    p.add_argument("--init-from", type=Path, help="checkpoint the first phase starts from")
    p.add_argument("--allow-missing", action="store_true", help="accept >2%% rows w/o image")
    return p.parse_args(argv)


def parse_eval(argv: list[str] | None) -> Namespace:
    p = _parser("cxrlandmarks-eval", "Evaluate checkpoints on a split")
    p.add_argument("--checkpoint", action="append", type=Path, default=[], help="repeatable")
    p.add_argument("--run-dir", type=Path, help="evaluate every phase checkpoint of a run")
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="test")
    p.add_argument("--splits", type=Path, help="splits.json (default: the checkpoint's run's)")
    p.add_argument("--data-dir", type=Path, help="data directory (default: the training's)")
    p.add_argument("--output-dir", type=Path, help="reports (default: <run>/eval_<split>)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    return p.parse_args(argv)


def parse_predict(argv: list[str] | None) -> Namespace:
    p = _parser("cxrlandmarks-predict", "Landmarks for new images")
    p.add_argument("inputs", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", action="append", type=Path, required=True, help="repeatable")
    p.add_argument("--output-dir", type=Path, default=Path("predictions"))
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    return p.parse_args(argv)


def train(argv: list[str] | None = None) -> int:
    from cxrlandmarks.train import train_command

    return run_cli(lambda: train_command(parse_train(argv)), "cxrlandmarks-train")


def evaluate(argv: list[str] | None = None) -> int:
    from cxrlandmarks.evaluate import evaluate_command

    return run_cli(lambda: evaluate_command(parse_eval(argv)), "cxrlandmarks-eval")


def predict(argv: list[str] | None = None) -> int:
    from cxrlandmarks.predict import predict_command

    return run_cli(lambda: predict_command(parse_predict(argv)), "cxrlandmarks-predict")
