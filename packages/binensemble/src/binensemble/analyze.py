"""``binensemble-analyze``: how two or more models' probability files agree, how accurate each
and their soft vote are, and where they complement each other (:func:`binensemble.ensemble.analyse`):
``analysis.json``, ``disagreements.csv`` and ``analysis.png`` in the output folder."""

from __future__ import annotations

import argparse

from binensemble.data import read_labels
from binensemble.ensemble import (
    align,
    analyse,
    check_rule,
    check_weights,
    disagreement_frame,
    plot_analysis,
    read_probs,
    resolve_targets,
    rule_message,
)
from medcore.errors import UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.report.tables import format_table


def main(args: argparse.Namespace) -> int:
    if len(args.probs) < 2:
        raise UserError("binensemble-analyze", "needs two or more probability files")
    names = args.names or [p.name.removesuffix(".csv").removesuffix("_probs") for p in args.probs]
    if len(names) != len(args.probs) or len(set(names)) != len(names):
        raise UserError("--names", f"needs {len(args.probs)} distinct names, one per file")
    files = align([read_probs(p) for p in args.probs])
    labels = (
        None if args.labels is None else read_labels(args.labels, num_classes=len(files[0].classes))
    )
    targets = resolve_targets(files, labels)
    probs = [f.probs for f in files]
    check_weights(args.weights, len(files))
    report = analyse(names, probs, targets, args.weights)
    report["rule"] = check_rule(report)
    out = args.output_dir
    atomic_write_json(out / "analysis.json", report)
    atomic_write_csv(
        out / "disagreements.csv",
        disagreement_frame(files[0].ids, names, probs, targets, args.weights),
    )
    plot_analysis(names, probs, targets, report, out / "analysis.png")
    print(format_table(report["models"]))
    print()
    print(format_table(report["pairs"]))
    print(rule_message(report["rule"], f"these {len(files)} files"))
    print(f"\nreport: {out / 'analysis.json'}, {out / 'disagreements.csv'}, {out / 'analysis.png'}")
    return 0
