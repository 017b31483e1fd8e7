"""Console scripts ``ctclip-{preprocess,split,train,eval,impressions,predict,export}``: commands
and flags only.

Each command is ``ctclip.<module>:main(args)`` (:class:`medcore.cli.command.Command`).
"""

from __future__ import annotations

from argparse import BooleanOptionalAction
from pathlib import Path

from ctclip.config import HU_SOURCES, TRAIN_FLAGS
from medcore.cli.command import Command
from medcore.cli.export import export_command
from medcore.cli.flags import Flag
from medcore.runtime.device import DEVICE_CHOICES

P, NEED, INT, F = {"type": Path}, {"type": Path, "required": True}, {"type": int}, {"type": float}
# fmt: off
PREPROCESS = [
    ("--ct-data-path", {**P, "help": "NIfTI directory (recursive)"}),
    ("--data-dir", {**P, "help": "instead of the two above: a CT-RATE download or flat folder"}),
    ("--ct-out-path", {**NEED, "help": "output HDF5 file"}),
    ("--metadata-path", {**P, "nargs": "+", "default": [], "help": "metadata CSVs"}),
    ("--hu-source", {"choices": HU_SOURCES, "default": "auto",
                     "help": "HU from the NIfTI header, the metadata's rescale, or auto"}),
    ("--target-shape", {**INT, "nargs": 3, "default": [160, 224, 224], "help": "D H W"}),
    ("--slide-b2u", {"action": BooleanOptionalAction, "default": True,
                     "help": "reverse the slice order (bottom to top)"}),
    ("--num-workers", {**INT, "default": 4, "help": "worker processes"}),
    ("--compression", {"choices": ["lzf", "gzip", "none"], "default": "lzf"}),
    ("--shard", {"metavar": "I/N", "help": "only shard I of N, into a part file of the folder "
                 "--ct-out-path (default in a SLURM job array: its task)"})]
EVALUATE = [
    ("--model-path", {**NEED, "help": "a run directory (its best checkpoint) or a ctclip "
                                      "checkpoint (.pt)"}),
    ("--test-data", {**P, "help": "HDF5 from ctclip-preprocess"}),
    ("--test-labels", {**P, "help": "VolumeName + 18 findings"}),
    ("--data-dir", {**P, "help": "a CT-RATE copy: the defaults of the two above"}),
    ("--val-labels", {**P, "help": "choose each finding's threshold on these"}),
    ("--val-data", {**P, "help": "HDF5 of the --val-labels volumes (default: --test-data)"}),
    ("--threshold", {**F, "default": 0.5, "help": "without --val-labels"}),
    ("--output-dir", {**P, "default": Path("eval"), "help": "report directory"}),
    ("--device", {"choices": DEVICE_CHOICES, "default": "auto"}),
    ("--batch-size", {**INT, "default": 8, "help": "volumes per batch"}),
    ("--n-boot", {**INT, "default": 1000, "help": "bootstrap resamples (95%% CIs)"}),
    ("--seed", {**INT, "default": 0, "help": "bootstrap seed"}),
    ("--allow-missing", {"action": "store_true", "help": "skip volumes not in the HDF5"})]
SPLIT = [
    ("--data-dir", {**NEED, "help": "a CT-RATE download, or a folder of validation CSVs"}),
    ("--output-dir", {**P, "help": "where the split goes (required with the download; "
                                   "default for a flat folder: in place)"}),
    ("--target-val-size", {**INT, "default": 500, "help": "validation volumes"}),
    ("--seed", {**INT, "default": 42})]
IMPRESSIONS = [
    ("--target-file", {**NEED, "help": "reports CSV"}),
    ("--output-file", {**NEED, "help": "JSON output (resumable)"}),
    ("--num-examples", {**INT, "default": 8, "help": "complete reports shown"}),
    ("--base-url", {"default": "http://127.0.0.1:8000/v1", "help": "OpenAI-compatible"}),
    ("--model", {"default": "default", "help": "model name the server serves"}),
    ("--api-key", {"help": "bearer token (or $OPENAI_API_KEY)"}),
    ("--temperature", {**F, "default": 0.0}),
    ("--max-tokens", {**INT, "default": 256, "help": "tokens per impression"}),
    ("--timeout", {**F, "default": 120.0, "help": "seconds per request"}),
    ("--seed", {**INT, "default": 42, "help": "random seed (choice of examples)"})]
PREDICT = [
    ("inputs", {"type": Path, "nargs": "+", "metavar": "INPUT",
                "help": "NIfTI files, DICOM series folders, folders of NIfTI files, or a CSV "
                        "with a path column (and optionally a name column)"}),
    ("--model", {"required": True, "metavar": "SOURCE",
                 "help": "a run directory (its best checkpoint), a .pt checkpoint, an exported "
                         "folder or hf-hub:ORG/NAME[@REV]"}),
    ("--output", {**NEED, "help": "CSV of finding probabilities, one row per volume"}),
    ("--findings", {"nargs": "+", "metavar": "NAME",
                    "help": "finding names to ask about (default: the model's 18)"}),
    ("--embeddings", {**P, "metavar": "OUT.safetensors",
                      "help": "also write the volume embeddings, keyed by volume name"}),
    ("--metadata-path", {**P, "nargs": "+", "default": [],
                         "help": "CT-RATE metadata CSVs (spacing, rescale), as ctclip-preprocess"}),
    ("--hu-source", {"choices": HU_SOURCES, "default": "auto",
                     "help": "as ctclip-preprocess (matters with --metadata-path)"}),
    ("--device", {"choices": DEVICE_CHOICES, "default": "auto"}),
    ("--batch-size", {**INT, "default": 4, "help": "volumes per batch"}),
    ("--num-workers", {**INT, "help": "processes preprocessing volumes (default: the device's)"})]
TRAIN = [Flag(f"--{name.replace('_', '-')}", {"help": f"sets {key}", **(
    {"action": BooleanOptionalAction} if kind is bool else {"type": kind})}, key)
    for name, (key, kind) in TRAIN_FLAGS.items()]

train = Command("ctclip-train", "contrastive training of the 3D CT CLIP", "ctclip.train:main",
                TRAIN, common=True)
preprocess = Command("ctclip-preprocess", "NIfTI CT volumes -> one HDF5",
                     "ctclip.preprocess:main", PREPROCESS)
evaluate = Command("ctclip-eval", "zero-shot evaluation of a checkpoint", "ctclip.evaluate:main",
                   EVALUATE)
split = Command("ctclip-split", "patient-wise validation/test split", "ctclip.split:main", SPLIT)
impressions = Command("ctclip-impressions", "fill impressions with an LLM",
                      "ctclip.impressions:main", IMPRESSIONS)
predict = Command("ctclip-predict", "zero-shot findings of NIfTI/DICOM volumes -> CSV",
                  "ctclip.predict:main", PREDICT)
# fmt: on
export = export_command("ctclip-export", "ctclip.export:main")
