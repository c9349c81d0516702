"""The offline runner: replays analyses over saved snapshots, or over local Hugging Face checkpoints.

`analyze_run` reads `RUN_DIR/config.yaml`, `RUN_DIR/probe.safetensors` and every snapshot in
`RUN_DIR/snapshots/` in step order, and writes `RUN_DIR/analysis/metrics.csv` (one row per step, the
keys the callback logs online), `summary.json` and `tables/`. `analyze_hf` does the same for a list
of Hugging Face model directories, with a probe set and corpus counts built from the embedded corpus
(or given files) with the model's own tokenizer. A snapshot that cannot be used (unreadable,
altered, or not matching the config) is reported by name and skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dynascope.analysis.base import Analysis, AnalysisContext, Result, Table, build
from dynascope.analysis.measure import Record, measure
from dynascope.analysis.probe import PROBE_FILE, load_probe, sample_probe, save_probe
from dynascope.analysis.records import CsvTable, Recorder, read_csv, read_table, update_summary, upsert_table
from dynascope.analysis.view import HFModelView, ModelShape, ModelView, TransformerView
from dynascope.errors import DynascopeError
from dynascope.io import ensure_writable, read_json, read_yaml, write_json
from dynascope.train.data import EOS, Corpus, DataConfig, _first_line, load_tokenizer, prepare_corpus
from dynascope.train.model import ModelConfig
from dynascope.train.rundir import trajectory_hash
from dynascope.train.snapshots import load_snapshot, read_manifest, snapshot_path

SHARDS = "shards"  # the output directory's subdirectory of sharded replays, one per shard, until merged


@dataclass
class Report:
    out_dir: Path
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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


def shard_dir(out_dir: Path, shard: tuple[int, int] | None) -> Path:
    return out_dir if shard is None else out_dir / SHARDS / f"{shard[0]}-of-{shard[1]}"


def _replay(checkpoints: list[Checkpoint], load_view: Callable[[str], ModelView], final: str, probe: torch.Tensor,
            names: str | list[str], context: AnalysisContext, out_dir: Path, batch_size: int, device: str,
            options: dict[str, dict] | None = None) -> Report:
    """Analyse checkpoints in order; `load_view(label)` gives each one's view. The `final` checkpoint's
    unembedding is the reference of distances to the end of training; it is loaded first and, when it
    is among the checkpoints, reused at its turn."""
    report = Report(ensure_writable(out_dir))
    recorder = Recorder(out_dir, [CsvTable(out_dir / "metrics.csv")], echo=tqdm.write)
    cached: dict[str, ModelView] = {}
    try:
        cached[final] = load_view(final)
        context.final_output_embeddings = cached[final].output_embeddings.detach().clone()
    except DynascopeError as e:
        tqdm.write(f"dynascope: no distances to the final checkpoint: {e}", file=sys.stderr)
    analyses: list[Analysis] = []
    for ckpt in tqdm(checkpoints, desc="analysing checkpoints", unit="ckpt"):
        try:
            view = cached.pop(ckpt.label) if ckpt.label in cached else load_view(ckpt.label)
        except DynascopeError as e:
            tqdm.write(f"dynascope: skipped: {e}", file=sys.stderr)
            report.skipped.append(ckpt.label)
            continue
        view.model.to(device)
        if not analyses:
            analyses = build(names, view.shape, context, options, device)
            write_json(out_dir / "shape.json", asdict(view.shape))  # what a merge of shards rebuilds them from
        record = measure(view, analyses, probe, ckpt.step, ckpt.tokens_seen, batch_size, ckpt.label)
        if ckpt.record:
            recorder.write(record)
            report.records.append(record)
    return report


def merge_shards(out_dir: str | Path, names: str | list[str], options: dict[str, dict] | None = None) -> Report:
    """Merge the sharded replays under `out_dir/shards/` into `out_dir`: rows and tables are upserted,
    summary events are recomputed over the merged rows (onsets need the whole history), and the shards
    are removed."""
    out_dir = Path(out_dir)
    shards = sorted((out_dir / SHARDS).glob("*-of-*"), key=lambda d: int(d.name.split("-")[0]))
    if not shards:
        raise DynascopeError(f"{out_dir / SHARDS} holds no shards to merge; run `dynascope analyze ... --shard I/N` "
                             "first")
    table = CsvTable(out_dir / "metrics.csv")
    for shard in shards:
        for row in read_csv(shard / "metrics.csv") if (shard / "metrics.csv").exists() else []:
            table.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))  # NaNs too
        for path in sorted((shard / "tables").glob("*.jsonl")):
            for entry in read_table(path):
                upsert_table(out_dir / "tables", path.stem.replace("__", "/"), entry["step"],
                             Table(entry["columns"], entry["rows"]))
    shape = ModelShape(**read_json(shards[0] / "shape.json", "shard shape"))
    rows = [table.rows[s] for s in sorted(table.rows)]
    summary = replay_events(build(names, shape, None, options), rows)
    if summary:
        update_summary(out_dir / "summary.json", summary)
    for shard in shards:
        shutil.rmtree(shard)
    (out_dir / SHARDS).rmdir()
    return Report(out_dir, [Record(int(r["step"]), r["tokens_seen"], str(r.get("label", ""))) for r in rows])


def replay_events(analyses: list[Analysis], rows: list[dict]) -> dict[str, float | None]:
    """The summary events of `rows` (in step order) by each analysis's rules, as measured in one pass."""
    summary: dict[str, float | None] = {}
    for a in analyses:
        for row in rows:
            values = {k: v for k, v in row.items() if k.startswith(a.name + "/") and v == v}
            if values:
                a.step = int(row["step"])
                events, carry = a.onsets(values)
                a.advance(Result({}, carry=carry))
                summary |= events
    return summary


