"""The console scripts: ``binensemble-train``, ``-predict``, ``-vote`` and ``-analyze``."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from medcore.cli import add_common_args, run_cli

PROBS = {"nargs": "+", "type": Path, "help": "two or more probability files (*_probs.csv)"}


def _main(prog: str, doc: str, run: str, argv: list[str] | None, *flags: tuple) -> int:
    """Parse ``flags`` (``(names, options)`` pairs) and call ``run`` (``module:function``)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    for names, options in flags:
        if names == "common":
            add_common_args(parser, **options)
        else:
            parser.add_argument(*names, **options)
    args = parser.parse_args(argv)
    module, function = run.split(":")
    return run_cli(lambda: getattr(importlib.import_module(module), function)(args), prog)


def train(argv: list[str] | None = None) -> int:
    return _main(
        "binensemble-train", "Train the metric and/or baseline model (no arguments: the demo).",
        "binensemble.pipeline:run_train", argv, ("common", {}),
        (["--model"], {"choices": ["metric", "baseline", "both"], "help": "which model to train "
         "(default: both, then predict, vote, analyse; --resume latest: the run's own choice)"}),
    )  # fmt: skip


def predict(argv: list[str] | None = None) -> int:
    return _main(
        "binensemble-predict", "Predict TestSet/ (or the validation split) with 4-view TTA.",
        "binensemble.predict:run_predict", argv, ("common", {"train": False}),
        (["model"], {"type": Path, "help": "a model directory of binensemble-train, or its model.pt"}),
        (["--split"], {"choices": ["test", "val"], "default": "test",
                       "help": "TestSet/ images (default) or the run's validation split"}),
        (["--no-tta"], {"action": "store_true", "help": "identity view only (default: 4-view TTA)"}),
        (["--name"], {"help": "output file stem (default: the model name, e.g. metric_val)"}),
    )  # fmt: skip


def vote(argv: list[str] | None = None) -> int:
    return _main(
        "binensemble-vote", "Soft-vote two or more models' probability files.",
        "binensemble.ensemble:run_vote", argv, (["probs"], PROBS),
        (["--weights"], {"nargs": "+", "type": float, "help": "one weight per file (default: equal)"}),
        (["--output"], {"type": Path, "default": Path("vote.csv"), "help": "final image_id,label "
                        "CSV; probabilities go beside it as <stem>_probs.csv"}),
    )  # fmt: skip


def analyze(argv: list[str] | None = None) -> int:
    return _main(
        "binensemble-analyze", "Agreement, accuracy and complementarity of several models.",
        "binensemble.ensemble:run_analyze", argv, (["probs"], PROBS),
        (["--names"], {"nargs": "+", "help": "model names (default: the file stems)"}),
        (["--weights"], {"nargs": "+", "type": float, "help": "voting weights (default: equal)"}),
        (["--labels"], {"type": Path, "help": "image_id,label CSV (default: the target column)"}),
        (["--output-dir"], {"type": Path, "default": Path("analysis"), "help": "report folder"}),
    )  # fmt: skip


main = train

if __name__ == "__main__":  # torchrun -m binensemble.cli ...
    raise SystemExit(train())
