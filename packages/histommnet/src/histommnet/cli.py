"""Console entry points: each declares its flags, parses, and turns user errors into one line."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path

from medcore.cli import add_common_args, run_cli

MODELS = ("mmnet", "single", "concat")


def _parser(prog: str, doc: str, train: bool = False) -> ArgumentParser:
    return add_common_args(ArgumentParser(prog=prog, description=doc), train=train)


def train(argv: list[str] | None = None) -> int:
    """``histommnet-train``: k-fold cross-validation (the built-in demo without arguments)."""
    p = _parser("histommnet-train", "patient-wise k-fold cross-validation of MMNet", train=True)
    p.add_argument("--model", choices=MODELS, help="model kind (default: mmnet)")
    p.add_argument("--folds", type=int, help="number of cross-validation folds (default 5)")
    p.add_argument("--fold", type=int, help="run only this fold (0-based)")
    args = p.parse_args(argv)
    from histommnet.crossval import run

    return run_cli(lambda: run(args), "histommnet-train")


def analyze(argv: list[str] | None = None) -> int:
    """``histommnet-analyze``: dataset report and fold summary."""
    p = _parser("histommnet-analyze", "BreakHis dataset report and the cross-validation folds")
    p.add_argument("--folds", type=int, help="number of cross-validation folds (default 5)")
    p.add_argument("--run", type=Path, help="a training run: report its config and saved folds")
    args = p.parse_args(argv)
    from histommnet.analyze import run

    return run_cli(lambda: run(args), "histommnet-analyze")


def gradcam(argv: list[str] | None = None) -> int:
    """``histommnet-gradcam``: Grad-CAM overlays per magnification for chosen patients."""
    p = _parser("histommnet-gradcam", "Grad-CAM heatmaps per magnification")
    p.add_argument("--checkpoint", type=Path, required=True, help="a fold_<i>_best.pth")
    p.add_argument("--patients", nargs="+", metavar="ID", help="patient folders or ids")
    p.add_argument("--num-patients", type=int, default=4, help="without --patients: how many")
    p.add_argument("--draw", type=int, default=0, help="which evaluation draw of each patient")
    p.add_argument("--target", choices=("predicted", "benign", "malignant"), default="predicted")
    p.add_argument("--threshold", type=float, help="P(malignant) cut-off (default: the fold's)")
    args = p.parse_args(argv)
    from histommnet.gradcam import run

    return run_cli(lambda: run(args), "histommnet-gradcam")


if __name__ == "__main__":  # torchrun --nproc_per_node=4 -m histommnet.cli [train flags]
    raise SystemExit(train())
