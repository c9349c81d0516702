"""The Pythia-style checkpoint schedule and the callbacks that write snapshots and resume checkpoints.

Snapshots (see `snapshots.py`) are what analyses read, online and offline. Resume checkpoints
(`RUN_DIR/checkpoints/`, Lightning's format with optimizer, loops, RNG and callback state) are
sparser and only serve `--ckpt_path last`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from dynascope.train.snapshots import write_snapshot


@dataclass(frozen=True)
class CheckpointSchedule:
    """Steps 0, 1, 2, 4, ..., up to `log_cap` (powers of two), then every `every` steps, plus the final step."""

    log_cap: int = 512
    every: int = 1000

    def is_due(self, step: int, max_steps: int | None = None) -> bool:
        if step == 0 or step == max_steps:
            return True
        if step <= self.log_cap and step & (step - 1) == 0:
            return True
        return step > self.log_cap and self.every > 0 and step % self.every == 0

    def steps(self, max_steps: int) -> list[int]:
        return [s for s in range(max_steps + 1) if self.is_due(s, max_steps)]


class OnSchedule(L.Callback):
    """Acts once at each scheduled step: step 0 before the first update, then after the updates that
    reach a scheduled step. A resumed run already acted at its current step before the checkpoint."""

    schedule: CheckpointSchedule
    _last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._maybe_act(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._maybe_act(trainer, pl_module)

    def _maybe_act(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.schedule.is_due(step, trainer.max_steps):
            return  # under gradient accumulation on_train_batch_end fires once per micro-batch
        self._last_step = step
        self.on_scheduled_step(trainer, pl_module, step)

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        raise NotImplementedError


class Snapshots(OnSchedule):
    """Writes a weights-only snapshot at every scheduled step, including step 0 before any update."""

    def __init__(self, log_cap: int = 512, every: int = 1000):
        self.schedule = CheckpointSchedule(log_cap, every)

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        # Collective under FSDP (gathers full weights), so every rank calls it; only rank 0 writes.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            meta = {"tokens_seen": pl_module.tokens_seen(step), "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "config_hash": pl_module.arch.hash()}
            write_snapshot(trainer.default_root_dir, step, weights, meta)


class ResumeCheckpoints(ModelCheckpoint):
    """Full Lightning checkpoints in RUN_DIR/checkpoints every `every_n_steps` steps, at the end of
    training, and on SIGTERM or SIGUSR1 (under SLURM, Lightning's own SIGUSR1 requeue handler wins)."""

    def __init__(self, every_n_steps: int = 1000):
        super().__init__(filename="step_{step:08d}", auto_insert_metric_name=False, every_n_train_steps=every_n_steps,
                         save_top_k=-1, save_last=True)
        self._signalled = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "_signalled", True))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self._signalled or trainer.received_sigterm:
            self._signalled = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
