"""Console entry points: the commands and their flags only; each command's work is
``histommnet.<module>.run(args)`` (imported when the command runs, so ``--help`` stays fast)."""

from __future__ import annotations

import importlib
from argparse import ArgumentParser, Namespace
from pathlib import Path

from medcore.cli import add_common_args, run_cli

MODELS = ("mmnet", "single", "concat")


def _parser(prog: str, doc: str, *flags: tuple[str, dict], train: bool = False) -> ArgumentParser:
    parser = add_common_args(ArgumentParser(prog=prog, description=doc), train=train)
    for name, options in flags:
        parser.add_argument(name, **options)
    return parser


def _main(prog: str, module: str, parser: ArgumentParser, argv: list[str] | None) -> int:
    return run_cli(lambda: _run(module, parser.parse_args(argv)), prog)


def _run(module: str, args: Namespace) -> int:
    return importlib.import_module(f"histommnet.{module}").run(args)


FOLDS = ("--folds", {"type": int, "help": "number of cross-validation folds (default 5)"})


def train(argv: list[str] | None = None) -> int:
    """``histommnet-train``: k-fold cross-validation (the built-in demo without arguments)."""
    parser = _parser(
        "histommnet-train",
        "patient-wise k-fold cross-validation of MMNet",
        ("--model", {"choices": MODELS, "help": "model kind (default: mmnet)"}),
        FOLDS,
        ("--fold", {"type": int, "help": "run only this fold (0-based)"}),
        train=True,
    )
    return _main("histommnet-train", "crossval", parser, argv)


def analyze(argv: list[str] | None = None) -> int:
    """``histommnet-analyze``: dataset report and fold summary."""
    parser = _parser(
        "histommnet-analyze",
        "BreakHis dataset report and the cross-validation folds",
        FOLDS,
        ("--run", {"type": Path, "help": "a training run: report its config and saved folds"}),
    )
    return _main("histommnet-analyze", "analyze", parser, argv)


def gradcam(argv: list[str] | None = None) -> int:
    """``histommnet-gradcam``: Grad-CAM overlays per magnification for chosen patients."""
    parser = _parser(
        "histommnet-gradcam",
        "Grad-CAM heatmaps per magnification",
        ("--checkpoint", {"type": Path, "required": True, "help": "a fold_<i>_best.pth"}),
        ("--patients", {"nargs": "+", "metavar": "ID", "help": "patient folders or ids"}),
        ("--num-patients", {"type": int, "default": 4, "help": "without --patients: how many"}),
        ("--draw", {"type": int, "default": 0, "help": "which evaluation draw of each patient"}),
        ("--target", {"choices": ("predicted", "benign", "malignant"), "default": "predicted"}),
        ("--threshold", {"type": float, "help": "P(malignant) cut-off (default: the fold's)"}),
    )
    return _main("histommnet-gradcam", "gradcam", parser, argv)


if __name__ == "__main__":  # torchrun --nproc_per_node=4 -m histommnet.cli [train flags]
    raise SystemExit(train())
