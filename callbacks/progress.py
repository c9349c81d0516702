"""`StepProgressBar`: Lightning's TQDM bar, counting optimizer steps against `trainer.max_steps`.

The batch stream is one endless epoch, so Lightning's own bar has no total and its epoch counter says
nothing; this one reads `training: 120/300 steps` from the first step of a run (or of a resumed one) to its
last. `dynascope fit` adds it unless the Trainer's progress bars are off or a config declares a bar of its own.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class StepProgressBar(TQDMProgressBar):
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    @override
    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a resumed run restarts its epoch mid-way: Lightning skips on_train_epoch_start

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)  # Lightning's reset to the epoch's batches
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.set_description("training", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = bar.last_print_n = trainer.global_step  # as tqdm's `initial`: no rate from earlier steps
        bar.refresh()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if trainer.global_step > bar.n:  # an optimizer step (not a micro-batch of one)
            bar.update(trainer.global_step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
