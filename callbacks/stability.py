"""`LossSpikes`: training-loss spikes as events, as OLMo-core's stability monitor flags them.

A step's loss is a spike when it lies more than `threshold` standard deviations above the mean of the
`window` steps before it (once `min_steps` of them are there). Each spike is logged at its step as
`train/loss_spike_z` (its z-score), so wandb and metrics.jsonl hold one point per event; the count so far is
`train/loss_spikes`, logged with it. The window travels in resume checkpoints (`state_dict`), so a resumed run
flags exactly the steps the uninterrupted one would. `dynascope fit` adds it to every run.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dynascope.core.errors import require


class LossSpikes(Callback):
    def __init__(self, window: int = 128, threshold: float = 6.0, min_steps: int = 16):
        require(window >= 2, "loss spike window", window, "must be at least 2 steps")
        require(2 <= min_steps <= window, "loss spike min_steps", min_steps, f"must lie between 2 and {window}")
        require(threshold > 0, "loss spike threshold", threshold, "must be positive")
        self.window, self.threshold, self.min_steps = window, threshold, min_steps
        self.losses: deque[float] = deque(maxlen=window)
        self.spikes = 0
        self._seen_step = -1

    def judge(self, loss: float) -> float | None:
        """The z-score of `loss` against the window if it is a spike, else None; then `loss` joins the window."""
        z = None
        if len(self.losses) >= self.min_steps and math.isfinite(loss):
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / (len(self.losses) - 1))
            if std > 0 and (loss - mean) / std > self.threshold:
                z = (loss - mean) / std
        if math.isfinite(loss):
            self.losses.append(loss)
        return z

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._seen_step:  # once per optimizer step, not per micro-batch
            return
        self._seen_step = trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        z = None if loss is None else self.judge(float(loss))
        if z is not None:
            self.spikes += 1
            pl_module.log_dict({"train/loss_spike_z": z, "train/loss_spikes": float(self.spikes)})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "spikes": self.spikes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = deque(state_dict["losses"], maxlen=self.window)
        self.spikes = state_dict["spikes"]
