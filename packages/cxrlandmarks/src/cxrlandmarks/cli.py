"""Console entry points ``cxrlandmarks-{train,eval,predict,export}``: the commands and their flags.

Each command runs ``cxrlandmarks.<module>:main(args)`` (:class:`medcore.cli.command.Command`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medcore.cli.command import Command
from medcore.cli.export import export_command
from medcore.runtime.device import DEVICE_CHOICES

P, DEVICE = {"type": Path}, ("--device", {"choices": DEVICE_CHOICES, "default": "auto"})
CHECKPOINTS = {**P, "action": "append", "default": [], "help": "repeatable"}
TTA = (
    "--tta-flip",
    {
        "action": argparse.BooleanOptionalAction,
        "default": None,
        "help": "also predict the mirror (default: as the config's eval.tta_flip)",
    },
)
# fmt: off
train = Command("cxrlandmarks-train", "4-phase landmark training",
                "cxrlandmarks.train:main", [
    ("--phase", {"choices": ["1", "2", "3", "4", "all"], "default": "all"}),
    ("--init-from", {**P, "help": "checkpoint the first phase starts from"}),
    ("--allow-missing", {"action": "store_true", "help": "accept >2%% rows w/o image"},
     "data.allow_missing")],
    common=True)
evaluate = Command("cxrlandmarks-eval", "Evaluate checkpoints on a split",
                   "cxrlandmarks.evaluate:main", [
    TTA, ("--checkpoint", CHECKPOINTS),
    ("--run-dir", {**P, "help": "evaluate every phase checkpoint of a run"}),
    ("--split", {"choices": ["train", "val", "test", "all"], "default": "test"}),
    ("--splits", {**P, "help": "splits.json (default: the checkpoint's run's)"}),
    ("--data-dir", {**P, "help": "data directory (default: the training's)"}, "data.data_dir"),
    ("--output-dir", {**P, "help": "reports (default: <run>/eval_<split>)"}), DEVICE])
predict = Command("cxrlandmarks-predict", "Landmarks for new images",
                  "cxrlandmarks.predict:main", [
    TTA, ("inputs", {**P, "nargs": "+", "help": "image files or folders"}),
    ("--checkpoint", {"action": "append", "default": [], "required": True, "metavar": "SOURCE",
                      "help": "a run, checkpoint, exported folder or hf-hub:ORG/NAME; repeatable"}),
    ("--output-dir", {**P, "default": Path("predictions")}), DEVICE,
    ("--batch-size", {"type": int, "default": 16}),
    ("--no-overlays", {"action": "store_true", "help": "skip the overlay PNGs"})])
export = export_command("cxrlandmarks-export", "cxrlandmarks.export:main")
# fmt: on
