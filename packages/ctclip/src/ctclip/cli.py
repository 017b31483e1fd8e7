"""Console scripts: ctclip-preprocess, ctclip-split, ctclip-train, ctclip-eval, ctclip-impressions.

Only the commands and their flags are declared here; each command's work is ``main(args)`` of
its module.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from medcore.cli import add_common_args, run_cli
from medcore.device import DEVICE_CHOICES

# ctclip-train flags in the original work's spelling -> (config key, type); bool: --x / --no-x.
TRAIN_FLAGS = {
    "ct_filepath": ("data.ct_filepath", str),
    "txt_filepath": ("data.txt_filepath", str),
    "val_ct_filepath": ("data.val_ct_filepath", str),
    "val_label_path": ("data.val_label_path", str),
    "text_column": ("data.text_column", str),
    "completed_impressions": ("data.completed_impressions", str),
    "dinov2_model_name": ("model.dinov2_model_name", str),
    "text_weights": ("model.text_weights", str),
    "context_length": ("model.context_length", int),
    "batch_size": ("trainer.batch_size", int),
    "lr": ("trainer.lr", float),
    "valid_interval": ("trainer.eval_every_steps", int),
    "freeze_dinov2": ("model.freeze_dinov2", bool),
    "do_validate": ("validation.do_validate", bool),
    "use_ddp": ("use_ddp", bool),
}


def _parser(prog: str, description: str, *flags: tuple[str, dict]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, options in flags:
        parser.add_argument(name, **options)
    return parser


def _run(
    prog: str,
    module: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse, then ``ctclip.<module>.main(args)`` (imported only then: ``--help`` stays fast)."""

    def main() -> int:
        args = parser.parse_args(argv)
        if prepare is not None:
            prepare(args)
        return importlib.import_module(f"ctclip.{module}").main(args)

    return run_cli(main, prog)


def _train_overrides(args: argparse.Namespace) -> None:
    """The original work's flags become ``--set`` items."""
    for flag, (key, _) in TRAIN_FLAGS.items():
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")


def train(argv: list[str] | None = None) -> int:
    parser = add_common_args(_parser("ctclip-train", "contrastive training of the 3D CT CLIP"))
    for flag, (_, kind) in TRAIN_FLAGS.items():
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + flag.replace("_", "-"), **how)
    return _run("ctclip-train", "train", parser, argv, prepare=_train_overrides)


def preprocess(argv: list[str] | None = None) -> int:
    parser = _parser(
        "ctclip-preprocess",
        "NIfTI CT volumes + metadata CSV -> one HDF5 file",
        ("--ct-data-path", {"type": Path, "required": True, "help": "NIfTI directory (recursive)"}),
        ("--ct-out-path", {"type": Path, "required": True, "help": "output HDF5 file"}),
        ("--metadata-path", {"type": Path, "nargs": "+", "default": [], "help": "metadata CSVs"}),
        ("--target-shape", {"type": int, "nargs": 3, "default": [160, 224, 224]}),
        ("--slide-b2u", {"action": argparse.BooleanOptionalAction, "default": True}),
        ("--num-workers", {"type": int, "default": 4}),
        ("--compression", {"choices": ["lzf", "gzip", "none"], "default": "lzf"}),
    )

    def main() -> int:
        from ctclip.preprocess import run_preprocess

        a = parser.parse_args(argv)
        res = run_preprocess(
            a.ct_data_path,
            a.ct_out_path,
            a.metadata_path,
            tuple(a.target_shape),
            slide_b2u=a.slide_b2u,
            num_workers=a.num_workers,
            compression=a.compression,
        )
        print(
            f"{a.ct_out_path}: {len(res.written)} written, {res.skipped_existing} already "
            f"present, {len(res.failed)} skipped"
        )
        return 0

    return run_cli(main, "ctclip-preprocess")


def evaluate(argv: list[str] | None = None) -> int:
    parser = _parser(
        "ctclip-eval",
        "zero-shot evaluation of a checkpoint (.pt or final.safetensors)",
        ("--model-path", {"type": Path, "required": True}),
        ("--test-data", {"type": Path, "required": True, "help": "HDF5 from ctclip-preprocess"}),
        ("--test-labels", {"type": Path, "required": True, "help": "VolumeName + 18 findings"}),
        ("--val-labels", {"type": Path, "help": "choose each finding's threshold on these"}),
        ("--val-data", {"type": Path, "help": "HDF5 of the --val-labels volumes (--test-data)"}),
        ("--threshold", {"type": float, "default": 0.5, "help": "without --val-labels"}),
        ("--output-dir", {"type": Path, "default": Path("eval")}),
        ("--device", {"choices": DEVICE_CHOICES, "default": "auto"}),
        ("--batch-size", {"type": int, "default": 8}),
        ("--n-boot", {"type": int, "default": 1000, "help": "bootstrap resamples (95%% CIs)"}),
        ("--seed", {"type": int, "default": 0}),
        ("--allow-missing", {"action": "store_true", "help": "skip volumes not in the HDF5"}),
    )
    return _run("ctclip-eval", "evaluate", parser, argv)


def split(argv: list[str] | None = None) -> int:
    parser = _parser(
        "ctclip-split",
        "patient-wise validation/test split of CT-RATE validation files",
        ("--data-dir", {"type": Path, "required": True, "help": "the validation CSVs' folder"}),
        ("--target-val-size", {"type": int, "default": 500, "help": "validation volumes"}),
        ("--seed", {"type": int, "default": 42}),
    )
    return _run("ctclip-split", "split", parser, argv)


def impressions(argv: list[str] | None = None) -> int:
    parser = _parser(
        "ctclip-impressions",
        "fill missing impressions with an LLM (few-shot)",
        ("--target-file", {"type": Path, "required": True, "help": "reports CSV"}),
        ("--output-file", {"type": Path, "required": True, "help": "JSON output (resumable)"}),
        ("--num-examples", {"type": int, "default": 8, "help": "complete reports shown"}),
        ("--base-url", {"default": "http://127.0.0.1:8000/v1", "help": "OpenAI-compatible"}),
        ("--model", {"default": "default", "help": "model name the server serves"}),
        ("--api-key", {"default": None, "help": "bearer token (or $OPENAI_API_KEY)"}),
        ("--temperature", {"type": float, "default": 0.0}),
        ("--max-tokens", {"type": int, "default": 256}),
        ("--timeout", {"type": float, "default": 120.0, "help": "seconds per request"}),
        ("--seed", {"type": int, "default": 42}),
    )
    return _run("ctclip-impressions", "impressions", parser, argv)
