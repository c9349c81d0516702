"""Run records: the metrics rows training logged, the run summary and small per-step tables."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def update_summary(path: str | Path, values: dict[str, float]) -> dict:
    """Merge `values` into the JSON summary at `path` (written atomically); returns the whole summary."""
    path = Path(path)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary |= values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    tmp.replace(path)
    return summary


def append_table(directory: str | Path, key: str, step: int, columns: list[str], rows: list[list]) -> Path:
    """One JSON line per step in `directory/<key with / as __>.jsonl`."""
    path = Path(directory) / (key.replace("/", "__") + ".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "columns": columns, "rows": rows}) + "\n")
    return path
