"""Run records: the one recorder that writes measurement records everywhere, and their readers.

A `Recorder` writes each `Record` to its sinks (online: the trainer's loggers, among them
RUN_DIR/metrics.jsonl and wandb; offline: `metrics.csv`), merges its summary events into
`summary.json`, and stores its tables under `tables/`, one JSON line per step. Every write is an
upsert by (step, key): writing a step again leaves one value per key, so a replayed or re-analysed
step never appears twice.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from dynascope.analysis.base import Table
from dynascope.analysis.measure import Record
from dynascope.errors import DynascopeError
from dynascope.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl

STEP_KEY = "trainer/global_step"
CSV_INDEX = ("step", "tokens_seen", "label")


class Sink:
    """Where records go besides the run directory's summary.json and tables/."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_summary(self, summary: dict[str, float | None]) -> None:
        pass

    def log_table(self, key: str, table: Table, step: int) -> None:
        pass


class CsvTable(Sink):
    """The offline metrics table: one row per step, columns step, tokens_seen, label, then the keys."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = {int(r["step"]): r for r in read_csv(self.path)} if self.path.exists() else {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows[step] = {**self.rows.get(step, {}), **metrics, "step": step}
        write_csv(self.path, [self.rows[s] for s in sorted(self.rows)])


class Recorder:
    def __init__(self, directory: str | Path, sinks: Sequence[Sink], echo: Callable[[str], None] = print):
        self.directory, self.sinks, self.echo = Path(directory), list(sinks), echo
        self._events: dict[str, float | None] = {}  # this session's last summary, to report changes

    def write(self, record: Record) -> None:
        row = {"tokens_seen": record.tokens_seen, "label": record.label, **record.values}
        for sink in self.sinks:
            sink.log_metrics(row, record.step)
        for key in sorted(record.summary):
            value = record.summary[key]
            if key.endswith("_step") and self._events.get(key) != value:  # appeared or was revised
                self.echo(f"dynascope: step {record.step}: {key} = "
                          f"{'none (revised away)' if value is None else value}")
        self._events |= record.summary
        if record.summary:
            update_summary(self.directory / "summary.json", record.summary)
            for sink in self.sinks:
                sink.log_summary(record.summary)
        for key, table in record.tables.items():
            upsert_table(self.directory / "tables", key, record.step, table)
            for sink in self.sinks:
                sink.log_table(key, table, record.step)

    def rewind(self, step: int) -> None:
        """Forget what was recorded after `step` in the tables (sinks rewind themselves)."""
        rewind_tables(self.directory / "tables", step)


def rewind_tables(directory: str | Path, step: int) -> None:
    """Drop every table entry after `step` (a resumed run measures those steps again)."""
    for path in sorted(Path(directory).glob("*.jsonl")):
        write_jsonl(path, [e for e in read_table(path) if e["step"] <= step])


def update_summary(path: str | Path, values: dict[str, float | None]) -> dict:
    """Merge `values` into the JSON summary at `path` (written atomically); returns the whole summary."""
    summary = read_json(path, "run summary") if Path(path).exists() else {}
    summary |= values
    write_json(path, summary)
    return summary


def table_path(directory: str | Path, key: str) -> Path:
    return Path(directory) / (key.replace("/", "__") + ".jsonl")


def upsert_table(directory: str | Path, key: str, step: int, table: Table) -> Path:
    """One JSON line per step in `directory/<key with / as __>.jsonl`, in step order; a step written
    again replaces its line."""
    path = table_path(directory, key)
    entries = {e["step"]: e for e in read_jsonl(path, "table")}
    entries[step] = {"step": step, "columns": table.columns, "rows": table.rows}
    write_jsonl(path, [entries[s] for s in sorted(entries)])
    return path


def read_table(path: str | Path) -> list[dict]:
    """The entries of a table file, one per step, in step order."""
    return sorted(read_jsonl(path, "table"), key=lambda e: e["step"])


def write_csv(path: str | Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r} - set(CSV_INDEX))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_INDEX, *keys])
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics table: floats, NaN where a key was not measured, `label` as text."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: (v if k == "label" else float(v) if v != "" else math.nan) for k, v in r.items()} for r in rows]
    except (UnicodeDecodeError, ValueError, csv.Error) as e:
        raise DynascopeError(f"metrics table {path} is not a valid CSV ({e}); delete it and run `dynascope analyze` "
                             "again") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows training logged to RUN_DIR/metrics.jsonl, each with `trainer/global_step`."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl", "metrics log")