def run_options(run_dir: str | Path, options: dict[str, dict] | None = None) -> dict[str, dict] | None:
    """The analysis options of a replay: the given ones, else the run's own (its config's dynamics.options)."""
    if options is not None:
        return options
    return (read_yaml(Path(run_dir) / "config.yaml", "run config").get("dynamics") or {}).get("options")


def run_context(run_dir: Path, config: dict) -> AnalysisContext:
    """What a run's analyses read besides the model: its corpus counts, tokenizer and end-of-document id."""
    tokenizer = load_tokenizer(run_dir / "tokenizer.json") if (run_dir / "tokenizer.json").exists() else None
    if (run_dir / "counts.npy").exists():
        counts = np.load(run_dir / "counts.npy")
    else:  # runs from before counts were kept in the run directory: rebuild (cached) from the config
        counts = Corpus(prepare_corpus(DataConfig.from_config(config))).counts()
    eos = (config.get("data") or {}).get("eos_token") or EOS
    return AnalysisContext(torch.from_numpy(counts), tokenizer, tokenizer.token_to_id(eos) if tokenizer else None)


def analyze_run(run_dir: str | Path, analyses: str | list[str] = "all", steps: list[int] | None = None,
                batch_size: int | None = None, device: str = "cpu", options: dict[str, dict] | None = None,
                shard: tuple[int, int] | None = None) -> Report:
    """Replay over a run's snapshots with the analysis options and probe batch size of its config; with
    `shard` (index, count), over that shard's part only, into `analysis/shards/` (see `merge_shards`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DynascopeError(f"{run_dir} is not a dynascope run directory (no config.yaml)")
    config = read_yaml(run_dir / "config.yaml", "run config")
    arch = ModelConfig(**config["model"]["arch"])
    dynamics = config.get("dynamics") or {}
    probe = load_probe(run_dir / PROBE_FILE)
    manifest = read_manifest(run_dir)
    if not manifest:
        raise DynascopeError(f"{run_dir}/snapshots/manifest.jsonl lists no snapshots")
    missing = sorted(set(steps or []) - set(manifest))
    if missing:
        raise DynascopeError(f"--steps {missing} have no snapshot in {run_dir}/snapshots (have {sorted(manifest)})")
    chosen = sorted(steps or manifest)
    context = run_context(run_dir, config)
    trajectory = trajectory_hash(config)

    def load_view(label: str) -> ModelView:
        step = int(label)
        if manifest[step].get("config_hash") not in (None, arch.hash()):
            raise DynascopeError(f"snapshot {snapshot_path(run_dir, step)} was written by another model config")
        if manifest[step].get("trajectory_hash") not in (None, trajectory):
            raise DynascopeError(f"snapshot {snapshot_path(run_dir, step)} belongs to another trajectory than "
                                 f"{run_dir / 'config.yaml'} (the manifest's trajectory_hash differs)")
        return TransformerView.from_snapshot(arch, load_snapshot(run_dir, step, device=device),
                                             str(snapshot_path(run_dir, step)))

    checkpoints = shard_of([Checkpoint(s, float(manifest[s]["tokens_seen"]), str(s)) for s in chosen], shard)
    return _replay(checkpoints, load_view, str(max(manifest)), probe, analyses, context,
                   shard_dir(run_dir / "analysis", shard), batch_size or dynamics.get("batch_size", 16), device,
                   run_options(run_dir, options))


PYTHIA_SCHEDULE = [0, *(2**k for k in range(10)), *range(1000, 143_001, 1000)]  # Pythia's 154 step branches


@dataclass(frozen=True)
class HFCheckpoint:
    """A local Hugging Face model directory (`revision` None), or a hub repo at a revision, read through the
    local Hugging Face cache (and downloaded into it unless offline)."""

    source: str
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    @property
    def label(self) -> str:
        """The default label: the revision (e.g. step1000), else the directory's name."""
        return Path(self.source).name if self.revision is None else self.revision

    @contextlib.contextmanager
    def _hub_errors(self, what: str) -> Iterator[None]:
        from huggingface_hub import constants, errors

        try:
            yield
        except errors.LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
            raise DynascopeError(f"{self.name} ({what}) is not in the local Hugging Face cache "
                                 f"{constants.HF_HUB_CACHE}; download it first (hf download {self.source} --revision "
                                 f"{self.revision}), or run where the hub can be reached, with HF_HUB_OFFLINE unset"
                                 ) from None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
            raise DynascopeError(f"{self.name} ({what}): {_first_line(e)}; check the repo id and revision") from None
        except OSError as e:  # transformers reports what it could not load as OSError
            raise DynascopeError(f"{self.name} ({what}) cannot be loaded ({_first_line(e)})") from None

    def file(self, filename: str) -> Path:
        """The local path of one of the checkpoint's files (a hub file is fetched into the cache)."""
        if self.revision is None:
            path = Path(self.source) / filename
            if not path.is_file():
                raise DynascopeError(f"{self.source} has no {filename}; give a directory written by save_pretrained "
                                     "(of the model and of its fast tokenizer)")
            return path
        from huggingface_hub import hf_hub_download

        with self._hub_errors(filename):
            return Path(hf_hub_download(self.source, filename, revision=self.revision))

    def load(self) -> HFModelView:
        if self.revision is None:
            return HFModelView.from_dir(self.source)
        from transformers import AutoModelForCausalLM

        with self._hub_errors("weights"):
            model = AutoModelForCausalLM.from_pretrained(self.source, revision=self.revision, dtype=torch.float32)
        return HFModelView(model)


