"""Console scripts: ctclip-preprocess, ctclip-split, ctclip-train, ctclip-eval, ctclip-impressions.

Only the commands and their flags are declared here: ``(flag, type, default, help)``, with
``REQUIRED`` as default for a required flag. Each command is ``main(args)`` of its module, imported
only when the command runs (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ctclip.config import TRAIN_FLAGS
from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES

REQUIRED = object()
PREPROCESS = [
    ("--ct-data-path", Path, REQUIRED, "NIfTI directory (recursive)"),
    ("--ct-out-path", Path, REQUIRED, "output HDF5 file"),
    ("--metadata-path", Path, [], "metadata CSVs", {"nargs": "+"}),
    ("--target-shape", int, [160, 224, 224], "D H W", {"nargs": 3}),
    ("--slide-b2u", bool, True, "reverse the slice order (bottom to top)"),
    ("--num-workers", int, 4, "worker processes"),
    ("--compression", ["lzf", "gzip", "none"], "lzf", "HDF5 compression"),
]
EVALUATE = [
    ("--model-path", Path, REQUIRED, "a ctclip checkpoint (.pt) or final.safetensors"),
    ("--test-data", Path, REQUIRED, "HDF5 from ctclip-preprocess"),
    ("--test-labels", Path, REQUIRED, "VolumeName + 18 findings"),
    ("--val-labels", Path, None, "choose each finding's threshold on these"),
    ("--val-data", Path, None, "HDF5 of the --val-labels volumes (--test-data)"),
    ("--threshold", float, 0.5, "without --val-labels"),
    ("--output-dir", Path, Path("eval"), "report directory"),
    ("--device", DEVICE_CHOICES, "auto", "device"),
    ("--batch-size", int, 8, "volumes per batch"),
    ("--n-boot", int, 1000, "bootstrap resamples (95%% CIs)"),
    ("--seed", int, 0, "bootstrap seed"),
    ("--allow-missing", "store_true", False, "skip volumes not in the HDF5"),
]
SPLIT = [
    ("--data-dir", Path, REQUIRED, "the validation CSVs' folder"),
    ("--target-val-size", int, 500, "validation volumes"),
    ("--seed", int, 42, "random seed"),
]
IMPRESSIONS = [
    ("--target-file", Path, REQUIRED, "reports CSV"),
    ("--output-file", Path, REQUIRED, "JSON output (resumable)"),
    ("--num-examples", int, 8, "complete reports shown"),
    ("--base-url", str, "http://127.0.0.1:8000/v1", "OpenAI-compatible"),
    ("--model", str, "default", "model name the server serves"),
    ("--api-key", str, None, "bearer token (or $OPENAI_API_KEY)"),
    ("--temperature", float, 0.0, "sampling temperature"),
    ("--max-tokens", int, 256, "tokens per impression"),
    ("--timeout", float, 120.0, "seconds per request"),
    ("--seed", int, 42, "random seed (choice of examples)"),
]


TRAIN = [
    (f"--{f.replace('_', '-')}", kind, None, f"sets {key}")
    for f, (key, kind) in TRAIN_FLAGS.items()
]


def _parser(prog: str, description: str, flags: list[tuple]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, kind, default, help, *extra in flags:
        how = (
            {"action": argparse.BooleanOptionalAction} if kind is bool
            else {"action": kind} if kind == "store_true"
            else {"choices": kind} if isinstance(kind, (list, tuple))
            else {"type": kind}
        )  # fmt: skip
        required = {"required": True} if default is REQUIRED else {"default": default}
        parser.add_argument(name, help=help, **how, **required, **(extra[0] if extra else {}))
    return parser


def _command(prog: str, description: str, flags: list[tuple], module: str, common: bool = False):
    """The console script ``prog``: parse ``flags``, then ``ctclip.<module>.main(args)``."""

    def main(argv: list[str] | None = None) -> int:
        parser = _parser(prog, description, flags)
        if common:
            add_common_args(parser)
        command = importlib.import_module(f"ctclip.{module}").main
        return run_cli(lambda: command(parser.parse_args(argv)), prog)

    return main


train = _command("ctclip-train", "contrastive training of the 3D CT CLIP", TRAIN, "train", True)
preprocess = _command("ctclip-preprocess", "NIfTI CT volumes -> one HDF5", PREPROCESS, "preprocess")
evaluate = _command("ctclip-eval", "zero-shot evaluation of a checkpoint", EVALUATE, "evaluate")
split = _command("ctclip-split", "patient-wise validation/test split", SPLIT, "split")
impressions = _command(
    "ctclip-impressions", "fill impressions with an LLM", IMPRESSIONS, "impressions"
)
