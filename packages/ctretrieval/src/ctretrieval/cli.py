"""Console entry points ``ctretrieval-{preprocess,train,eval,index,search,export}``: commands and flags.

Each command is ``ctretrieval.<module>:main(args)`` (:class:`medcore.cli.command.Command`).
"""

from __future__ import annotations

from pathlib import Path

from medcore.cli.command import Command
from medcore.cli.export import export_command
from medcore.runtime.device import DEVICE_CHOICES

P, F = {"type": Path}, {"type": float}
CKPT = {**P, "help": "a .pt written by ctretrieval-train"}
DEVICE = {"choices": DEVICE_CHOICES, "default": "auto"}
# fmt: off
preprocess = Command("ctretrieval-preprocess", "DICOM series / NIfTI -> uint8 volumes in one HDF5",
    "ctretrieval.preprocess:main", [
        ("--input", {**P, "required": True, "help": "one DICOM folder or NIfTI file per study"}),
        ("--output", {**P, "required": True, "help": "HDF5 file to write (resumed if it exists); "
                      "with --shard a folder of part files"}),
        ("--config", {**P, "help": "YAML whose preprocess: section sets the options"}),
        ("--set", {"dest": "overrides", "action": "append", "default": [], "metavar": "K=V"}),
        ("--shape", {"type": int, "nargs": 3, "metavar": ("SLICES", "H", "W"), "help": "size"}),
        ("--hu-window", {**F, "nargs": 2, "metavar": ("LOW", "HIGH"), "help": "default -1000 400"}),
        ("--target-spacing", {**F, "nargs": 3, "help": "mm (z y x), then centred in --shape"}),
        ("--workers", {"type": int, "help": "worker processes (default: one per core, at most 8)"}),
        ("--min-slices", {"type": int, "help": "skip series with fewer slices"}),
        ("--shard", {"metavar": "I/N", "help": "only shard I of N, into a part file of the "
                     "folder --output (default in a SLURM job array: its task)"})])
train = Command("ctretrieval-train", "Train the CT retrieval embedding", "ctretrieval.train:main", [
        ("--mode", {"choices": ["microf1", "triplet"], "help": "default: the config's"}, "mode")],
    common=True)
evaluate = Command("ctretrieval-eval", "Metric table of a checkpoint on a split",
    "ctretrieval.evaluate:main", [
        ("--checkpoint", {**CKPT, "required": True}),
        ("--split", {"default": "test", "choices": ["test", "train", "train_eval", "all"]}),
        ("--splits", {**P, "help": "splits.json (default: the checkpoint's run's)"})], common=False)
index = Command("ctretrieval-index", "Embed an archive of volumes into an index",
    "ctretrieval.index:main", [
        ("--checkpoint", {**CKPT, "required": True}),
        ("--volumes", {**P, "help": "HDF5 or folder of shard parts (default: the checkpoint's data)"}),
        ("--labels", {**P, "help": "labels CSV, to show findings in results"}),
        ("--data-dir", {**P, "help": "directory with volumes.h5 and labels.csv"}),
        ("--output", {**P, "required": True, "help": "index file to write (.npz)"}),
        ("--device", DEVICE), ("--batch-size", {"type": int, "default": 4})])
search = Command("ctretrieval-search", "Most similar studies of an index",
    "ctretrieval.search:main", [
        ("--index", {**P, "required": True, "help": "from ctretrieval-index"}),
        ("--query", {"required": True, "help": "an id of the index, or a raw study (a DICOM "
                     "folder or a NIfTI file), preprocessed as the index's archive was"}),
        ("--top-k", {"type": int, "default": 10, "help": "results to list"}),
        ("--knn-k", {"type": int, "help": "neighbours voting findings (default: eval.knn_k)"}),
        ("--threshold", {**F, "help": "for a finding (default: eval.threshold)"}),
        ("--checkpoint", {**CKPT, "help": "model for raw-study queries (default: the index's)"}),
        ("--output", {**P, "help": "results CSV, JSON beside it (default: by the index)"}),
        ("--device", DEVICE)])
# fmt: on
export = export_command("ctretrieval-export", "ctretrieval.export:main")
