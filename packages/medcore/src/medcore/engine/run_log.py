"""Run logging: a JSONL metrics log, a final JSON, and TensorBoard scalars, PR curves and figures.

Only the main process writes (``enabled=False`` on other ranks makes every call a no-op).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from medcore.io import atomic_write_json, json_default


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes ``metrics.jsonl`` (one JSON object per event) and TensorBoard events under ``tb/``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._want_tb = tensorboard
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def tb(self):
        """The TensorBoard SummaryWriter, created on first use."""
        if self._tb is None and self.enabled and self._want_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        return self._tb

    def log_jsonl(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"time": round(time.time(), 3), **{k: _finite_or_none(v) for k, v in record.items()}}
        with self.jsonl_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=json_default) + "\n")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and self.tb is not None:
                self.tb.add_scalar(key, value, step)
        self.log_jsonl({"event": "scalars", "step": step, **scalars})

    def log_pr_curve(self, tag: str, labels: Any, scores: Any, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_pr_curve(tag, labels, scores, step)

    def log_figure(self, tag: str, figure: Any, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_figure(tag, figure, step, close=False)

    def write_final(self, metrics: dict[str, Any], name: str = "metrics.json") -> Path | None:
        if not self.enabled:
            return None
        return atomic_write_json(self.run_dir / name, metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
