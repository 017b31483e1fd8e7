"""Console entry points ``binensemble-{train,predict,vote,analyze,export}``: commands and flags only.

Each command is ``binensemble.<module>:main(args)`` (:class:`medcore.cli.command.Command`).
"""

from __future__ import annotations

from pathlib import Path

from medcore.cli.command import Command
from medcore.cli.export import export_command

P = {"type": Path}
PROBS = ("probs", {**P, "nargs": "+", "help": "two or more probability files"})
WEIGHTS = ("--weights", {"nargs": "+", "type": float, "help": "one per file (default: equal)"})
# fmt: off
train = Command("binensemble-train", "Train the metric and/or baseline model (no arguments: the "
                "demo).", "binensemble.train:main", [
    ("--model", {"choices": ["metric", "baseline", "both"], "help": "which model to train "
                 "(default: both, then predict, vote, analyse; --resume: the run's own choice)"})],
    common=True)
predict = Command("binensemble-predict", "Predict TestSet/ (or the validation split) with 4-view "
                  "TTA.", "binensemble.predict:main", [
    ("model", {"metavar": "SOURCE", "help": "a run directory of binensemble-train (every "
               "model and the vote), a model's model.pt, an exported folder or hf-hub:ORG/NAME"}),
    ("--split", {"choices": ["test", "val"], "default": "test", "help": "TestSet/ or validation"}),
    ("--images", {**P, "nargs": "+", "help": "image files or folders to predict instead of "
                  "TestSet/"}),
    ("--no-tta", {"action": "store_true", "help": "identity view only (default: 4-view TTA)"}),
    ("--name", {"help": "output file stem (default: the model name, e.g. metric_val)"})],
    common=False)
vote = Command("binensemble-vote", "Soft-vote two or more models' probability files.",
               "binensemble.vote:main", [PROBS, WEIGHTS, ("--output", {
                   **P, "default": Path("vote.csv"),
                   "help": "final image_id,label CSV; probabilities beside it as <stem>_probs.csv"})])
analyze = Command("binensemble-analyze", "Agreement, accuracy and complementarity of models.",
                  "binensemble.analyze:main", [
    PROBS, WEIGHTS, ("--names", {"nargs": "+", "help": "(default: the file stems)"}),
    ("--labels", {**P, "help": "image_id,label CSV (default: the targets)"}),
    ("--output-dir", {**P, "default": Path("analysis")})])
export = export_command("binensemble-export", "binensemble.export:main", "Export the model of a "
                        "run (every model and the vote) or of a checkpoint as a Hugging Face "
                        "model folder (safetensors with the KNN gallery, config, card).")
# fmt: on

if __name__ == "__main__":  # torchrun -m binensemble.cli ...
    raise SystemExit(train())
