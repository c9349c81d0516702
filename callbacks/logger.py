"""`RecordLogger`: Lightning's logger interface over the run's `Recorder`, so that what Lightning and its
callbacks log (the training loss, learning rates, throughput) reaches every sink of the run, as the analyses'
records do. `dynascope fit` gives each Trainer one; on ranks other than 0 it has no recorder and writes
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from dynascope.outputs import Recorder


class RecordLogger(Logger):
    def __init__(self, recorder: Recorder | None, run_dir: Path):
        super().__init__()
        self.recorder, self.run_dir = recorder, run_dir

    @property
    @override
    def name(self) -> str:
        return "dynascope"

    @property
    @override
    def version(self) -> str:
        return ""

    @property
    @override
    def save_dir(self) -> str:
        """The run directory: where Lightning's config callback writes config.yaml."""
        return str(self.run_dir)

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.recorder is not None:  # Lightning's `epoch` is left out: the batch stream is indexed by step
            self.recorder.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: the sinks got the whole resolved config when the run started."""
