"""The benchmark result format: one JSON object per line, printed and saved."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("BENCH_RESULTS", "bench-results/results.jsonl"))


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    unit: str
    baseline: float | None
    #: value / baseline for "higher is better", baseline / value otherwise:
    #: above 1 always means better than the baseline.
    ratio: float | None
    target: str = ""
    note: str = ""

    def line(self) -> str:
        data: dict[str, Any] = {k: v for k, v in asdict(self).items() if v != ""}
        for key in ("value", "baseline", "ratio"):
            if isinstance(data.get(key), float):
                data[key] = round(data[key], 3)
        return json.dumps(data)


def compare(
    name: str,
    value: float,
    baseline: float,
    unit: str,
    *,
    higher_is_better: bool = True,
    target: str = "",
    note: str = "",
) -> Result:
    ratio = value / baseline if higher_is_better else baseline / value
    return Result(name, value, unit, baseline, ratio, target, note)


class Recorder:
    def __init__(self, path: Path = RESULTS) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.emit_meta()

    def emit_meta(self) -> None:
        meta = {
            "name": "_machine",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }
        self._write(json.dumps(meta))

    def emit(self, result: Result) -> None:
        self._write(result.line())

    def _write(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
