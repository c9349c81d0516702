"""`DynamicsCallback`: runs the registered analyses on the probe set at every snapshot step.

It knows nothing about any phenomenon. At each step of the checkpoint schedule (including step 0,
before the first update) it switches to eval mode, measures the checkpoint on every rank's shard
of the probe set (`measure`, a collective), restores train mode, and on rank 0 hands the record to
the run's `Recorder` (set by `dynascope fit`), which writes it to every sink. Non-finite weights (a diverged
run that trains on) are not measured: their keys are absent. Analyses that watch
training get forward hooks on the training passes and each optimizer step's loss and gradient norm.
While it measures, a progress bar of its own shows the stage (with the Trainer's bars enabled); the
time it spends (`seconds`) is left out of the training throughput (callbacks/throughput.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from tqdm import tqdm
from typing_extensions import override

from dynascope.analysis import build, resolve
from dynascope.analysis.base import Analysis, AnalysisContext, check_options
from dynascope.analysis.measure import measure, stage_count
from dynascope.analysis.view import TransformerView
from dynascope.callbacks.snapshots import OnSchedule, Snapshots
from dynascope.core.errors import require
from dynascope.core.probe import load_probe, sample_probe, save_probe, shard
from dynascope.core.records import MEASURED_KEY
from dynascope.core.runfiles import RunFiles
from dynascope.core.schedule import CheckpointSchedule
from dynascope.outputs import Recorder


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
        self.recorder: Recorder | None = None  # rank 0's, set by `dynascope fit`

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        snapshots = [cb for cb in trainer.callbacks if isinstance(cb, Snapshots)]
        self.schedule = snapshots[0].schedule if snapshots else CheckpointSchedule()
        run = RunFiles(trainer.default_root_dir)
        corpus = trainer.datamodule.corpus
        if run.probe.exists():
            probe = load_probe(run.probe)
        else:  # seeded, so every rank draws the same windows; rank 0 keeps them for offline replay
            probe = sample_probe(corpus.tokens("val"), self.probe_windows, pl_module.arch.context_length,
                                 self.probe_seed)
            if trainer.is_global_zero:
                save_probe(run.probe, probe)
        self.probe, self.first_window = shard(probe, trainer.global_rank, trainer.world_size, self.batch_size)
        context = AnalysisContext(torch.from_numpy(corpus.counts()), corpus.tokenizer(), corpus.meta["eos_id"])
        if trainer.is_global_zero:  # the offline runner reads the same tokenizer and corpus counts
            context.tokenizer.save(str(run.tokenizer))
            np.save(run.counts, context.counts.numpy())
        self.view = TransformerView(pl_module.model)
        self.analyses = build(self.names, self.view.shape, context, self.options, trainer.strategy.root_device)
        self._global_zero = trainer.is_global_zero
        self._restore()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training-stream hooks see the training forward pass (grad enabled), not the no-grad probe passes.
        self._train_hooks = [
            self.view.add_hook(name, lambda act, a=a, name=name: a.observe_training(name, act)
                               if torch.is_grad_enabled() else None)
            for a in self.analyses for name in a.training_hook_names()]
        self._stepped = trainer.global_step
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._train_hooks:
            handle.remove()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step != self._stepped:  # once per optimizer step, not per micro-batch
            self._stepped = trainer.global_step
            metrics = trainer.callback_metrics
            for a in self.analyses:
                a.observe_step(float(metrics["train/loss"]), float(metrics["train/grad_norm"]))
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        finite = bool(torch.stack([p.isfinite().all() for p in pl_module.parameters()]).all())  # one host sync
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            return  # a diverged run trained on (--stop_on_divergence false): NaN weights yield no "findings"
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        shown = trainer.is_global_zero and trainer.progress_bar_callback is not None \
            and trainer.progress_bar_callback.is_enabled
        # on the training bar's stream (stdout), each stage shown as it starts: a long measurement is never silent
        with tqdm(total=stage_count(self.analyses, len(self.probe), self.batch_size), desc=f"analysing step {step}",
                  leave=False, disable=not shown, file=sys.stdout) as bar:
            record = measure(self.view, self.analyses, self.probe, step, float(pl_module.tokens_seen(step)),
                             self.batch_size, first_window=self.first_window,
                             progress=lambda stage: (bar.set_postfix_str(stage), bar.update()))
        pl_module.train(was_training)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        record.values[MEASURED_KEY] = seconds
        record.values |= {f"dynamics/seconds/{name}": s for name, s in record.seconds.items()}
        if self.recorder is not None:
            self.recorder.write(record)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"analyses": {a.name: a.checkpoint_state() for a in self.analyses}, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict["analyses"]
        self._last_step = state_dict["last_step"]
        self._restore()

    def _restore(self) -> None:
        """Loaded state reaches the analyses whichever of setup and load_state_dict runs last."""
        for a in self.analyses:
            if a.name in self._saved:
                a.load_checkpoint_state(self._saved.pop(a.name), with_states=self._global_zero)
