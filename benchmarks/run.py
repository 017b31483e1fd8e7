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

from medcore.cli import format_table  # noqa: E402
from medcore.device import resolve_device  # noqa: E402
from medcore.io import atomic_write_json  # noqa: E402


def registry() -> dict[str, object]:
    import cases_metrics

    cases = dict(cases_metrics.CASES)
    for name in ("cases_ctclip", "cases_tasks", "cases_gpu"):
        module_path = HERE / f"{name}.py"
        if module_path.is_file():
            module = __import__(name)
            cases.update(module.CASES)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI-sized inputs")
    parser.add_argument("--cases", nargs="*", help="run only these cases")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cases = registry()
    selected = args.cases or list(cases)
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
            "pass": "PASS" if r.passed else "FAIL",
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
