"""The console scripts ``binensemble-train``, ``-predict``, ``-vote``, ``-analyze``: flags only."""

from __future__ import annotations

import argparse
from importlib import import_module
from pathlib import Path

from medcore.cli import add_common_args, run_cli

PROBS = (["probs"], {"nargs": "+", "type": Path, "help": "two or more probability files"})
WEIGHTS = (["--weights"], {"nargs": "+", "type": float, "help": "one per file (default: equal)"})
MODEL = (["--model"], {"choices": ["metric", "baseline", "both"], "help": "which model to train "
         "(default: both, then predict, vote, analyse; --resume: the run's own choice)"})  # fmt: skip
PREDICT = [
    (["model"], {"type": Path, "help": "a model directory of binensemble-train, or its model.pt"}),
    (
        ["--split"],
        {"choices": ["test", "val"], "default": "test", "help": "TestSet/ or validation"},
    ),
    (["--no-tta"], {"action": "store_true", "help": "identity view only (default: 4-view TTA)"}),
    (["--name"], {"help": "output file stem (default: the model name, e.g. metric_val)"}),
]
VOTE = [PROBS, WEIGHTS, (["--output"], {"type": Path, "default": Path("vote.csv"),
        "help": "final image_id,label CSV; probabilities beside it as <stem>_probs.csv"})]  # fmt: skip
ANALYZE = [PROBS, WEIGHTS, (["--names"], {"nargs": "+", "help": "(default: the file stems)"}),
           (["--labels"], {"type": Path, "help": "image_id,label CSV (default: the targets)"}),
           (["--output-dir"], {"type": Path, "default": Path("analysis")})]  # fmt: skip


def _command(prog: str, about: str, run: str, flags: list, common: bool | None = None):
    """``main(argv)`` of ``prog``: parse ``flags`` (+ the common ones), call ``module:function``."""

    def parse(argv: list[str] | None) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog=prog, description=about)
        if common is not None:
            add_common_args(parser, train=common)
        for names, options in flags:
            parser.add_argument(*names, **options)
        return parser.parse_args(argv)

    def main(argv: list[str] | None = None) -> int:
        module, function = run.split(":")
        return run_cli(lambda: getattr(import_module(module), function)(parse(argv)), prog)

    return main


train = _command("binensemble-train", "Train the metric and/or baseline model (no arguments: "
                 "the demo).", "binensemble.pipeline:run_train", [MODEL], common=True)  # fmt: skip
predict = _command("binensemble-predict", "Predict TestSet/ (or the validation split) with 4-view "
                   "TTA.", "binensemble.predict:run_predict", PREDICT, common=False)  # fmt: skip
vote = _command("binensemble-vote", "Soft-vote two or more models' probability files.",
                "binensemble.ensemble:run_vote", VOTE)  # fmt: skip
analyze = _command("binensemble-analyze", "Agreement, accuracy and complementarity of models.",
                   "binensemble.ensemble:run_analyze", ANALYZE)  # fmt: skip
if __name__ == "__main__":  # torchrun -m binensemble.cli ...
    raise SystemExit(train())
