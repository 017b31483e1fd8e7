"""``ctretrieval-search``: the most similar studies of an index for a query.

A query is an id of the index or a raw study (a DICOM folder or a NIfTI file) preprocessed as
the index's archive was (:func:`ctretrieval.predict.search`). The results are written as a CSV
and a JSON beside it, and printed.
"""

from __future__ import annotations

import argparse

import pandas as pd

from ctretrieval.index import Index
from ctretrieval.predict import search
from medcore.errors import DataError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table
from medcore.runtime.device import resolve_device


def main(args: argparse.Namespace) -> int:
    """``ctretrieval-search`` with parsed arguments (see :mod:`ctretrieval.cli`)."""
    for flag, value in (("--top-k", args.top_k), ("--knn-k", args.knn_k)):
        if value is not None and value < 1:
            raise DataError(flag, f"must be at least 1, got {value}")
    index = Index.read(args.index)
    query_id, findings, rows = search(
        index,
        args.query,
        args.top_k,
        resolve_device(args.device),
        args.checkpoint,
        threshold=args.threshold,
        knn_k=args.knn_k,
    )
    out = args.output or args.index.with_name(f"{args.index.stem}_search") / f"{query_id}.csv"
    atomic_write_csv(out, pd.DataFrame(rows))
    atomic_write_json(
        out.with_suffix(".json"), {"query": query_id, "query_findings": findings, "results": rows}
    )
    print(f"query {query_id} (findings: {', '.join(findings) or 'none known'})")
    print(format_table(rows, ["rank", "id", "similarity", "findings", "shared_findings"]))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
