"""``binensemble-train --devices 2 --device cpu``: two processes launched by the command itself."""

from __future__ import annotations

import json
from pathlib import Path

from binensemble.cli import train


def test_smoke_on_two_cpu_processes(tiny_data: Path, tmp_path: Path, tiny_args) -> None:
    run = tmp_path / "ddp"
    argv = ["--smoke", "--devices", "2", "--device", "cpu", "--set", "predict.tta=false"]
    code = train(tiny_args(*argv, "--data-dir", str(tiny_data), "--output-dir", str(run)))
    assert code == 0
    for name in ("metric", "baseline"):
        events = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        start = next(e for e in events if e["event"] == "start")
        assert start["world_size"] == 2
        assert (run / name / "model.pt").is_file()
    assert (run / "predictions" / "vote.csv").is_file()
