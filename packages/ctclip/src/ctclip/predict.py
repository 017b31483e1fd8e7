"""Zero-shot prediction: finding probabilities from a softmax over each finding's (positive,
negative) prompt pair, and the ``ctclip-predict`` command (raw CT volumes -> one CSV row each).

Shapes: ``n`` volumes, ``f`` findings, ``e`` embedding dimension.

``ctclip-predict`` inputs: NIfTI files, DICOM series folders, folders of NIfTI files (searched recursively), or a
CSV of paths (column ``path``, relative to the CSV's folder; an optional ``name`` column names
the rows). Each volume is preprocessed on the fly as ``ctclip-preprocess`` stores it and
predicted by :meth:`ctclip.api.CTClipModel.predict` (the code path of ``ctclip.load``).

Output: ``--output`` CSV with ``volume`` (the file or folder stem, or the CSV's name),
``source`` (the path) and one column per finding (P(present)); ``--embeddings`` a safetensors
file of the L2-normalised volume embeddings keyed by volume name. An input that cannot be read
is named (``skipped <name>: <why>``), left out and counted; the others are predicted and the
command exits 0, as ``ctclip-preprocess`` does. Nothing is written when no input can be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ctclip.findings import FINDINGS, prompt_pairs
from ctclip.model import CTCLIP
from ctclip.preprocess import find_volumes
from ctclip.text import Tokenizer
from medcore.engine import inference
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_csv, read_csv
from medcore.runtime.device import AmpPolicy, autocast


@torch.no_grad()
def prompt_features(
    model: CTCLIP,
    tokenizer: Tokenizer,
    findings: Sequence[str] = FINDINGS,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised text features of every finding's prompts: ``[f, 2, e]`` (positive, negative)."""
    texts = [t for pair in prompt_pairs(list(findings)) for t in pair]
    feats = model.encode_text(tokenizer(texts).to(device)).float()
    return feats.view(len(findings), 2, -1)


def zero_shot_probs(
    volume_features: torch.Tensor, prompt_feats: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """P(finding present) ``[n, f]`` from volume features ``[n, e]`` and prompt features ``[f, 2, e]``."""
    logits = logit_scale * torch.einsum(
        "ne,fke->nfk", volume_features.float(), prompt_feats.float()
    )
    return logits.softmax(dim=-1)[..., 0]


def predict(
    model: CTCLIP,
    dataset: Dataset,
    tokenizer: Tokenizer,
    device: torch.device,
    amp: AmpPolicy | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    findings: Sequence[str] = FINDINGS,
    shard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities ``[n, f]``, labels ``[n, f]``) of the volumes of ``dataset`` (in order).

    The volumes go through :func:`medcore.engine.inference.predict` (DataLoader workers: ``num_workers``,
    None for the device's default; pinned memory on CUDA; under DDP with ``shard`` each rank
    embeds its shard and every rank gets all of them; ``shard=False`` for one rank alone).
    """
    amp = amp or AmpPolicy(False, torch.float32, False)
    was_training = model.training
    model.eval()
    with autocast(device, amp):
        prompts = prompt_features(model, tokenizer, findings, device).cpu()
    model.train(was_training)

    def forward(m: CTCLIP, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"features": m.encode_volume(batch["volume"]).float(), "labels": batch["labels"]}

    out = inference.predict(
        model,
        dataset,
        forward,
        inference.PredictOptions(device, amp, batch_size, num_workers, shard, desc="zero-shot"),
    )
    probs = zero_shot_probs(out["features"], prompts, model.scale().detach().float().cpu())
    return probs, out["labels"]


def _from_csv(path: Path) -> dict[str, Path]:
    frame = read_csv(path, required=["path"])
    if frame.empty:
        raise DataError(path, "lists no volumes")
    blank = frame["path"].isna() | (frame["path"].astype(str).str.strip() == "")
    if blank.any():
        raise DataError(path, f"row {int(blank.idxmax()) + 2}: blank path")
    paths = [path.parent / str(p).strip() for p in frame["path"]]
    if "name" in frame.columns:
        return _unique(list(zip(frame["name"].astype(str), paths, strict=True)), path)
    from ctclip.api import volume_label

    return _unique([(volume_label(p, i), p) for i, p in enumerate(paths)], path)


def _unique(pairs: list[tuple[str, Path]], where: Any) -> dict[str, Path]:
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        first = [str(p) for n, p in pairs if n == repeated[0]]
        raise DataError(
            where,
            f"volume name {repeated[0]!r} is given by {len(first)} inputs ({', '.join(first[:3])}): "
            "names must differ (a CSV with a name column names them)",
        )
    return dict(pairs)


def gather_inputs(inputs: list[Path]) -> dict[str, Path]:
    """Volume name -> path of the command's inputs (see the module docstring)."""
    from ctclip.api import volume_label

    pairs: list[tuple[str, Path]] = []
    for item in inputs:
        if item.suffix.lower() == ".csv" and item.is_file():
            pairs += list(_from_csv(item).items())
        elif item.is_dir() and (files := find_volumes(item)):  # NIfTI files, recursively
            pairs += [(volume_label(p, 0), p) for p in files]
        else:  # a NIfTI file or a DICOM folder; what cannot be read is skipped later, named
            pairs.append((volume_label(item, 0), item))
    return _unique(pairs, "inputs")


def main(args: argparse.Namespace) -> int:
    """ctclip-predict: the CSV of finding probabilities (and the embeddings) of the inputs."""
    from ctclip.api import load

    for flag, path, suffix in (
        ("--output", args.output, ".csv"),
        ("--embeddings", args.embeddings, ".safetensors"),
    ):
        if path is not None and path.suffix.lower() != suffix:
            raise UserError(flag, f"{path}: expected a {suffix} file name")
    if args.hu_source == "metadata" and not args.metadata_path:
        raise UserError("--hu-source", "metadata needs the metadata CSV (--metadata-path)")
    volumes = gather_inputs(args.inputs)
    model = load(args.model, args.device)
    findings = model.check_findings(args.findings, what="--findings")
    print(f"{len(volumes)} volumes, {len(findings)} findings, {model}", file=sys.stderr)
    result = model.predict(
        {name: str(path) for name, path in volumes.items()},
        findings,
        hu_source=args.hu_source,
        metadata=args.metadata_path or None,
        skip_unreadable=True,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    if not result.names:
        raise DataError("inputs", f"none of the {len(volumes)} volumes could be read")
    table = result.probabilities.reset_index()
    table.insert(1, "source", [str(volumes[name]) for name in result.names])
    atomic_write_csv(args.output, table)
    if args.embeddings is not None:
        from medcore.weights.checkpoint import export_safetensors

        export_safetensors(
            dict(zip(result.names, result.embeddings, strict=True)),
            args.embeddings,
            metadata={
                "kind": "ctclip.volume_embeddings",
                "model": str(args.model),
                "normalized": "l2",
            },
        )
    print(
        f"{args.output}: {len(result.names)} predicted, {len(result.skipped)} skipped"
        + (f"; embeddings in {args.embeddings}" if args.embeddings is not None else "")
    )
    return 0
