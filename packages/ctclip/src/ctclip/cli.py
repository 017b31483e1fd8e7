"""Console scripts: ctclip-preprocess, ctclip-split, ctclip-train, ctclip-eval, ctclip-impressions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medcore.cli import add_common_args, run_cli, setup_run
from medcore.device import DEVICE_CHOICES, resolve_device

TRAIN_FLAGS = {  # ctclip-train flag -> config key (the spec's spelling of the original options)
    "ct_filepath": "data.ct_filepath",
    "txt_filepath": "data.txt_filepath",
    "val_ct_filepath": "data.val_ct_filepath",
    "val_label_path": "data.val_label_path",
    "text_column": "data.text_column",
    "dinov2_model_name": "model.dinov2_model_name",
    "context_length": "model.context_length",
    "batch_size": "trainer.batch_size",
    "lr": "trainer.lr",
    "valid_interval": "trainer.eval_every_steps",
}
SWITCHES = {
    "freeze_dinov2": "model.freeze_dinov2",
    "do_validate": "validation.do_validate",
    "use_ddp": "use_ddp",
}


def train(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(prog="ctclip-train", description=__doc__))
    for flag in TRAIN_FLAGS:
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            type=int
            if flag in ("context_length", "batch_size", "valid_interval")
            else float
            if flag == "lr"
            else str,
        )
    for flag in SWITCHES:
        parser.add_argument(
            "--" + flag.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None
        )

    def main() -> int:
        args = parser.parse_args(argv)
        args.overrides = [
            *args.overrides,
            *(
                f"{key}={getattr(args, f)}"
                for f, key in {**TRAIN_FLAGS, **SWITCHES}.items()
                if getattr(args, f) is not None
            ),
        ]
        from ctclip.config import CTClipConfig
        from ctclip.train import run_train

        smoke = [  # a smaller demo, so that --smoke is quick even with a cold cache
            "data.demo_train_volumes=24",
            "data.demo_valid_volumes=12",
            "trainer.batch_size=8",
            "validation.n_boot=50",
        ]
        run_train(setup_run(args, CTClipConfig, "ctclip", "default", smoke_overrides=smoke))
        return 0

    return run_cli(main, "ctclip-train")


def preprocess(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctclip-preprocess", description="NIfTI CT volumes + metadata CSV -> one HDF5 file"
    )
    parser.add_argument(
        "--ct-data-path",
        type=Path,
        required=True,
        help="directory of NIfTI files (searched recursively)",
    )
    parser.add_argument("--ct-out-path", type=Path, required=True, help="output HDF5 file")
    parser.add_argument(
        "--metadata-path", type=Path, nargs="+", default=[], help="CT-RATE metadata CSV(s)"
    )
    parser.add_argument(
        "--target-shape", type=int, nargs=3, default=[160, 224, 224], metavar=("D", "H", "W")
    )
    parser.add_argument(
        "--slide-b2u",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="slices bottom-to-up (inferior first); --no-slide-b2u for top-down",
    )
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--compression", choices=["lzf", "gzip", "none"], default="lzf")

    def main() -> int:
        from ctclip.preprocess import run_preprocess

        args = parser.parse_args(argv)
        res = run_preprocess(
            args.ct_data_path,
            args.ct_out_path,
            args.metadata_path,
            tuple(args.target_shape),
            args.slide_b2u,
            args.num_workers,
            args.compression,
        )
        print(
            f"{args.ct_out_path}: {len(res.written)} written, {res.skipped_existing} already present, "
            f"{len(res.failed)} skipped"
        )
        return 0

    return run_cli(main, "ctclip-preprocess")


def evaluate(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctclip-eval", description="zero-shot evaluation of a checkpoint"
    )
    parser.add_argument(
        "--model-path", type=Path, required=True, help="checkpoint written by ctclip-train"
    )
    parser.add_argument(
        "--test-data", type=Path, required=True, help="HDF5 file from ctclip-preprocess"
    )
    parser.add_argument(
        "--test-labels", type=Path, required=True, help="labels CSV (VolumeName + 18 findings)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("eval"))
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs"
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="probability threshold for F1/precision/recall"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate only labelled volumes present in the HDF5",
    )

    def main() -> int:
        from ctclip.evaluate import format_summary, run_evaluation

        args = parser.parse_args(argv)
        summary = run_evaluation(
            args.model_path,
            args.test_data,
            args.test_labels,
            args.output_dir,
            resolve_device(args.device),
            args.batch_size,
            args.n_boot,
            args.seed,
            args.threshold,
            args.allow_missing,
        )
        print(format_summary(summary))
        print(f"written to {args.output_dir}", file=sys.stderr)
        return 0

    return run_cli(main, "ctclip-eval")


def split(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctclip-split",
        description="patient-wise validation/test split of CT-RATE validation files",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="directory with the validation CSVs (data/ct_rate)",
    )
    parser.add_argument(
        "--target-val-size",
        type=int,
        default=500,
        help="volumes to keep for validation (approximate)",
    )
    parser.add_argument("--seed", type=int, default=42)

    def main() -> int:
        from ctclip.split import run_split

        args = parser.parse_args(argv)
        summary = run_split(args.data_dir, args.target_val_size, args.seed)
        print(
            f"validation: {summary['validation']['volumes']} volumes / {summary['validation']['patients']} patients; "
            f"test: {summary['test']['volumes']} volumes / {summary['test']['patients']} patients; no patient in both"
        )
        return 0

    return run_cli(main, "ctclip-split")


def impressions(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctclip-impressions", description="fill missing impressions with an LLM (few-shot)"
    )
    parser.add_argument(
        "--target-file",
        type=Path,
        required=True,
        help="reports CSV with some Impressions_EN missing",
    )
    parser.add_argument("--output-file", type=Path, required=True, help="JSON output (resumable)")
    parser.add_argument(
        "--num-examples", type=int, default=8, help="complete reports shown as examples"
    )
    parser.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000/v1",
        help="OpenAI-compatible server (e.g. vLLM)",
    )
    parser.add_argument("--model", default="default", help="model name the server serves")
    parser.add_argument(
        "--api-key", default=None, help="bearer token, if the server wants one (or $OPENAI_API_KEY)"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=42)

    def main() -> int:
        from ctclip.impressions import run_impressions

        args = parser.parse_args(argv)
        res = run_impressions(
            args.target_file,
            args.output_file,
            args.base_url,
            args.model,
            args.num_examples,
            args.api_key,
            args.temperature,
            args.max_tokens,
            args.timeout,
            args.seed,
        )
        print(
            f"{args.output_file}: {res['generated']} generated, {res['already_done']} already done, "
            f"{res['failed']} failed"
        )
        return 0 if not res["failed"] else 1

    return run_cli(main, "ctclip-impressions")
