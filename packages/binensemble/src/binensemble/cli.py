"""The console scripts: ``binensemble-train``, ``-predict``, ``-vote`` and ``-analyze``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from medcore.cli import add_common_args, run_cli


def _command(
    prog: str,
    description: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args), prog)


def train(argv: list[str] | None = None) -> int:
    from binensemble.train import add_train_args, run_train

    def add(parser: argparse.ArgumentParser) -> None:
        add_common_args(parser)
        add_train_args(parser)

    return _command(
        "binensemble-train",
        "Train the metric and/or baseline model (no arguments: the demo).",
        add,
        run_train,
        argv,
    )


def predict(argv: list[str] | None = None) -> int:
    from binensemble.predict import add_predict_args, run_predict

    return _command(
        "binensemble-predict",
        "Predict TestSet/ (or the validation split) with 4-view TTA.",
        add_predict_args,
        run_predict,
        argv,
    )


def vote(argv: list[str] | None = None) -> int:
    from binensemble.ensemble import add_vote_args, run_vote

    return _command(
        "binensemble-vote",
        "Soft-vote two or more models' probability files.",
        add_vote_args,
        run_vote,
        argv,
    )


def analyze(argv: list[str] | None = None) -> int:
    from binensemble.ensemble import add_analyze_args, run_analyze

    return _command(
        "binensemble-analyze",
        "Agreement, accuracy and complementarity of several models.",
        add_analyze_args,
        run_analyze,
        argv,
    )


main = train


if __name__ == "__main__":  # torchrun -m binensemble.cli ...
    raise SystemExit(train())
