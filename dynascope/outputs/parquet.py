"""metrics.parquet: the metrics table in Parquet (through pyarrow), one row per step, for dataframe tools.

Enable it with `--outputs '{parquet: {}}'` (beside the other outputs, e.g. `{wandb: {}, parquet: {}}`) in
`dynascope fit` and `dynascope analyze`. Columns are `step`, then every key in sorted order (`label` as text,
the keys as float64: NaN where a key was measured as NaN, null where a step did not measure it); rows merge
into the file already there.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dynascope.core.io import atomic_path
from dynascope.outputs.base import Destination, Sink


class ParquetMetrics(Sink):
    name = "parquet"

    def __init__(self, destination: Destination):
        super().__init__(destination)
        self.path = destination.files.metrics_parquet
        rows = pq.read_table(self.path).to_pylist() if self.path.exists() else []
        self.rows = {int(r["step"]): {k: v for k, v in r.items() if v is not None} for r in rows}

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        self.rows[step] = {**self.rows.get(step, {}), **metrics, "step": step}
        self._write()

    def rewind(self, step: int) -> None:
        self.rows = {s: r for s, r in self.rows.items() if s <= step}
        self._write()

    def _write(self) -> None:
        keys = sorted({k for r in self.rows.values() for k in r} - {"step", "label"})
        steps = sorted(self.rows)
        columns = {"step": pa.array(steps, pa.int64())}
        if any("label" in r for r in self.rows.values()):
            columns["label"] = pa.array([str(self.rows[s].get("label", "")) for s in steps], pa.string())
        for key in keys:
            values = [self.rows[s].get(key) for s in steps]
            columns[key] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        with atomic_path(self.path) as tmp:
            pq.write_table(pa.table(columns), tmp)
