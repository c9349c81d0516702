"""Offline replay: the analyses measured over saved checkpoints, in step order, as training measured them.

A `Source` lists checkpoints in step order and loads them (`run_source`: a run directory's snapshots and its
zooms'; `hub.hf_source`: Hugging Face checkpoints). A `Replay` measures a source's checkpoints (all, a shard
of them, or those not recorded yet: `pending`) and yields one `CheckpointRecord` per checkpoint, with each
checkpoint's integrity print (`integrity.py`); whoever iterates writes them (the `dynascope analyze`
driver). `run_replay` builds the replay of a run directory with the run's probe windows, corpus counts,
tokenizer and analysis options; `hub.hf_replay` one over Hugging Face checkpoints. A checkpoint that cannot
be used (unreadable, altered, not matching the config) is named and skipped.
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
from dynascope.analysis.integrity import Print, weights_print
from dynascope.analysis.measure import measure, stage_count
from dynascope.analysis.onsets import history_from_tables, summarize
from dynascope.analysis.view import ModelShape, ModelView, TransformerView
from dynascope.core.data import EOS, load_tokenizer
from dynascope.core.errors import DynascopeError
from dynascope.core.io import read_yaml
from dynascope.core.model import ModelConfig
from dynascope.core.probe import load_probe
from dynascope.core.records import CheckpointRecord
from dynascope.core.rundir import in_use
from dynascope.core.runfiles import RunFiles
from dynascope.core.settings import trajectory_hash
from dynascope.core.snapshots import load_snapshot, load_snapshot_tensor, read_manifest


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tokens_seen: float
    label: str
    record: bool = True  # False: measured only to carry state into the next checkpoint (a shard's first)


def pending(checkpoints: list[Checkpoint], shard: tuple[int, int] | None = None,
            done: frozenset[int] | set[int] = frozenset()) -> list[Checkpoint]:
    """The checkpoints to measure: all, or shard `index` of `count` (a contiguous run of them), less the steps
    `done` (recorded already). Each run of them is preceded by the checkpoint before it, measured but not
    recorded, so that keys comparing consecutive checkpoints come out as in one pass over all of them."""
    lo, hi = 0, len(checkpoints)
    if shard is not None:
        index, count = shard
        if not 0 <= index < count:
            raise DynascopeError(f"--shard {index}/{count}: give I/N with 0 <= I < N")
        lo, hi = round(index * len(checkpoints) / count), round((index + 1) * len(checkpoints) / count)
    chosen = [i for i in range(lo, hi) if checkpoints[i].step not in done]
    out: list[Checkpoint] = []
    for i in chosen:
        if i > 0 and (not out or out[-1] is not checkpoints[i - 1]):
            out.append(replace(checkpoints[i - 1], record=False))
        out.append(checkpoints[i])
    return out


@dataclass
class Source:
    """Checkpoints in step order and how to load them: `load_view(label, device)`, and the unembedding of the
    last one (`final`) alone through `final_embeddings()` where that is cheaper than loading the model."""

    checkpoints: list[Checkpoint]
    load_view: Callable[[str, str], ModelView]
    final: str
    final_embeddings: Callable[[], torch.Tensor] | None = None
    unfinished: str = ""  # why the last checkpoint is not the final one (a run still training), if it is not

    def final_output_embeddings(self) -> torch.Tensor:
        if self.unfinished:
            raise DynascopeError(self.unfinished)
        if self.final_embeddings is not None:
            return self.final_embeddings()
        return self.load_view(self.final, "cpu").output_embeddings.detach().clone()  # the model is freed here


class Replay:
    """Analyses `names` replayed over a source's checkpoints in order (shard `shard` of them, less the steps
    `done`): iterating yields a `CheckpointRecord` per checkpoint to record, and leaves its weights' fingerprint
    and sketch (`integrity.Print`) in `prints` under its step. One model is in memory at a time, plus the next,
    loading (and being fingerprinted) on a background thread; the final checkpoint's unembedding, the reference
    of distances to the end of training, is all that is kept of it until its turn. Checkpoints that cannot be
    loaded are named on stderr and listed in `skipped`; `shape` is the model's, once one checkpoint was loaded."""

    def __init__(self, source: Source, probe: torch.Tensor, names: str | list[str], context: AnalysisContext,
                 batch_size: int, options: dict[str, dict] | None = None, shard: tuple[int, int] | None = None,
                 done: frozenset[int] | set[int] = frozenset()):
        self.source, self.probe, self.names, self.context = source, probe, names, context
        self.batch_size, self.options = batch_size, options
        self.checkpoints = pending(source.checkpoints, shard, done)
        self.skipped: list[str] = []
        self.shape: ModelShape | None = None
        self.prints: dict[int, Print] = {}

    def _load(self, ckpt: Checkpoint, device: str) -> tuple[ModelView, Print | None]:
        view = self.source.load_view(ckpt.label, device)
        return view, weights_print(ckpt.label, ckpt.step, view.model.state_dict()) if ckpt.record else None

    def records(self, device: str = "cpu") -> Iterator[CheckpointRecord]:
        """Measure every checkpoint in order, the next one loading on a background thread meanwhile."""
        if not self.checkpoints:
            return
        try:
            self.context.final_output_embeddings = self.source.final_output_embeddings()
        except DynascopeError as e:
            tqdm.write(f"dynascope: no distances to the final checkpoint: {e}", file=sys.stderr)
        analyses: list[Analysis] = []
        with ThreadPoolExecutor(max_workers=1) as loader:
            ahead = iter(self.checkpoints)

            def prefetch() -> Future | None:
                ckpt = next(ahead, None)
                return None if ckpt is None else loader.submit(self._load, ckpt, device)

            upcoming = prefetch()
            for ckpt in tqdm(self.checkpoints, desc="analysing checkpoints", unit="ckpt"):
                loading, upcoming = upcoming, prefetch()
                try:
                    view, fingerprint = loading.result()
                except DynascopeError as e:
                    tqdm.write(f"dynascope: skipped: {e}", file=sys.stderr)
                    self.skipped.append(ckpt.label)
                    continue
                del loading  # the future would keep the model alive until the next checkpoint
                view.model.to(device)
                if not analyses:
                    self.shape = view.shape
                    analyses = build(self.names, view.shape, self.context, self.options, device)
                with tqdm(total=stage_count(analyses, len(self.probe), self.batch_size), leave=False,
                          desc=f"checkpoint {ckpt.label}") as bar:
                    record = measure(view, analyses, self.probe, ckpt.step, ckpt.tokens_seen, self.batch_size,
                                     ckpt.label, progress=lambda stage: (bar.set_postfix_str(stage), bar.update()))
                del view
                if ckpt.record:
                    self.prints[ckpt.step] = fingerprint
                    yield record


