"""The record's own files: metrics.jsonl (online), metrics.csv (offline), summary.json and tables/.

Every write is an upsert by (step, key), so a replayed or re-analysed step never appears twice, and every
rewrite is atomic (`dynascope.core.io`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dynascope.core.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from dynascope.core.records import CSV_INDEX, STEP_KEY, Table, read_csv, read_table
from dynascope.outputs.base import Destination, Sink


class JsonlMetrics(Sink):
    """metrics.jsonl: every logged row, each with `trainer/global_step`, one value per (step, key).

    Rows are appended. A key logged again at its step with the same value (a step's training and analysis
    rows both carry `tokens_seen`) is left out; with another value the old one is replaced and the file
    rewritten. Appending a row costs the same however long the file is: what was logged is remembered for
    the few newest steps (rows arrive in step order, give or take a step), and the file is read only for a
    step older than those (a resumed session's first step, say)."""

    name = "jsonl"
    REMEMBERED = 4

    def __init__(self, destination: Destination):
        super().__init__(destination)
        self.path = destination.files.metrics_jsonl
        self._recent: dict[int, dict[str, float]] = {}  # the newest steps logged in this session: their values

    def _logged_at(self, step: int) -> dict[str, float]:
        if step not in self._recent:
            older = not self._recent or step < min(self._recent)  # else a new step: nothing logged at it yet
            self._recent[step] = {k: v for r in read_jsonl(self.path, "metrics log") if r[STEP_KEY] == step
                                  for k, v in r.items() if k != STEP_KEY} if older else {}
            if len(self._recent) > self.REMEMBERED:
                del self._recent[min(self._recent)]
        return self._recent[step]

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        logged = self._logged_at(step)
        row = {k: float(v) for k, v in metrics.items() if k != "label" and logged.get(k) != float(v)}
        if not row:
            return
        if row.keys() & logged.keys():  # a value replaced: rewrite without the old ones
            kept = [{k: v for k, v in r.items() if r[STEP_KEY] != step or k == STEP_KEY or k not in row}
                    for r in read_jsonl(self.path, "metrics log")]
            write_jsonl(self.path, [r for r in kept if len(r) > 1] + [{STEP_KEY: step, **row}])
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({STEP_KEY: step, **row}) + "\n")
        logged |= row

    def rewind(self, step: int) -> None:
        write_jsonl(self.path, [r for r in read_jsonl(self.path, "metrics log") if r[STEP_KEY] <= step])
        self._recent = {}


class CsvMetrics(Sink):
    """metrics.csv: one row per step, columns step, tokens_seen, label, then the keys (merged into the rows
    already there)."""

    name = "csv"

    def __init__(self, destination: Destination):
        super().__init__(destination)
        self.path = destination.files.metrics_csv
        self.rows = {int(r["step"]): r for r in read_csv(self.path)} if self.path.exists() else {}

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        self.rows[step] = {**self.rows.get(step, {}), **metrics, "step": step}
        write_csv(self.path, [self.rows[s] for s in sorted(self.rows)])

    def rewind(self, step: int) -> None:
        self.rows = {s: r for s, r in self.rows.items() if s <= step}
        write_csv(self.path, [self.rows[s] for s in sorted(self.rows)])


class SummaryFile(Sink):
    """summary.json: the summary events, merged as they change."""

    name = "summary"

    def log_summary(self, summary: dict[str, float | None]) -> None:
        update_summary(self.destination.files.summary, summary)


class TableFiles(Sink):
    """tables/<key with / as __>.jsonl: one JSON line per step, in step order."""

    name = "tables"

    def log_table(self, key: str, table: Table, step: int) -> None:
        upsert_table(self.destination.files.table(key), step, table)

    def rewind(self, step: int) -> None:
        for path in self.destination.files.table_files().values():
            write_jsonl(path, [e for e in read_table(path) if e["step"] <= step])


def write_csv(path: str | Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r} - set(CSV_INDEX))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_INDEX, *keys])
        writer.writeheader()
        writer.writerows(rows)


def update_summary(path: str | Path, values: dict[str, float | None]) -> dict:
    """Merge `values` into the JSON summary at `path` (written atomically); returns the whole summary."""
    summary = read_json(path, "run summary") if Path(path).exists() else {}
    summary |= values
    write_json(path, summary)
    return summary


def upsert_table(path: Path, step: int, table: Table) -> None:
    """A table file with `step`'s entry replaced (or added), in step order."""
    entries = {e["step"]: e for e in read_jsonl(path, "table")}
    entries[step] = {"step": step, "columns": table.columns, "rows": table.rows}
    write_jsonl(path, [entries[s] for s in sorted(entries)])
