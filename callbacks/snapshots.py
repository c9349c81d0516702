"""Callbacks that act on the checkpoint schedule, and the one that writes weights-only snapshots.

Snapshots (files and manifest: `dynascope.core.snapshots`) are what analyses read, online and
offline. The analysis callback (`dynamics.py`) fires on the same steps, so every logged point can be
recomputed offline from its snapshot.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from typing_extensions import override

from dynascope.core.errors import require
from dynascope.core.schedule import CheckpointSchedule
from dynascope.core.snapshots import write_snapshot


class OnSchedule(L.Callback):
    """Acts once at each scheduled step: step 0 before the first update, then after the updates that
    reach a scheduled step. A resumed run already acted at its current step before the checkpoint."""

    schedule: CheckpointSchedule
    _last_step = -1

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._maybe_act(trainer, pl_module)

    @override
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

    def __init__(self, log_cap: int = 512, every: int = 1000, wandb_artifacts: bool = False,
                 at: list[int] | None = None):
        """Pythia's schedule: steps 0, 1, 2, 4, ..., log_cap, then every `every` steps, and the final step.

        Args:
            log_cap: Last power-of-two step of the log-spaced part.
            every: Period in steps after log_cap (0: none).
            wandb_artifacts: Also log each snapshot to the wandb run, as a version of one model artifact
                with the alias stepN (4 bytes per parameter each: 7 MB for tiny-relu, 0.5 GB for gpt2-124m).
            at: Exactly these steps (and the final one) instead of the schedule: a zoom's dense steps.
        """
        require(log_cap >= 0, "snapshots.log_cap", log_cap, "must be 0 or more")
        require(every >= 0, "snapshots.every", every, "must be 0 (no periodic snapshots) or a positive period")
        self.schedule = CheckpointSchedule(log_cap, every, tuple(at) if at is not None else None)
        self.wandb_artifacts = wandb_artifacts
        self.trajectory_hash: str | None = None  # of the run's trajectory settings, set by `dynascope fit`

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        # Collective under FSDP (gathers full weights), so every rank calls it; only rank 0 writes.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            meta = {"tokens_seen": pl_module.tokens_seen(step), "lr": trainer.optimizers[0].param_groups[0]["lr"],
                    "config_hash": pl_module.arch.hash(), "trajectory_hash": self.trajectory_hash}
            path = write_snapshot(trainer.default_root_dir, step, weights, meta)
            if self.wandb_artifacts:
                _log_artifact(path, step)


def _log_artifact(path: Path, step: int) -> None:
    """The snapshot as a version of the run's model artifact, in this process's wandb run (the run's wandb
    output), if it has one."""
    import wandb

    if wandb.run is not None:
        artifact = wandb.Artifact(f"snapshots-{wandb.run.id}", type="model", metadata={"step": step})
        artifact.add_file(str(path))
        wandb.run.log_artifact(artifact, aliases=[f"step{step}"])
