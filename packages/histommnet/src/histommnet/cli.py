"""Console entry points; each parses nothing itself and turns user errors into one line."""

from __future__ import annotations

from medcore.cli import run_cli


def train(argv: list[str] | None = None) -> int:
    """``histommnet-train``: k-fold cross-validation (the built-in demo without arguments)."""
    from histommnet.train import run

    return run_cli(lambda: run(argv), "histommnet-train")


def analyze(argv: list[str] | None = None) -> int:
    """``histommnet-analyze``: dataset report and fold summary."""
    from histommnet.analyze import run

    return run_cli(lambda: run(argv), "histommnet-analyze")


def gradcam(argv: list[str] | None = None) -> int:
    """``histommnet-gradcam``: Grad-CAM overlays per magnification for chosen patients."""
    from histommnet.gradcam import run

    return run_cli(lambda: run(argv), "histommnet-gradcam")


if __name__ == "__main__":  # torchrun --nproc_per_node=4 -m histommnet.cli [train flags]
    raise SystemExit(train())
