"""Run the benchmarks: ``uv run nox -s bench`` (add ``-- --quick`` for CI-sized inputs).

Prints one row per measurement (case, measured, reference, ratio, target, pass/fail) and writes
``benchmarks/results/latest.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import Row, machine  # noqa: E402

from medcore.io import atomic_write_json, atomic_write_text  # noqa: E402
from medcore.report.tables import format_table, markdown_table  # noqa: E402
from medcore.runtime.device import resolve_device  # noqa: E402

ORDER = (
    "overhead",
    "ctclip_preprocess",
    "ctclip_hdf5",
    "ctclip_memory",
    "memory_full",
    "retrieval",
    "augment3d",
    "inference",
    "knn",
    "gpu_amp",
    "loader",
)


def registry() -> dict[str, object]:
    """Every ``CASES`` entry of the ``cases_*.py`` modules, in the issue's order."""
    cases: dict[str, object] = {}
    for module_path in sorted(HERE.glob("cases_*.py")):
        cases.update(__import__(module_path.stem).CASES)
    return {
        name: cases[name]
        for name in sorted(
            cases, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n)
        )
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized inputs")
    parser.add_argument("--cases", nargs="*", help="run only these cases")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument(
        "--update-md",
        action="store_true",
        help="also write the table into BENCHMARKS.md (between its results markers)",
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cases = registry()
    selected = args.cases or list(cases)
    unknown = [name for name in selected if name not in cases]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    rows: list[Row] = []
    timings = {}
    for name in selected:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            rows.extend(cases[name](device, args.quick))
        except Exception as exc:  # a broken case is reported as a failed row, the rest still run
            traceback.print_exc()
            rows.append(
                Row(name, "error", "-", float("nan"), "-", False, f"{type(exc).__name__}: {exc}")
            )
        timings[name] = round(time.perf_counter() - start, 1)
    table = [
        {
            "case": r.case,
            "measured": r.measured,
            "reference": r.reference,
            "ratio": f"{r.ratio:.2f}",
            "target": r.target,
            "pass": {True: "PASS", False: "FAIL", None: "-"}[r.passed],
            "note": r.note,
        }
        for r in rows
    ]
    print()
    print(format_table(table))
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "device": str(device),
        "machine": machine(),
        "case_seconds": timings,
        "rows": [r.as_dict() for r in rows],
    }
    atomic_write_json(args.output, result)
    print(f"\nwritten {args.output}")
    if args.update_md:
        update_markdown(HERE.parent / "BENCHMARKS.md", table, result)
        print(f"updated {HERE.parent / 'BENCHMARKS.md'}")
    return 0


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_markdown(path: Path, table: list[dict], result: dict) -> None:
    """Replace the block between the results markers of ``path`` with this run's table."""
    m = result["machine"]
    head = (
        f"Run {result['date']}{' with --quick' if result['quick'] else ''} on {result['device']}: "
        f"{m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
        f"Python {m['python']}. Case wall times (s): "
        + ", ".join(f"{k} {v}" for k, v in result["case_seconds"].items())
        + f"; total {sum(result['case_seconds'].values()):.0f} s."
    )
    block = f"{START}\n{head}\n\n{markdown_table(table)}\n{END}"
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"error: {path}: no {START} ... {END} block to update")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    atomic_write_text(path, before + block + after)


if __name__ == "__main__":
    sys.exit(main())
