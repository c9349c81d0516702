"""Offline replay: the analyses measured over saved checkpoints, in step order, as training measured them.

A `Replay` iterates over `Checkpoint`s and yields one `CheckpointRecord` per checkpoint; whoever iterates
writes the records (the `dynascope analyze` driver hands them to a recorder). `run_replay` builds the
replay of a run directory's snapshots with the run's probe windows, corpus counts, tokenizer and analysis
options; `hub.py` builds one over Hugging Face checkpoints. A checkpoint that cannot be used (unreadable,
altered, not matching the config) is named and skipped.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dynascope.analysis.base import Analysis, AnalysisContext, build
from dynascope.analysis.measure import measure, stage_count
from dynascope.analysis.onsets import history_from_tables, summarize
from dynascope.analysis.view import ModelShape, ModelView, TransformerView
from dynascope.core.data import EOS, Corpus, DataConfig, load_tokenizer, prepare_corpus
from dynascope.core.errors import DynascopeError
from dynascope.core.io import read_yaml
from dynascope.core.model import ModelConfig
from dynascope.core.probe import load_probe
from dynascope.core.records import CheckpointRecord
from dynascope.core.runfiles import RunFiles
from dynascope.core.settings import trajectory_hash
from dynascope.core.snapshots import load_snapshot, read_manifest


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tokens_seen: float
    label: str
    record: bool = True  # False: measured only to carry state into the next checkpoint (a shard's first)


def shard_of(checkpoints: list[Checkpoint], shard: tuple[int, int] | None) -> list[Checkpoint]:
    """Shard `index` of `count`: a contiguous run of the checkpoints, preceded by the one before it (not
    recorded), so keys that compare consecutive checkpoints come out as in one process."""
    if shard is None:
        return checkpoints
    index, count = shard
    if not 0 <= index < count:
        raise DynascopeError(f"--shard {index}/{count}: give I/N with 0 <= I < N")
    bounds = [round(i * len(checkpoints) / count) for i in range(count + 1)]
    first, last = bounds[index], bounds[index + 1]
    before = [replace(checkpoints[first - 1], record=False)] if 0 < first < last else []
    return before + checkpoints[first:last]


class Replay:
    """Analyses `names` replayed over `checkpoints` in order: iterating yields a `CheckpointRecord` per
    checkpoint to record. `load_view(label, device)` gives a checkpoint's view; the next checkpoint loads on a
    background thread while one is measured. The `final` checkpoint's unembedding is the reference of distances
    to the end of training (loaded first and, when it is among the checkpoints, reused at its turn). Checkpoints
    that cannot be loaded are named on stderr and listed in `skipped`; `shape` is the model's, once one
    checkpoint was loaded."""

    def __init__(self, checkpoints: list[Checkpoint], load_view: Callable[[str, str], ModelView], final: str,
                 probe: torch.Tensor, names: str | list[str], context: AnalysisContext, batch_size: int,
                 options: dict[str, dict] | None = None):
        self.checkpoints, self.load_view, self.final, self.probe = checkpoints, load_view, final, probe
        self.names, self.context, self.batch_size, self.options = names, context, batch_size, options
        self.skipped: list[str] = []
        self.shape: ModelShape | None = None

    def records(self, device: str = "cpu") -> Iterator[CheckpointRecord]:
        """Measure every checkpoint in order, the next one loading on a background thread meanwhile."""
        cached: dict[str, ModelView] = {}
        try:
            cached[self.final] = self.load_view(self.final, device)
            self.context.final_output_embeddings = cached[self.final].output_embeddings.detach().clone()
        except DynascopeError as e:
            tqdm.write(f"dynascope: no distances to the final checkpoint: {e}", file=sys.stderr)
        analyses: list[Analysis] = []
        with ThreadPoolExecutor(max_workers=1) as loader:
            ahead = iter(self.checkpoints)

            def prefetch() -> Future | None:
                ckpt = next(ahead, None)
                if ckpt is None:
                    return None
                if ckpt.label in cached:  # the final checkpoint, loaded already
                    return _done(cached.pop(ckpt.label))
                return loader.submit(self.load_view, ckpt.label, device)

            pending = prefetch()
            for ckpt in tqdm(self.checkpoints, desc="analysing checkpoints", unit="ckpt"):
                loading, pending = pending, prefetch()
                try:
                    view = loading.result()
                except DynascopeError as e:
                    tqdm.write(f"dynascope: skipped: {e}", file=sys.stderr)
                    self.skipped.append(ckpt.label)
                    continue
                view.model.to(device)
                if not analyses:
                    self.shape = view.shape
                    analyses = build(self.names, view.shape, self.context, self.options, device)
                with tqdm(total=stage_count(analyses, len(self.probe), self.batch_size), leave=False,
                          desc=f"checkpoint {ckpt.label}", disable=None) as bar:
                    record = measure(view, analyses, self.probe, ckpt.step, ckpt.tokens_seen, self.batch_size,
                                     ckpt.label, progress=lambda stage: (bar.set_postfix_str(stage, refresh=False),
                                                                         bar.update()))
                if ckpt.record:
                    yield record


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def replay_events(analyses: list[Analysis], tables: dict[str, list[dict]]) -> dict[str, float | None]:
    """The summary events of the analyses, rebuilt from their onsets tables ({table key: its entries}), as one
    pass measuring every checkpoint in step order reports them."""
    summary: dict[str, float | None] = {}
    for a in analyses:
        history = history_from_tables(tables.get(f"{a.name}/onsets", []))
        for event in a.events():
            if event.name in history:
                summary |= summarize(event, history[event.name])
    return summary


def run_options(run_dir: str | Path, options: dict[str, dict] | None = None) -> dict[str, dict] | None:
    """The analysis options of a replay: the given ones, else the run's own (its config's dynamics.options)."""
    if options is not None:
        return options
    return (read_yaml(RunFiles(run_dir).config, "run config").get("dynamics") or {}).get("options")


def run_context(run_dir: str | Path, config: dict) -> AnalysisContext:
    """What a run's analyses read besides the model: its corpus counts, tokenizer and end-of-document id."""
    run = RunFiles(run_dir)
    tokenizer = load_tokenizer(run.tokenizer) if run.tokenizer.exists() else None
    if run.counts.exists():
        counts = np.load(run.counts)
    else:  # runs from before counts were kept in the run directory: rebuild (cached) from the config
        counts = Corpus(prepare_corpus(DataConfig.from_config(config))).counts()
    eos = (config.get("data") or {}).get("eos_token") or EOS
    return AnalysisContext(torch.from_numpy(counts), tokenizer, tokenizer.token_to_id(eos) if tokenizer else None)


