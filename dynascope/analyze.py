"""`dynascope analyze`: replays the analyses over a run's snapshots or over Hugging Face checkpoints, and records
what they measure through the same recorder as training.

The records go to `RUN_DIR/analysis/` (or `--out`): metrics.csv, summary.json and tables/, plus the outputs
asked for (`--wandb` adds the wandb output, `--outputs` any other). A replay can run as several processes
(`--devices`) or as Slurm array tasks (`--shard I/N`), each into `shards/I-of-N/`; `merge` records the shards'
rows and tables in the one table and recomputes the summary events over the whole history. Unless
`--no_plot`, the run's plots and report page are drawn at the end and handed to the outputs.

A replay measures only the checkpoints not recorded yet (`recorded`: a metrics row and the print written after
it), unless `--redo`, so a killed replay continues. Every process writes each recorded checkpoint's print; at
the end (or at the merge) the integrity record is computed over all of them, its flagged checkpoints warned
about, and the summary events rebuilt from the onsets tables of the whole history, the flagged checkpoints
left out unless `--keep_flagged`.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynascope.analysis.base import build, resolve
from dynascope.analysis.hub import ProbeSource, hf_replay
from dynascope.analysis.integrity import flagged, integrity_rows, load_prints, save_print, warn_flagged, write_integrity
from dynascope.analysis.replay import Replay, replay_events, run_options, run_replay
from dynascope.analysis.view import ModelShape
from dynascope.core.data import DataConfig
from dynascope.core.errors import DynascopeError
from dynascope.core.heap import heap_up_to
from dynascope.core.io import ensure_writable, read_json, write_json
from dynascope.core.probe import save_probe
from dynascope.core.records import Table, read_csv, read_table
from dynascope.core.rundir import RunLock, in_use
from dynascope.core.runfiles import RecordFiles, RunFiles
from dynascope.outputs import Destination, Recorder, check_outputs
from dynascope.pages.publish import draw_pages

RECORD = {"csv": {}, "summary": {}, "tables": {}}  # what every analysis writes into its output directory


@dataclass
class AnalyzeRequest:
    """What `dynascope analyze` was asked for: a run directory (`run`), or Hugging Face checkpoints (`hf`) into
    `out`, and how to replay them."""

    run: str | None = None
    hf: list[str] | None = None
    out: str | None = None
    labels: list[str] | None = None
    data: list[str] | None = None
    probe: str | None = None
    counts: str | None = None
    tokens_per_step: int | None = None
    probe_windows: int = 64
    context_length: int = 128
    analyses: str = "all"
    steps: list[int] | None = None
    batch_size: int | None = None
    options: dict[str, dict] | None = None
    outputs: dict[str, dict] = field(default_factory=dict)
    device: str = "cpu"
    redo: bool = False  # measure the checkpoints recorded already again
    keep_flagged: bool = False  # judge onsets on checkpoints the integrity record flags too

    @property
    def files(self) -> RecordFiles:
        """Where the records go."""
        return RunFiles(self.run).analysis if self.run else RecordFiles(self.out)

    @property
    def pages(self) -> Path:
        """The directory whose pages (plots, report) the records feed."""
        return Path(self.run or self.out)

    def partial(self) -> dict[str, bool]:
        """For a run: whether it is still training, so that its table has no distances to a final checkpoint."""
        return {"analysis/partial": in_use(Path(self.run))} if self.run else {}

    def analysis_options(self) -> dict[str, dict] | None:
        return run_options(self.run, self.options) if self.run else self.options

    def replay(self, shard: tuple[int, int] | None = None, files: RecordFiles | None = None) -> Replay:
        """The replay of the checkpoints asked for (shard `shard` of them), less those recorded whole in `files`
        already (unless `redo`)."""
        done = frozenset() if self.redo or files is None else recorded(files, self.analyses)
        if self.run:
            return run_replay(self.run, self.analyses, self.steps, self.batch_size, self.options, shard, done)
        source = ProbeSource(DataConfig(source="files", paths=self.data) if self.data else None, self.probe_windows,
                             self.context_length, self.probe, self.counts)
        return hf_replay(self.hf, self.labels, self.analyses, source, self.batch_size or 16, self.options, shard,
                         self.tokens_per_step, done)

    def destination(self, files: RecordFiles) -> Destination:
        """Whose records these are: a run's (its wandb run continues), or a Hugging Face analysis of its own."""
        if self.run:
            return Destination(files, RunFiles(self.run), job_type="analyze")
        settings = {"checkpoints": self.hf, "analyses": self.analyses, "options": self.options}
        return Destination(files, None, settings, name=f"analyze-{Path(self.out).resolve().name}",
                           group=f"hf-{self.hf[0].split('@')[0]}", job_type="analyze")  # the repository, or directory


@dataclass
class Outcome:
    files: RecordFiles
    steps: list[int]
    skipped: list[str]
    flagged: dict[int, str] = field(default_factory=dict)


def recorded(files: RecordFiles, analyses: str | list[str] = "all") -> frozenset[int]:
    """The steps recorded whole in `files` for `analyses`: a row in metrics.csv with keys of each of them (an
    analysis added later is measured), and the print written after the record."""
    names = resolve(analyses)
    rows = read_csv(files.metrics_csv) if files.metrics_csv.exists() else []
    complete = {int(r["step"]) for r in rows
                if all(any(k.startswith(f"{n}/") and v == v for k, v in r.items()) for n in names)}
    return frozenset(complete) & frozenset(p.step for p in load_prints(files))


