"""The output floor: every place a run's record goes is a `Sink` (metrics.jsonl, metrics.csv, metrics.parquet,
summary.json, tables/, the wandb run), driven by one `Recorder`. Importing this package registers every sink."""

from dynascope.outputs import files, parquet, wandb_run  # noqa: F401  (registers them)
from dynascope.outputs.base import SINKS, Destination, Sink, check_outputs
from dynascope.outputs.recorder import Recorder

__all__ = ["SINKS", "Destination", "Recorder", "Sink", "check_outputs"]
