"""`DynamicsCallback`: runs the registered analyses on the probe set at every snapshot step.

It knows nothing about any phenomenon: at each step of the checkpoint schedule (including step 0,
before the first update) it switches to eval mode, runs one no-grad forward pass per probe batch on
every rank's shard, lets each analysis update and compute (a collective), logs on rank 0 to every
attached logger at `trainer/global_step` with `tokens_seen`, and restores train mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from dynascope.analysis import build, resolve
from dynascope.analysis.base import measure
from dynascope.analysis.probe import PROBE_FILE, load_probe, sample_probe, save_probe, shard
from dynascope.analysis.records import append_table, update_summary
from dynascope.analysis.view import OwnModelView
from dynascope.train.checkpoints import CheckpointSchedule, OnSchedule, Snapshots


class DynamicsCallback(OnSchedule):
    def __init__(self, analyses: str | list[str] = "all", probe_windows: int = 64, probe_seed: int = 0,
                 batch_size: int = 16, options: dict[str, dict] | None = None):
        """`options`: per-analysis constructor arguments, e.g. `{regions: {write_layers: [0, 3]}}`."""
        self.names = resolve(analyses)
        self.options = options or {}
        self.probe_windows, self.probe_seed, self.batch_size = probe_windows, probe_seed, batch_size
        self.analyses = []
        self._carry: dict[str, dict[str, Any]] = {}
        self._last_step = -1
        self._summary: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        snapshots = [cb for cb in trainer.callbacks if isinstance(cb, Snapshots)]
        self.schedule = snapshots[0].schedule if snapshots else CheckpointSchedule()
        path = Path(trainer.default_root_dir) / PROBE_FILE
        if path.exists():
            probe = load_probe(path)
        else:  # seeded, so every rank draws the same windows; rank 0 keeps them for offline replay
            val = trainer.datamodule.corpus.tokens("val")
            probe = sample_probe(val, self.probe_windows, pl_module.arch.context_length, self.probe_seed)
            if trainer.is_global_zero:
                save_probe(path, probe)
        self.probe = shard(probe, trainer.global_rank, trainer.world_size)
        self.view = OwnModelView(pl_module.model)
        corpus = trainer.datamodule.corpus
        self.view.tokenizer, self.view.counts = corpus.tokenizer(), corpus.counts()
        if trainer.is_global_zero:  # the offline runner reads the same tokenizer and corpus counts
            self.view.tokenizer.save(str(Path(trainer.default_root_dir) / "tokenizer.json"))
            np.save(Path(trainer.default_root_dir) / "counts.npy", self.view.counts)
        self.analyses = build(self.names, self.view, self.options)
        for a in self.analyses:
            a.load_carry_state(self._carry.get(a.name, {}))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Analyses that stream training activations get hooks on the training forward pass (grad
        # enabled), which the probe passes (no grad) do not feed.
        self._train_hooks = [
            self.view.add_hook(name, lambda act, a=a, name=name: a.observe_training(name, act)
                               if torch.is_grad_enabled() else None)
            for a in self.analyses if getattr(a, "train_batches", False) for name in a.hook_names()]
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._train_hooks:
            handle.remove()

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        for a in self.analyses:
            a.step = step
        values = measure(self.view, self.analyses, self.probe.to(pl_module.device), self.batch_size)
        pl_module.train(was_training)
        values |= {"dynamics/seconds": time.perf_counter() - start, "tokens_seen": float(pl_module.tokens_seen(step))}
        if trainer.is_global_zero:
            self._record(trainer, step, values)

    def _record(self, trainer: L.Trainer, step: int, values: dict[str, float]) -> None:
        run_dir = Path(trainer.default_root_dir)
        summary = {k: v for a in self.analyses for k, v in a.summary().items()}
        for key in sorted(summary.keys() | self._summary.keys()):
            if key.endswith("_step") and summary.get(key) != self._summary.get(key):  # appeared or was revised
                value = summary.get(key)
                print(f"dynascope: step {step}: {key} = {'none (revised away)' if value is None else value}")
        self._summary = summary
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)
        if summary:
            update_summary(run_dir / "summary.json", summary)
        for a in self.analyses:
            for key, (columns, rows) in a.tables().items():
                append_table(run_dir / "tables", key, step, columns, rows)
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_table(key, columns=columns, data=rows, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"carry": {a.name: a.carry_state() for a in self.analyses}, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._carry = state_dict["carry"]
        self._last_step = state_dict["last_step"]
        for a in self.analyses:
            a.load_carry_state(self._carry.get(a.name, {}))


