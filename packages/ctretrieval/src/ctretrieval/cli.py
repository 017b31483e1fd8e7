"""Console entry points ``ctretrieval-{preprocess,train,eval,index,search}``: commands and flags.

Each command parses its flags here and hands the namespace to the function that does the work.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES

CKPT = {"type": Path, "help": "a .pt written by ctretrieval-train"}
DEVICE = {"choices": DEVICE_CHOICES, "default": "auto"}

# command: description and the common flags it takes (train=True / False; None: none)
ABOUT = {
    "train": ("Train the CT retrieval embedding", True),
    "eval": ("Metric table of a checkpoint on a split", False),
    "index": ("Embed an archive of volumes into an index", None),
    "search": ("Most similar studies of an index", None),
}
FLAGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "train": [("--mode", {"choices": ["microf1", "triplet"], "help": "default: the config's"})],
    "eval": [
        ("--checkpoint", {**CKPT, "required": True}),
        ("--split", {"default": "test", "choices": ["test", "train", "train_eval", "all"]}),
        ("--splits", {"type": Path, "help": "splits.json (default: the checkpoint's run's)"}),
    ],
    "index": [
        ("--checkpoint", {**CKPT, "required": True}),
        ("--volumes", {"type": Path, "help": "HDF5 (default: the checkpoint's data)"}),
        ("--labels", {"type": Path, "help": "labels CSV, to show findings in results"}),
        ("--data-dir", {"type": Path, "help": "directory with volumes.h5 and labels.csv"}),
        ("--output", {"type": Path, "required": True, "help": "index file to write (.npz)"}),
        ("--device", DEVICE),
        ("--batch-size", {"type": int, "default": 4}),
    ],
    "search": [
        ("--index", {"type": Path, "required": True, "help": "from ctretrieval-index"}),
        ("--query", {"required": True, "help": "an id of the index, a DICOM folder, a NIfTI"}),
        ("--top-k", {"type": int, "default": 10, "help": "results to list"}),
        ("--knn-k", {"type": int, "help": "neighbours voting findings (default: eval.knn_k)"}),
        ("--threshold", {"type": float, "help": "for a finding (default: eval.threshold)"}),
        ("--checkpoint", {**CKPT, "help": "model for raw-study queries (default: the index's)"}),
        ("--output", {"type": Path, "help": "results CSV, JSON beside it (default: by the index)"}),
        ("--device", DEVICE),
    ],
}


def parse(command: str, argv: list[str] | None) -> argparse.Namespace:
    description, common = ABOUT[command]
    parser = argparse.ArgumentParser(prog=f"ctretrieval-{command}", description=description)
    for flag, kwargs in FLAGS[command]:
        parser.add_argument(flag, **kwargs)
    if common is not None:
        add_common_args(parser, train=common)
    return parser.parse_args(argv)


def _command(name: str, target: str) -> Callable[[list[str] | None], int]:
    """``main(argv) -> exit code`` of ``ctretrieval-<name>``, calling ``module:function``."""

    def main(argv: list[str] | None = None) -> int:
        module, function = target.split(":")
        work = getattr(importlib.import_module(module), function)
        if name == "preprocess":  # parses its own flags (ctretrieval.preprocess)
            return run_cli(lambda: work(argv), f"ctretrieval-{name}")
        return run_cli(lambda: work(parse(name, argv)), f"ctretrieval-{name}")

    return main


preprocess = _command("preprocess", "ctretrieval.preprocess:main")
train = _command("train", "ctretrieval.train:run")
evaluate = _command("eval", "ctretrieval.evaluate:run")
index = _command("index", "ctretrieval.index:index_main")
search = _command("search", "ctretrieval.index:search_main")
