"""What a measurement of a checkpoint records, and the readers of the record files (`runfiles.py` names them).

A `CheckpointRecord` is everything measured at one checkpoint: values, tables and summary events of every
analysis. The recorder and its sinks (`dynascope.outputs`) write records; `RunHistory` reads a run's
record back, for the pages and the notebook: its rows by step, its tables, summary and config.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dynascope.core.errors import DynascopeError
from dynascope.core.io import read_json, read_jsonl, read_yaml
from dynascope.core.runfiles import RecordFiles, RunFiles

STEP_KEY = "trainer/global_step"
MEASURED_KEY = "dynamics/seconds"  # what a measurement took: every row of a measurement online holds it
DIVERGED_KEY = "train/diverged_step"  # the summary's first step with a non-finite training loss
CSV_INDEX = ("step", "tokens_seen", "label")
LAYER = re.compile(r"^(.+)/L(\d+)$")  # a per-layer key: metric, layer


class Table:
    """A small table logged at one checkpoint (e.g. the outlier dimensions, a median curve). A plain class, not a
    dataclass: torchmetrics walks (and copies) every dataclass and list an analysis's compute() returns."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: list[str], rows: list[list]):
        self.columns, self.rows = columns, rows

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and (self.columns, self.rows) == (other.columns, other.rows)

    def __repr__(self) -> str:
        return f"Table({self.columns}, {len(self.rows)} rows)"


@dataclass
class CheckpointRecord:
    """Everything measured at one checkpoint: values, tables and summary events of every analysis."""

    step: int
    tokens_seen: float = math.nan
    label: str = ""  # the checkpoint's name offline (e.g. a Hugging Face directory); the step otherwise
    values: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    summary: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each analysis's time (its updates and compute)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows training logged to RUN_DIR/metrics.jsonl, each with `trainer/global_step`."""
    return read_jsonl(RunFiles(run_dir).metrics_jsonl, "metrics log")


def read_table(path: str | Path) -> list[dict]:
    """The entries of a table file, one per step, in step order."""
    return sorted(read_jsonl(path, "table"), key=lambda e: e["step"])


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics table: floats, NaN where a key was not measured, `label` as text."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: (v if k == "label" else float(v) if v != "" else math.nan) for k, v in r.items()} for r in rows]
    except (UnicodeDecodeError, ValueError, csv.Error) as e:
        raise DynascopeError(f"metrics table {path} is not a valid CSV ({e}); delete it and run `dynascope analyze` "
                             "again") from None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class RunHistory:
    """A run's record as the pages draw it: one row per measured step (`step`, `tokens_seen`, the keys), the
    directory of its tables, its summary events and config (None for an `analyze --hf` output directory), and
    every row training logged (metrics.jsonl; none for an `analyze --hf` output directory)."""

    name: str
    rows: list[dict]
    root: RecordFiles  # the directory read (where its pages go: plots/, report/)
    files: RecordFiles  # where its tables (and the offline summary) are: root, or root/analysis
    summary: dict
    config: dict | None
    logged: list[dict]

    @classmethod
    def load(cls, directory: str | Path) -> RunHistory:
        """The measurement rows logged online (with the training-stream keys only they have) merged with the offline
        table of `dynascope analyze` (with the keys only it has), in a run directory or an `analyze --hf` output
        directory."""
        run = RunFiles(directory)
        logged = read_metrics(run.root)
        rows = {r[STEP_KEY]: dict(r, step=r[STEP_KEY]) for r in logged if MEASURED_KEY in r}
        out = run.analysis if run.analysis.metrics_csv.exists() or rows else run
        if out.metrics_csv.exists():
            for r in read_csv(out.metrics_csv):
                rows[int(r["step"])] = rows.get(int(r["step"]), {}) | {k: v for k, v in r.items()
                                                                       if v == v or k == "label"}
        if not rows:
            raise DynascopeError(f"{run.root} has no analysis rows: run `dynascope analyze {run.root}` first")
        files = out if out.tables.exists() else run
        summary = {}
        for path in (run.summary, files.summary):  # online, then offline
            summary |= read_json(path, "run summary") if path.exists() else {}
        config = read_yaml(run.config, "run config") if run.config.exists() else None
        return cls(run.root.resolve().name, [rows[s] for s in sorted(rows)], run, files, summary, config, logged)

    @property
    def n_layers(self) -> int:
        """Layers of the per-layer keys (`.../L{l}`)."""
        return 1 + max((int(m[2]) for r in self.rows for k in r if (m := LAYER.match(k))), default=0)

    def series(self, key: str) -> list[tuple[dict, float]]:
        """(row, value) of each row where `key` has a finite value."""
        return [(r, r[key]) for r in self.rows if _finite(r.get(key))]

    def table(self, key: str) -> list[dict]:
        path = self.files.table(key)
        return read_table(path) if path.exists() else []

    def last(self, key: str) -> float:
        return self.rows[-1].get(key, math.nan) if self.rows else math.nan

    def row_at(self, step: float | None) -> dict | None:
        return next((r for r in self.rows if step is not None and r["step"] == step), None)