def run_replay(run_dir: str | Path, analyses: str | list[str] = "all", steps: list[int] | None = None,
               batch_size: int | None = None, options: dict[str, dict] | None = None,
               shard: tuple[int, int] | None = None) -> Replay:
    """The replay of a run's snapshots and its zooms' (all, or `steps`) with the analysis options and probe batch
    size of its config; with `shard` (index, count), of that shard's part only. A zoom's step that the run has too
    is the run's (they are byte-identical); the zooms' own steps are labelled `zoom <step>`."""
    run = RunFiles(run_dir)
    if not run.config.is_file():
        raise DynascopeError(f"{run.root} is not a dynascope run directory (no config.yaml)")
    config = read_yaml(run.config, "run config")
    arch = ModelConfig(**config["model"]["arch"])
    probe = load_probe(run.probe)
    manifest = read_manifest(run.root)
    if not manifest:
        raise DynascopeError(f"{run.manifest} lists no snapshots")
    sources = {s: (run, row) for s, row in manifest.items()}  # where each step's snapshot lies
    for zoom in run.zooms():
        for s, row in read_manifest(zoom.root).items():
            sources.setdefault(s, (zoom, row))
    missing = sorted(set(steps or []) - set(sources))
    if missing:
        raise DynascopeError(f"--steps {missing} have no snapshot in {run.snapshots} or its zooms (have "
                             f"{sorted(sources)})")
    trajectories: dict[Path, str] = {}

    def load_view(label: str, device: str) -> ModelView:
        step = int(label.split()[-1])
        source, row = sources[step]
        if source.root not in trajectories:
            trajectories[source.root] = trajectory_hash(read_yaml(source.config, "run config"))
        if row.get("config_hash") not in (None, arch.hash()):
            raise DynascopeError(f"snapshot {source.snapshot(step)} was written by another model config")
        if row.get("trajectory_hash") not in (None, trajectories[source.root]):
            raise DynascopeError(f"snapshot {source.snapshot(step)} belongs to another trajectory than "
                                 f"{source.config} (the manifest's trajectory_hash differs)")
        weights = load_snapshot(source.root, step, device=device)
        return TransformerView.from_snapshot(arch, weights, str(source.snapshot(step)))

    checkpoints = [Checkpoint(s, float(sources[s][1].get("tokens_seen", math.nan)),
                              str(s) if sources[s][0] is run else f"zoom {s}") for s in sorted(steps or sources)]
    return Replay(shard_of(checkpoints, shard), load_view, str(max(manifest)), probe, analyses,
                  run_context(run.root, config), batch_size or (config.get("dynamics") or {}).get("batch_size", 16),
                  run_options(run.root, options))
