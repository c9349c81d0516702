"""`TrainingThroughput`: tokens/s and MFU of training, without the time the analyses spend measuring.

Lightning Fabric's `Throughput` computes the rates over a window of optimizer steps from the training time,
which here leaves out the measurements of checkpoints (`DynamicsCallback.seconds`), so that
`train/device/items_per_sec` (tokens/s per device) and `train/device/mfu` (on devices whose peak FLOP/s is
known) are training speed even at snapshot-dense steps. `train/device/wall_items_per_sec` is the wall-clock
figure beside them: tokens over the time since training started, analyses included. Also logged:
`train/time` (training seconds), `train/batches`, `train/samples` (windows) and `train/lengths` (tokens), as
Lightning's `ThroughputMonitor` does, every `trainer.log_every_n_steps` optimizer steps.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from typing_extensions import override

from dynascope.callbacks.dynamics import DynamicsCallback

# the dtype of the matrix products under each Trainer precision, for the device's peak FLOP/s
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                  "16-true": torch.float16, "64-true": torch.float64}
# dense 16-bit peaks of devices whose names Lightning's table does not match: an H200 calls itself "NVIDIA H200"
# (the table knows "h200 sxm1", at the sparse 2e15); its dense bf16 rate is the H100 SXM's
DENSE_16BIT_PEAKS = {"h200": 989.4e12}


def available_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s in `dtype`: Lightning's table, else ours for 16-bit types; None if unknown."""
    if device.type != "cuda":
        return get_available_flops(device, dtype)
    name = torch.cuda.get_device_name(device).lower()
    ours = next((v for k, v in DENSE_16BIT_PEAKS.items() if k in name), None)
    if ours is not None and dtype in (torch.bfloat16, torch.float16):
        return ours
    return get_available_flops(device, dtype)


def _analysis_seconds(trainer: L.Trainer) -> float:
    return sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, DynamicsCallback))


class TrainingThroughput(L.Callback):
    def __init__(self, window_size: int = 10):
        """Tokens/s and MFU of training, without the analyses' time.

        Args:
            window_size: Optimizer steps averaged in each logged figure.
        """
        self.window_size = window_size

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dtype = COMPUTE_DTYPES.get(str(trainer.precision), torch.float32)
        self.throughput = Throughput(available_flops=available_flops(trainer.strategy.root_device, dtype),
                                     world_size=trainer.world_size, window_size=self.window_size)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.throughput.reset()
        self.batches = self.samples = self.tokens = 0
        self.start = self.wall_start = time.perf_counter()
        self.left_out = _analysis_seconds(trainer)
        self.stepped = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the time of the work queued so far
        measured = _analysis_seconds(trainer)
        self.start += measured - self.left_out  # the measurements since the last batch are not training time
        self.left_out = measured
        now = time.perf_counter()
        self.batches += 1
        self.samples += batch[0].size(0)
        self.tokens += batch[0].numel()
        self.throughput.update(time=now - self.start, batches=self.batches, samples=self.samples,
                               lengths=self.tokens, flops=getattr(pl_module, "flops_per_batch", None))
        if trainer.global_step == self.stepped:  # a micro-batch under gradient accumulation: no step yet
            return
        self.stepped = trainer.global_step
        if trainer.is_global_zero and (trainer.global_step % trainer.log_every_n_steps == 0 or trainer.should_stop):
            metrics = {f"train/{k}": v for k, v in self.throughput.compute().items()}
            metrics["train/device/wall_items_per_sec"] = self.tokens / (now - self.wall_start)
            for logger in trainer.loggers:  # at the step Lightning logs this step's training loss at
                logger.log_metrics(metrics, step=trainer.global_step - 1)
