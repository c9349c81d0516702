"""`DynamicsCallback`: runs the registered analyses on the probe set at every snapshot step.

It knows nothing about any phenomenon. At each step of the checkpoint schedule (including step 0,
before the first update) it switches to eval mode, measures the checkpoint on every rank's shard
of the probe set (`measure`, a collective), restores train mode, and on rank 0 hands the record to
the run's `Recorder`, which writes it to every logger (metrics.jsonl, wandb), summary.json and
tables/. Analyses that watch training get forward hooks on the training passes and each optimizer
step's loss and gradient norm. While it measures, the training progress bar names the stage; the
time it spends (`seconds`) is left out of the training throughput (callbacks/throughput.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger

from dynascope.analysis import build, resolve
from dynascope.analysis.base import Analysis, AnalysisContext, Table, check_options
from dynascope.analysis.measure import measure
from dynascope.analysis.probe import PROBE_FILE, load_probe, sample_probe, save_probe, shard
from dynascope.analysis.records import Recorder, Sink
from dynascope.analysis.view import TransformerView
from dynascope.callbacks.snapshots import OnSchedule, Snapshots
from dynascope.errors import require
from dynascope.train.loggers import RunWandbLogger
from dynascope.train.schedule import CheckpointSchedule


class LoggerSink(Sink):
    """A Lightning logger as a record sink; wandb also gets the summary and the tables (one growing table
    per key)."""

    def __init__(self, logger: Logger):
        self.logger = logger

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics({k: v for k, v in metrics.items() if k != "label"}, step=step)

    def log_summary(self, summary: dict[str, float | None]) -> None:
        if isinstance(self.logger, WandbLogger):
            self.logger.experiment.summary.update(summary)

    def log_table(self, key: str, table: Table, step: int) -> None:
        if isinstance(self.logger, RunWandbLogger):
            self.logger.log_growing_table(key, table.columns, table.rows, step)


@contextlib.contextmanager
def _shown_in(trainer: L.Trainer, step: int) -> Iterator[Callable[[str], None]]:
    """A function that shows a measurement's stage in the training progress bar, which would otherwise
    sit still; the bar's own text comes back afterwards."""
    bar, text = trainer.progress_bar_callback, f"analysing step {step}"
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled and bar._train_progress_bar is not None:
        yield lambda stage: bar.train_progress_bar.set_postfix_str(f"{text}: {stage}")  # reset at the next batch
    elif isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None \
            and getattr(bar, "train_progress_bar_id", None) is not None:
        own = bar.train_progress_bar.description
        yield lambda stage: (bar.progress.update(bar.train_progress_bar_id, description=f"{own} · {text}: {stage}"),
                             bar.refresh())
        bar.progress.update(bar.train_progress_bar_id, description=own)
    else:
        yield lambda stage: None


class DynamicsCallback(OnSchedule):
    def __init__(self, analyses: str | list[str] = "all", probe_windows: int = 64, probe_seed: int = 0,
                 batch_size: int = 16, options: dict[str, dict] | None = None):
        """Measure analyses on a fixed probe set at every snapshot step.

        Args:
            analyses: Registered analysis names (comma-separated or a list), or all.
            probe_windows: Validation windows of context_length tokens in the probe set.
            probe_seed: Seed of the probe windows' positions.
            batch_size: Probe windows per forward pass.
            options: Per-analysis constructor arguments, e.g. {regions: {write_layers: [0, 3]}}.
        """
        self.names = resolve(analyses)
        self.options = options or {}
        check_options(self.options)
        require(probe_windows >= 1, "dynamics.probe_windows", probe_windows, "must be a positive number of windows")
        require(batch_size >= 1, "dynamics.batch_size", batch_size, "must be a positive integer")
        self.probe_windows, self.probe_seed, self.batch_size = probe_windows, probe_seed, batch_size
        self.analyses: list[Analysis] = []
        self._saved: dict[str, dict[str, Any]] = {}
        self._train_hooks: list = []
        self._global_zero = True
        self.seconds = 0.0  # spent measuring in this session (training throughput leaves it out)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        snapshots = [cb for cb in trainer.callbacks if isinstance(cb, Snapshots)]
        self.schedule = snapshots[0].schedule if snapshots else CheckpointSchedule()
        run_dir = Path(trainer.default_root_dir)
        corpus = trainer.datamodule.corpus
        if (run_dir / PROBE_FILE).exists():
            probe = load_probe(run_dir / PROBE_FILE)
        else:  # seeded, so every rank draws the same windows; rank 0 keeps them for offline replay
            probe = sample_probe(corpus.tokens("val"), self.probe_windows, pl_module.arch.context_length,
                                 self.probe_seed)
            if trainer.is_global_zero:
                save_probe(run_dir / PROBE_FILE, probe)
        self.probe, self.first_window = shard(probe, trainer.global_rank, trainer.world_size, self.batch_size)
        context = AnalysisContext(torch.from_numpy(corpus.counts()), corpus.tokenizer(), corpus.meta["eos_id"])
        if trainer.is_global_zero:  # the offline runner reads the same tokenizer and corpus counts
            context.tokenizer.save(str(run_dir / "tokenizer.json"))
            np.save(run_dir / "counts.npy", context.counts.numpy())
            self.recorder = Recorder(run_dir, [LoggerSink(logger) for logger in trainer.loggers])
        self.view = TransformerView(pl_module.model)
        self.analyses = build(self.names, self.view.shape, context, self.options, trainer.strategy.root_device)
        self._global_zero = trainer.is_global_zero
        self._restore()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training-stream hooks see the training forward pass (grad enabled), not the no-grad probe passes.
        self._train_hooks = [
            self.view.add_hook(name, lambda act, a=a, name=name: a.observe_training(name, act)
                               if torch.is_grad_enabled() else None)
            for a in self.analyses for name in a.training_hook_names()]
        self._stepped = trainer.global_step
        if trainer.ckpt_path is not None and trainer.is_global_zero:  # resumed: tables continue from its step
            self.recorder.rewind(trainer.global_step)
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._train_hooks:
            handle.remove()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step != self._stepped:  # once per optimizer step, not per micro-batch
            self._stepped = trainer.global_step
            metrics = trainer.callback_metrics
            for a in self.analyses:
                a.observe_step(float(metrics["train/loss"]), float(metrics["train/grad_norm"]))
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        with _shown_in(trainer, step) as progress:
            record = measure(self.view, self.analyses, self.probe, step, float(pl_module.tokens_seen(step)),
                             self.batch_size, first_window=self.first_window, progress=progress)
        pl_module.train(was_training)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        record.values["dynamics/seconds"] = seconds
        record.values |= {f"dynamics/seconds/{name}": s for name, s in record.seconds.items()}
        if trainer.is_global_zero:
            self.recorder.write(record)

    def state_dict(self) -> dict[str, Any]:
        return {"analyses": {a.name: a.checkpoint_state() for a in self.analyses}, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict["analyses"]
        self._last_step = state_dict["last_step"]
        self._restore()

    def _restore(self) -> None:
        """Loaded state reaches the analyses whichever of setup and load_state_dict runs last."""
        for a in self.analyses:
            if a.name in self._saved:
                a.load_checkpoint_state(self._saved.pop(a.name), with_states=self._global_zero)