def analyze(request: AnalyzeRequest, plot: bool = True) -> Outcome:
    """The whole replay in this process (the checkpoints not recorded yet, unless `redo`): recorded, then the
    integrity record and the summary events over the whole history, then the pages drawn and handed to the
    outputs."""
    check_outputs(request.outputs)
    ensure_writable(request.files.root)
    with RunLock(request.files.root, "dynascope analyze", wait=True):  # one writer of the table at a time
        replay = request.replay(files=request.files)  # what is recorded already is read under the lock
        if not replay.checkpoints:
            tqdm.write(f"dynascope: every checkpoint is recorded in {request.files.metrics_csv} already; --redo "
                       "measures them again", file=sys.stderr)
        recorder = Recorder.open(request.destination(request.files), RECORD | request.outputs, echo=tqdm.write)
        try:
            outcome = _record(request, replay, request.files, recorder)
            outcome.flagged = _conclude(request, request.files, recorder)
            recorder.finalize(draw_pages(request.pages) if plot and request.files.metrics_csv.exists() else None)
        except BaseException:
            recorder.finalize(failed=True)
            raise
    return outcome


def analyze_shard(request: AnalyzeRequest, shard: tuple[int, int]) -> Outcome:
    """Shard `shard` (index, count) of the replay, into its own directory under `shards/`, until merged."""
    files = request.files.shard(*shard)
    ensure_writable(files.root)
    replay = request.replay(shard, files)
    recorder = Recorder.open(Destination(files), RECORD, echo=tqdm.write)
    outcome = _record(request, replay, files, recorder)
    recorder.finalize()
    return outcome


def _record(request: AnalyzeRequest, replay: Replay, files: RecordFiles, recorder: Recorder) -> Outcome:
    if request.hf:
        save_probe(files.probe, replay.probe)
    steps = []
    for record in replay.records(request.device):
        recorder.write(record)
        save_print(files, replay.prints.pop(record.step))
        steps.append(record.step)
        if replay.shape is not None and not files.shape.exists():
            write_json(files.shape, asdict(replay.shape))  # what the summary events are rebuilt from
    return Outcome(files, steps, replay.skipped)


def _conclude(request: AnalyzeRequest, files: RecordFiles, recorder: Recorder) -> dict[int, str]:
    """The integrity record of every checkpoint recorded in `files`, a warning per flagged one, and the summary:
    the events over the whole history (the flagged checkpoints left out unless `keep_flagged`) and whether the run
    is still training (`AnalyzeRequest.partial`); the flags by step."""
    rows = integrity_rows(load_prints(files))
    write_integrity(files, rows)
    bad = flagged(rows)
    warn_flagged(rows, "kept in the onsets (--keep_flagged)" if request.keep_flagged else "left out of the onsets")
    summary = {}
    if files.shape.exists():
        shape = ModelShape(**read_json(files.shape, "model shape"))
        tables = {key: read_table(path) for key, path in files.table_files().items()}
        analyses = build(request.analyses, shape, None, request.analysis_options())
        summary = replay_events(analyses, tables, frozenset() if request.keep_flagged else frozenset(bad))
    recorder.log_summary(summary | request.partial())
    return bad


def analyze_in_parallel(request: AnalyzeRequest, workers: int) -> None:
    """The replay as `workers` processes, shard i on process i (and on GPU i mod the GPU count when the device
    is cuda); `merge` then joins them."""
    torch.multiprocessing.spawn(_worker, args=(workers, request), nprocs=workers)


def _worker(index: int, workers: int, request: AnalyzeRequest) -> None:
    heap_up_to()  # a spawned process: the executable's allocator tuning did not reach it
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    if request.device == "cuda":
        request.device = f"cuda:{index % torch.cuda.device_count()}"
    analyze_shard(request, (index, workers))


def merge(request: AnalyzeRequest, plot: bool = True) -> Outcome:
    """Record the shards under `shards/` in the one table: their rows, tables and prints, then the integrity record
    and the summary events recomputed over the merged history (onsets need the whole of it); the shards are then
    removed."""
    files = request.files
    shards = files.shard_parts()
    if not shards:
        raise DynascopeError(f"{files.shards} holds no shards to merge; run `dynascope analyze ... --shard I/N` first")
    check_outputs(request.outputs)
    with RunLock(files.root, "dynascope analyze --merge", wait=True):
        recorder = Recorder.open(request.destination(files), RECORD | request.outputs, echo=tqdm.write)
        try:
            for shard in shards:
                for row in read_csv(shard.metrics_csv) if shard.metrics_csv.exists() else []:
                    recorder.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))  # NaNs too
                for key, path in shard.table_files().items():
                    for entry in read_table(path):
                        recorder.log_table(key, Table(entry["columns"], entry["rows"]), entry["step"])
                for p in load_prints(shard):
                    save_print(files, p)
            if not files.shape.exists():
                write_json(files.shape, read_json(shards[0].shape, "shard shape"))
            rows = read_csv(files.metrics_csv)
            bad = _conclude(request, files, recorder)
            for shard in shards:
                shutil.rmtree(shard.root)
            files.shards.rmdir()
            recorder.finalize(draw_pages(request.pages) if plot and rows else None)
        except BaseException:
            recorder.finalize(failed=True)
            raise
    return Outcome(files, [int(r["step"]) for r in rows], [], bad)


def report(outcome: Outcome) -> int:
    """Print what was recorded; the exit code: 1 when checkpoints were skipped (flagged ones are recorded)."""
    print(f"metrics: {outcome.files.metrics_csv} ({len(outcome.steps)} checkpoints measured now)")
    print(f"integrity: {outcome.files.integrity_csv} ({len(outcome.flagged)} flagged)")
    if outcome.skipped:
        print(f"dynascope: {len(outcome.skipped)} checkpoint(s) skipped: {', '.join(outcome.skipped)}",
              file=sys.stderr)
        return 1
    return 0
