"""Full resume checkpoints (Lightning's format: optimizer, loops, RNG and callback state), stopping
cleanly on a signal, and rewinding the run's records when a run resumes.

Checkpoints live in RUN_DIR/checkpoints/: `step_XXXXXXXX.ckpt` every `every_n_steps` steps, and
`last.ckpt`, the newest (a hard link to the newest step file, or a file of its own at the end of
training or on a signal). Every file is written to a temporary name and renamed (`AtomicCheckpointIO`),
so a save cut short leaves the previous checkpoints whole. `ResumeCheckpoints` is a Lightning
`Checkpoint`, which Lightning runs after every other callback: a checkpoint holds the step's snapshot
and analysis state.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.distributed import ReduceOp
from typing_extensions import override

from dynascope.callbacks.snapshots import Snapshots
from dynascope.core.errors import require
from dynascope.core.io import atomic_path
from dynascope.core.runfiles import RunFiles
from dynascope.outputs import Recorder

RANKED = (None, signal.SIGTERM, signal.SIGUSR1)  # what stops training, in the order of precedence


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing to a temporary file that is renamed over the target."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class ResumeCheckpoints(Checkpoint):
    def __init__(self, every_n_steps: int = 1000, at_snapshots: bool = False):
        """Full checkpoints for resuming, and a clean stop on SIGTERM or SIGUSR1 (Slurm's warning before a
        time limit, after which `dynascope fit` requeues the job).

        Args:
            every_n_steps: Period of the checkpoints in optimizer steps (0: only at the end and on a signal).
            at_snapshots: Also keep one at every snapshot step of the log-spaced part (1, 2, 4, ..., log_cap),
                where onsets fall early in training, so `dynascope zoom` can retrain any bracket there. Each holds
                the weights and AdamW's two moments: about 3 times a snapshot (1.5 GB at 124M, 22 MB for
                tiny-relu), 10 of them with the default log_cap of 512.
        """
        require(every_n_steps >= 0, "checkpoints.every_n_steps", every_n_steps, "must be 0 (none) or a positive period")
        self.every_n_steps, self.at_snapshots = every_n_steps, at_snapshots
        self.signalled: int | None = None  # the signal this rank received, if any
        self.stopped_by: int | None = None  # the signal that stopped training, once all ranks agreed
        self._seen_step = -1
        self._saved_step = -1
        self._previous_handler: Any = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.files = RunFiles(trainer.default_root_dir)
        self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signum  # only a flag: the checkpoint is saved at the end of the batch, on every rank

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # a micro-batch under gradient accumulation: nothing stepped
        self._seen_step = step
        stop = self._agreed_signal(trainer)
        if self.every_n_steps and step % self.every_n_steps == 0 or self._at_snapshot(trainer, step):
            self._save(trainer, self.files.checkpoint(step))
        elif stop:
            self._save(trainer, self.files.last_checkpoint)
        if stop:  # `dynascope fit` requeues a Slurm job (SIGUSR1) once the run has closed its files
            self.stopped_by = stop
            trainer.should_stop = True

    def _at_snapshot(self, trainer: L.Trainer, step: int) -> bool:
        """A log-spaced snapshot step, where `at_snapshots` keeps a checkpoint too."""
        snapshots = [cb for cb in trainer.callbacks if isinstance(cb, Snapshots)]
        return self.at_snapshots and bool(snapshots) and snapshots[0].schedule.log_spaced(step) and step > 0

    def _agreed_signal(self, trainer: L.Trainer) -> int | None:
        """The signal every rank stops for: one rank's signal stops them all (signals do not reach every rank
        at the same batch), and a requeue request (SIGUSR1) wins over SIGTERM."""
        signalled = self.signalled or (signal.SIGTERM if trainer.received_sigterm else None)
        code = torch.tensor(RANKED.index(signalled), device=trainer.strategy.root_device)
        return RANKED[int(trainer.strategy.reduce(code, reduce_op=ReduceOp.MAX))]

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer, self.files.last_checkpoint)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM reached another rank between batches: Lightning stops every rank there, still in step
        if isinstance(exception, SIGTERMException) and self._saved_step != trainer.global_step:
            self._save(trainer, self.files.last_checkpoint)
            self.stopped_by = signal.SIGTERM

    def _save(self, trainer: L.Trainer, path: Path) -> None:
        """Save on every rank (a collective under sharded strategies); `last.ckpt` then names the newest."""
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint: optimizer, loops, callbacks
        self._saved_step = trainer.global_step
        if trainer.is_global_zero and path != self.files.last_checkpoint:
            with atomic_path(self.files.last_checkpoint) as tmp:
                try:
                    os.link(path, tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(path, tmp)
        trainer.strategy.barrier("dynascope_checkpoint")
        rank_zero_info(f"dynascope: resume checkpoint at step {trainer.global_step}: {path}")


def requeue_slurm_job() -> None:
    """Put this Slurm job back in the queue; Slurm then ends the running one at once."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    rank_zero_info(f"dynascope: requeued Slurm job {job}" if result.returncode == 0 else
                   f"dynascope: scontrol requeue {job} failed: {result.stderr.strip()}")


class RewindOnResume(L.Callback):
    """A resumed run continues its records from the checkpoint's step: what was logged after it belongs
    to the part of the trajectory that was lost, and is logged again as it is replayed."""

    def __init__(self, recorder: Recorder | None):
        self.recorder = recorder  # rank 0's; None elsewhere

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and self.recorder is not None:
            self.recorder.rewind(trainer.global_step)
