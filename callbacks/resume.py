"""Full resume checkpoints: Lightning's format with optimizer, loops, RNG and callback state.

They live in RUN_DIR/checkpoints/, are sparser than snapshots and only serve `--ckpt_path last`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumeCheckpoints(ModelCheckpoint):
    """Full Lightning checkpoints in RUN_DIR/checkpoints every `every_n_steps` steps, at the end of
    training, and on SIGTERM or SIGUSR1 (under SLURM, Lightning's own SIGUSR1 requeue handler wins)."""

    def __init__(self, every_n_steps: int = 1000):
        """Full checkpoints for resuming.

        Args:
            every_n_steps: Period of the checkpoints in optimizer steps.
        """
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
