"""`TrainingThroughput`: Lightning's throughput monitor over training time alone.

Lightning's `ThroughputMonitor` leaves validation out of the training time; this subclass also leaves
out the time the analyses spend measuring checkpoints (`DynamicsCallback.seconds`), so the
`train/device/items_per_sec` (tokens/s) and `train/device/mfu` it logs are training speed even at
snapshot-dense steps. `train/device/wall_items_per_sec` is the wall-clock figure beside it: tokens
over the time since training started, analyses included.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from dynascope.callbacks.dynamics import DynamicsCallback


def _windows(batch: tuple[torch.Tensor, ...]) -> int:
    return batch[0].size(0)


def _tokens(batch: tuple[torch.Tensor, ...]) -> int:
    return batch[0].numel()


def _analysis_seconds(trainer: L.Trainer) -> float:
    return sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, DynamicsCallback))


class TrainingThroughput(ThroughputMonitor):
    def __init__(self, window_size: int = 10):
        """Tokens/s and MFU of training, without the analyses' time.

        Args:
            window_size: Optimizer steps averaged in each logged figure.
        """
        super().__init__(batch_size_fn=_windows, length_fn=_tokens, window_size=window_size)

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._wall_start, self._left_out = time.perf_counter(), _analysis_seconds(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        measured = _analysis_seconds(trainer)  # measurements run in callbacks before this one's hook
        if RunningStage.TRAINING in self._t0s:
            self._t0s[RunningStage.TRAINING] += measured - self._left_out  # as Lightning does for validation
        self._left_out = measured
        super().on_train_batch_end(trainer, *args)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        super()._compute(trainer, iter_num)
        if trainer._logger_connector.should_update_logs:
            wall = time.perf_counter() - self._wall_start
            trainer._logger_connector.log_metrics(
                {"train/device/wall_items_per_sec": self._lengths[RunningStage.TRAINING] / wall})