def replay_events(analyses: list[Analysis], tables: dict[str, list[dict]],
                  left_out: set[int] | frozenset[int] = frozenset()) -> dict[str, float | None]:
    """The summary events of the analyses, rebuilt from their onsets tables ({table key: its entries}), as one
    pass measuring every checkpoint in step order reports them; the checkpoints `left_out` (steps) are not
    judged."""
    summary: dict[str, float | None] = {}
    for a in analyses:
        entries = [e for e in tables.get(f"{a.name}/onsets", []) if e["step"] not in left_out]
        history = history_from_tables(entries)
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
    if not run.counts.exists():  # a copied run reads its own files, never the paths its config names
        raise DynascopeError(f"{run.counts} is missing: the run's training-split token counts, which fit writes at "
                             "its start; copy it from the original run directory")
    counts = np.load(run.counts)
    eos = (config.get("data") or {}).get("eos_token") or EOS
    return AnalysisContext(torch.from_numpy(counts), tokenizer, tokenizer.token_to_id(eos) if tokenizer else None)


def run_source(run_dir: str | Path, steps: list[int] | None = None) -> Source:
    """A run's snapshots and its zooms' (all, or `steps`). A zoom's step that the run has too is the run's (they are
    byte-identical); the zooms' own steps are labelled `zoom <step>`. Each snapshot is checked against its manifest
    (sha256, model config, trajectory) as it loads."""
    run = RunFiles(run_dir)
    if not run.config.is_file():
        raise DynascopeError(f"{run.root} is not a dynascope run directory (no config.yaml)")
    config = read_yaml(run.config, "run config")
    arch = ModelConfig(**config["model"]["arch"])
    manifest = read_manifest(run.root)
    if not manifest:
        raise DynascopeError(f"{run.manifest} lists no snapshots")
    sources = measurable(run, manifest)
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
    final = max(manifest)
    return Source(checkpoints, load_view, str(final), lambda: load_snapshot_tensor(run.root, final, "unembed.weight"),
                  unfinished(run, manifest[final]))


def measurable(run: RunFiles, manifest: dict[int, dict]) -> dict[int, tuple[RunFiles, dict]]:
    """{step: (the run or zoom whose snapshot it is, its manifest row)}, the run's own first; a diverged run that
    trained on marks its non-finite snapshots, and nothing is measured on them."""
    sources = {}
    for source, rows in [(run, manifest), *((zoom, read_manifest(zoom.root)) for zoom in run.zooms())]:
        for s, row in rows.items():
            if not row.get("nonfinite"):
                sources.setdefault(s, (source, row))
    return sources


def unfinished(run: RunFiles, final: dict) -> str:
    """Why a run's last snapshot (its manifest row `final`) is not its final checkpoint, or "" when it is."""
    if in_use(run.root):
        return (f"{run.root} is still training (a fit holds {run.lock}): its last snapshot is not the final one; "
                "analyze again when the fit has ended")
    if final.get("nonfinite"):
        return f"the last snapshot {run.snapshot(final['step'])} holds non-finite weights (the run diverged)"
    return ""


def run_replay(run_dir: str | Path, analyses: str | list[str] = "all", steps: list[int] | None = None,
               batch_size: int | None = None, options: dict[str, dict] | None = None,
               shard: tuple[int, int] | None = None, done: frozenset[int] | set[int] = frozenset()) -> Replay:
    """The replay of a run's snapshots and its zooms' (`run_source`) with the probe windows, analysis options and
    probe batch size of its config; with `shard` (index, count), of that shard's part only; less the steps
    `done`."""
    run = RunFiles(run_dir)
    source = run_source(run_dir, steps)
    config = read_yaml(run.config, "run config")
    probe, context_length = load_probe(run.probe), config["model"]["arch"]["context_length"]
    if probe.shape[1] > context_length:
        raise DynascopeError(f"{run.probe} holds windows of {probe.shape[1]} tokens, longer than the model's context "
                             f"({context_length}); it is not this run's probe set: restore the run's own")
    return Replay(source, probe, analyses, run_context(run.root, config),
                  batch_size or (config.get("dynamics") or {}).get("batch_size", 16), run_options(run.root, options),
                  shard, done)
