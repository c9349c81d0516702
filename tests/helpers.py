"""What the tests share: a test corpus, the arguments of a tiny run, a fake model view with planted weights,
two gloo ranks, a stand-in for wandb's run and, for the one end-to-end check, a reader of wandb's run file."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dynascope.analysis.view import ModelShape, ModelView

WORDS = ("the a cat dog sat ran on under mat tree house river quickly slowly red blue small large "
         "bird fish king queen stone water fire light dark morning evening song word").split()


def make_text(n_docs: int, seed: int = 0) -> str:
    """Paragraphs of random sentences from a small vocabulary: a corpus with Zipf-like token counts."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choices(WORDS, weights, k=rng.randint(5, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return "\n\n".join(docs) + "\n"


def tiny_args(corpus_file: Path, run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """`dynascope fit` arguments (`fit` first) of a tiny run (2 layers, d=32, vocab 320, context 32) on the test
    corpus."""
    return ["fit", "--config", "configs/tiny-relu.yaml",
            "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(max_steps),
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--model.arch.n_layers", "2", "--model.arch.d_model", "32", "--model.arch.n_heads", "2",
            "--model.arch.d_mlp", "64", "--model.arch.vocab_size", "320", "--model.arch.context_length", "32",
            "--model.warmup_steps", "2",
            "--data.source", "files", "--data.paths", f"[{corpus_file}]", "--data.vocab_size", "320",
            "--data.batch_size", "4", "--data.val_fraction", "0.2",
            "--snapshots.log_cap", "4", "--snapshots.every", "3", "--checkpoints.every_n_steps", "4",
            "--dynamics.options", '{"regions": {"pairs_per_window": 1}, "sparsity": {"dead_min_tokens": 256}}',
            "--report", "false", *extra]


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


class FakeView(ModelView):
    """A hand-built module whose `HookPoint`s carry TransformerLens names, with the unembedding and weights the
    test chooses: the planted-ground-truth tests' model."""

    def __init__(self, model: nn.Module, points: dict[str, nn.Module], unembedding: torch.Tensor, n_layers: int = 1,
                 d_mlp: int | None = None, context_length: int = 64, activation: str = "relu",
                 values: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None):
        self.model, self.E, self.values, self.gain, self.bias = model, unembedding, values, gain, bias
        self.norm_bias = norm_bias
        V, d = unembedding.shape
        self.shape = ModelShape(n_layers, d, d_mlp or d, V, context_length, activation)
        self.points = {name: (module, "out") for name, module in points.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.E

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.bias

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def final_norm_gain(self) -> torch.Tensor:
        return self.gain if self.gain is not None else torch.ones(self.shape.d_model)

    def final_norm_bias(self) -> torch.Tensor | None:
        return self.norm_bias

    def mlp_values(self, layer: int) -> torch.Tensor:
        return self.values if self.values is not None else torch.zeros(self.shape.d_mlp, self.shape.d_model)


def _rank(rank: int, fn, store: str, results: dict, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def on_two_ranks(store: Path, fn, *args) -> dict:
    """{rank: fn(rank, *args)} of two gloo ranks (processes); `fn` is a module-level function."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(fn, str(store), results, args), nprocs=2)
    return dict(results)


class FakeWandbRun:
    """Stands in for the run `wandb.init` returns, recording what dynascope's wandb output sends it through
    wandb's public calls: history rows (a table as ("table", its rows so far)), metric definitions, the
    summary, artifacts and how it finished."""

    def __init__(self, directory: Path, **init):
        self.init, self.dir = init, str(directory)
        self.id = init.get("id") or "fakeid"
        self.history: list[dict] = []
        self.metrics: dict[str, dict] = {}
        self.summary: dict = {}
        self.artifacts: list = []
        self.exit_code: int | None = None

    def define_metric(self, name: str, **options) -> None:
        self.metrics[name] = options

    def log(self, row: dict) -> None:
        import wandb

        self.history.append({k: ("table", len(v.data)) if isinstance(v, wandb.Table) else v for k, v in row.items()})

    def log_artifact(self, artifact, aliases=()) -> None:
        self.artifacts.append((artifact.name, list(aliases)))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


class FakeWandb:
    """`wandb.init` replaced: every run it starts, in order (`runs`), and `wandb.run` the newest open one."""

    def __init__(self, monkeypatch, directory: Path):
        import wandb

        self.runs: list[FakeWandbRun] = []
        self.directory = directory

        def init(**kwargs) -> FakeWandbRun:
            run = FakeWandbRun(self.directory / f"run{len(self.runs)}", **kwargs)
            self.runs.append(run)
            monkeypatch.setattr(wandb, "run", run)
            return run

        monkeypatch.setattr(wandb, "init", init)


# ------------------------------------------------------------------ wandb's offline run file, read back


def _wandb_records(data: bytes) -> list:
    """The records of an offline run file: a 7-byte header, then a LevelDB-style log of 32 KiB blocks, each record
    with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) around a
    serialized `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    out, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(pending)
            out.append(r)
    return out


def wandb_file(path: Path, timeout: float = 60.0) -> dict:
    """What an offline run file holds once wandb-core (its own process, after `finish()` returns) wrote it all:
    {"history": rows, "summary": {...}, "config": {...}, "run": the run record, "metrics": {name: definition},
    "artifacts": [...]}. Waits for the exit record, or for the file to stop growing for 3 s."""
    start = changed = time.monotonic()
    size = -1
    while True:
        data = Path(path).read_bytes()
        records = _wandb_records(data)
        if len(data) != size:
            size, changed = len(data), time.monotonic()
        now = time.monotonic()
        if any(r.WhichOneof("record_type") == "exit" for r in records) or now - changed > 3 or now - start > timeout:
            break
        time.sleep(0.2)
    kinds: dict[str, list] = {}
    for r in records:
        kinds.setdefault(r.WhichOneof("record_type"), []).append(r)

    def items(record) -> dict:
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record}

    return {"history": [items(r.history.item) for r in kinds.get("history", [])],
            "summary": {k: v for r in kinds.get("summary", []) for k, v in items(r.summary.update).items()},
            "config": {k: v for r in [kinds["run"][0].run] + [r for r in kinds.get("config", [])]
                       for k, v in items(r.config.update).items()},  # given at init, then updated
            "run": kinds["run"][0].run,
            "metrics": {r.metric.name or r.metric.glob_name: r.metric for r in kinds.get("metric", [])},
            "artifacts": [r.artifact for r in kinds.get("artifact", [])]}