def hf_checkpoints(names: list[str]) -> list[HFCheckpoint]:
    """`--hf` arguments: local model directories, or hub checkpoints REPO@REVISION (REPO@pythia-schedule:
    Pythia's 154 branches step0 ... step143000)."""
    checkpoints = []
    for name in names:
        repo, at, revision = name.partition("@")
        if Path(name).is_dir():
            checkpoints.append(HFCheckpoint(name))
        elif not at:
            raise DynascopeError(f"--hf {name}: no such directory; a hub checkpoint is REPO_ID@REVISION, e.g. "
                                 "EleutherAI/pythia-160m@step1000")
        elif not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or not revision:
            raise DynascopeError(f"--hf {name}: a hub checkpoint is REPO_ID@REVISION, e.g. "
                                 "EleutherAI/pythia-160m@step1000 (or @pythia-schedule for all of Pythia's)")
        else:
            revisions = [f"step{s}" for s in PYTHIA_SCHEDULE] if revision == "pythia-schedule" else [revision]
            checkpoints += [HFCheckpoint(repo, r) for r in revisions]
    return checkpoints


def _hf_eos(tokenizer_config: Path) -> str:
    eos = json.loads(tokenizer_config.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not eos:
        raise DynascopeError(f"{tokenizer_config} names no eos_token; the corpus needs one between documents")
    return eos


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def analyze_hf(model_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
               analyses: str | list[str] = "all", data: DataConfig | None = None, n_windows: int = 64,
               context_length: int = 128, batch_size: int = 16, device: str = "cpu",
               options: dict[str, dict] | None = None, shard: tuple[int, int] | None = None,
               probe: str | Path | None = None, counts: str | Path | None = None,
               tokens_per_step: int | None = None) -> Report:
    """Analyse Hugging Face checkpoints (local directories or hub revisions, see `hf_checkpoints`), ordered
    by `labels` (a step number in each label, e.g. `step3000`, becomes the x-axis; otherwise the position)
    or else by revision or directory name, whose `stepN` prefix (Pythia's and OLMo's revisions, `dynascope
    export --all` directories) gives the step, else the position. Probe windows have
    `context_length` tokens, or the model's maximum if that is shorter; `probe` (e.g. a run's
    probe.safetensors) and `counts` (its counts.npy) replace the windows and token counts drawn from `data`,
    so an exported run is measured as its snapshots are. `tokens_per_step` gives tokens_seen = step × it."""
    checkpoints = hf_checkpoints([str(d) for d in model_dirs])
    if labels is not None and len(labels) != len(checkpoints):
        raise DynascopeError(f"--labels has {len(labels)} entries for {len(checkpoints)} checkpoints")
    pairs = list(zip(labels, checkpoints, strict=True)) if labels else sorted(
        ((c.label, c) for c in checkpoints), key=lambda p: _natural_key(p[0]))
    by_label = dict(pairs)
    if len(by_label) != len(pairs):
        raise DynascopeError("--hf: two checkpoints have the same label; give distinct --labels")
    out_dir = ensure_writable(out_dir)
    for c in checkpoints:  # a checkpoint that cannot be had (e.g. not cached, offline) stops us before any work
        c.file("config.json")
    first = pairs[0][1]
    tokenizer_file, eos = first.file("tokenizer.json"), _hf_eos(first.file("tokenizer_config.json"))
    config = first.file("config.json")  # the model's limits, without loading its weights
    if probe is None or counts is None:
        data = data or DataConfig()
        data.tokenizer, data.eos_token = str(tokenizer_file), eos
        corpus = Corpus(prepare_corpus(data))
    max_positions = HFModelView.max_positions(config.parent)
    tokens = load_probe(probe) if probe else sample_probe(corpus.tokens("val"), n_windows,
                                                          min(context_length, max_positions))
    vocab = json.loads(config.read_text()).get("vocab_size")
    if tokens.shape[1] > max_positions or (vocab and tokens.max() >= vocab):
        raise DynascopeError(f"{f'--probe {probe}' if probe else 'the probe set'}: windows of {tokens.shape[1]} "
                             f"tokens with ids up to {int(tokens.max())} do not fit {first.name} ({max_positions} "
                             f"positions, {vocab} tokens); give a probe set of this model's tokenizer")
    save_probe(out_dir / PROBE_FILE, tokens)
    tokenizer = load_tokenizer(tokenizer_file)
    context = AnalysisContext(torch.from_numpy(_load_counts(counts) if counts else corpus.counts()), tokenizer,
                              tokenizer.token_to_id(eos))

    def step_of(i: int, label: str) -> int:
        digits, default = re.findall(r"\d+", label), re.match(r"step(\d+)", label)  # Pythia's, OLMo's, our exports'
        return int(digits[-1]) if digits and labels is not None else int(default[1]) if default else i

    def checkpoint(i: int, label: str) -> Checkpoint:
        step = step_of(i, label)
        return Checkpoint(step, float(step * tokens_per_step) if tokens_per_step else float("nan"), label)

    return _replay(shard_of([checkpoint(i, label) for i, (label, _) in enumerate(pairs)], shard),
                   lambda label: by_label[label].load(), pairs[-1][0], tokens, analyses, context,
                   shard_dir(out_dir, shard), batch_size, device, options)


def _load_counts(path: str | Path) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DynascopeError(f"--counts {path} cannot be read ({e}); give a run's counts.npy") from None


def analyze_in_parallel(workers: int, device: str, analyze: Callable[..., Report], **kwargs) -> None:
    """Run `analyze` (analyze_run or analyze_hf) as `workers` processes, shard i on process i (and on GPU
    i mod the GPU count when `device` is cuda); `merge_shards` then joins them."""
    torch.multiprocessing.spawn(_worker, args=(workers, device, analyze, kwargs), nprocs=workers)


def _worker(index: int, workers: int, device: str, analyze: Callable[..., Report], kwargs: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # the workers share the cores
    if device == "cuda":
        device = f"cuda:{index % torch.cuda.device_count()}"
    analyze(**kwargs, device=device, shard=(index, workers))
