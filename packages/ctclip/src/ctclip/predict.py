"""``ctclip-predict``: zero-shot finding probabilities of raw CT volumes, one CSV row each.

Inputs: NIfTI files, DICOM series folders, folders of NIfTI files (searched recursively), or a
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
from pathlib import Path
from typing import Any

from ctclip.preprocess import find_volumes
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_csv, read_csv


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
