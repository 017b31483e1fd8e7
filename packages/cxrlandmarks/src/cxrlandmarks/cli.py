"""Console scripts: ``cxrlandmarks-train``, ``cxrlandmarks-eval``, ``cxrlandmarks-predict``.

Only commands and flags; the commands themselves are in train.py, evaluate.py and predict.py.
"""

from __future__ import annotations

from argparse import ArgumentParser
from importlib import import_module
from pathlib import Path

from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES

P, F = dict(type=Path), dict(action="store_true")  # a path flag, a boolean flag
CKPTS = dict(action="append", type=Path, default=[])
TTA = ("--tta-flip", dict(F, help="also predict the mirrored image and average"))
DEVICE = ("--device", dict(choices=DEVICE_CHOICES, default="auto"))
TRAIN = [
    ("--phase", dict(choices=["1", "2", "3", "4", "all"], default="all", help="'all' chains 1-4")),
    (
        "--init-from",
        dict(P, help="checkpoint the first phase starts from (ours or the original's)"),
    ),
    ("--allow-missing", dict(F, help="accept more than 2%% of annotated rows without an image")),
]
EVAL = [
    ("--checkpoint", dict(CKPTS, help="checkpoint to evaluate (repeat to compare phases)")),
    ("--run-dir", dict(P, help="evaluate every phase checkpoint of a training run")),
    ("--split", dict(choices=["train", "val", "test", "all"], default="test")),
    ("--splits", dict(P, help="splits.json (default: the one in the checkpoint's run)")),
    ("--data-dir", dict(P, help="data directory (default: the one used in training)")),
    ("--output-dir", dict(P, help="where reports go (default: <run>/eval_<split>)")),
    DEVICE,
    TTA,
]
PREDICT = [
    ("inputs", dict(P, nargs="+", help="image files or folders")),
    ("--checkpoint", dict(CKPTS, required=True, help="checkpoint (repeat for an ensemble)")),
    TTA,
    ("--output-dir", dict(P, default=Path("predictions"))),
    DEVICE,
    ("--batch-size", dict(type=int, default=16)),
    ("--no-overlays", dict(F, help="skip the overlay PNGs")),
]


def _main(prog: str, command: str, flags: list, argv: list[str] | None, about: str) -> int:
    """Parse ``argv`` for ``prog`` and run ``cxrlandmarks.<module>.<function>`` under run_cli."""
    parser = ArgumentParser(prog, description=about)
    if prog.endswith("-train"):
        add_common_args(parser)
    for name, kwargs in flags:
        parser.add_argument(name, **kwargs)
    args = parser.parse_args(argv)
    module, function = command.rsplit(".", 1)
    run = getattr(import_module(f"cxrlandmarks.{module}"), function)
    return run_cli(lambda: run(args), prog)


def train(argv: list[str] | None = None) -> int:
    about = "4-phase landmark training (no arguments: the synthetic demo; --data-dir: paper)"
    return _main("cxrlandmarks-train", "train.train_command", TRAIN, argv, about)


def evaluate(argv: list[str] | None = None) -> int:
    about = "Evaluate checkpoints on a split"
    return _main("cxrlandmarks-eval", "evaluate.evaluate_command", EVAL, argv, about)


def predict(argv: list[str] | None = None) -> int:
    about = "Landmarks for new images"
    return _main("cxrlandmarks-predict", "predict.predict_command", PREDICT, argv, about)
