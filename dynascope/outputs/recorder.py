"""The one recorder: it writes a run's records to every sink, online (a fit) and offline (a replay, a sync)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynascope.core.records import CheckpointRecord, Table
from dynascope.outputs.base import Destination, Sink, open_sinks


class Recorder:
    """Writes plain metrics rows (training) and checkpoint records (measurements) to `sinks`, and echoes each
    summary event that appears or is revised."""

    def __init__(self, sinks: list[Sink], echo: Callable[[str], None] = print):
        self.sinks, self.echo = sinks, echo
        self._events: dict[str, float | None] = {}  # this session's last summary, to report changes

    @classmethod
    def open(cls, destination: Destination, outputs: dict[str, dict], echo: Callable[[str], None] = print
             ) -> Recorder:
        """A recorder over the sinks named in `outputs` ({name: options}) for `destination`."""
        return cls(open_sinks(destination, outputs), echo)

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def write(self, record: CheckpointRecord) -> None:
        self.log_metrics({"tokens_seen": record.tokens_seen, "label": record.label, **record.values}, record.step)
        for key in sorted(record.summary):
            value = record.summary[key]
            if key.endswith("_step") and self._events.get(key) != value:  # appeared or was revised
                self.echo(f"dynascope: step {record.step}: {key} = "
                          f"{'none (revised away)' if value is None else value}")
        self._events |= record.summary
        if record.summary:
            for sink in self.sinks:
                sink.log_summary(record.summary)
        for key, table in record.tables.items():
            self.log_table(key, table, record.step)

    def log_table(self, key: str, table: Table, step: int) -> None:
        for sink in self.sinks:
            sink.log_table(key, table, step)

    def log_summary(self, summary: dict[str, float | None]) -> None:
        for sink in self.sinks:
            sink.log_summary(summary)

    def rewind(self, step: int) -> None:
        for sink in self.sinks:
            sink.rewind(step)

    def finalize(self, pictures: dict[str, Path] | None = None, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.finalize(pictures, failed)
