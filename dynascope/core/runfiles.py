"""Every file of a run directory and of an analysis's output directory, named in this one place.

    RUN_DIR/config.yaml                the resolved configuration of `dynascope fit`
    RUN_DIR/metrics.jsonl              every logged row, each with trainer/global_step
    RUN_DIR/summary.json, tables/      one-off analysis events; small per-step tables, one file per key
    RUN_DIR/snapshots/                 step_XXXXXXXX.safetensors and manifest.jsonl
    RUN_DIR/checkpoints/               step_XXXXXXXX.ckpt and last.ckpt (full resume checkpoints)
    RUN_DIR/wandb/, wandb_id           the wandb run's files and its id
    RUN_DIR/wandb_url                  the wandb run's web page (online runs)
    RUN_DIR/probe.safetensors          the probe windows every analysis reads, online and offline
    RUN_DIR/tokenizer.json, counts.npy the run's tokenizer and training-split token counts
    RUN_DIR/.lock                      held by the process that uses the directory
    RUN_DIR/analysis/                  `dynascope analyze`: an output directory (below)
    RUN_DIR/zoom/A-B/                  `dynascope zoom`: a run directory of its own, retraining steps A to B

    OUT/metrics.csv, metrics.parquet   one row per checkpoint
    OUT/summary.json, tables/          as in a run directory
    OUT/plots/, report/                PNGs, and the report page (index.html)
    OUT/probe.safetensors, shape.json  an `analyze --hf` probe set; the model shape shards are merged with
    OUT/shards/I-of-N/                 a sharded replay's parts, until merged
"""

from __future__ import annotations

from pathlib import Path


class RecordFiles:
    """The files a recorder writes into a directory: a run directory online, its `analysis/` offline, or an
    `analyze --hf` output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def lock(self) -> Path:
        """Held by the command writing here: a fit (a run directory), an analyze (its `analysis/`)."""
        return self.root / ".lock"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def metrics_parquet(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def table(self, key: str) -> Path:
        """The file of table `key` (`outliers/dims` -> tables/outliers__dims.jsonl)."""
        return self.tables / (key.replace("/", "__") + ".jsonl")

    def table_files(self) -> dict[str, Path]:
        """{table key: its file} of every table written here."""
        return {path.stem.replace("__", "/"): path for path in sorted(self.tables.glob("*.jsonl"))}

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def probe(self) -> Path:
        return self.root / "probe.safetensors"

    @property
    def shape(self) -> Path:
        return self.root / "shape.json"

    @property
    def integrity_csv(self) -> Path:
        return self.root / "integrity.csv"

    @property
    def prints(self) -> Path:
        """Each recorded checkpoint's fingerprint and weight sketch (integrity/<step>.npz): what integrity.csv is
        computed from, and the mark that a checkpoint was recorded whole."""
        return self.root / "integrity"

    def print_file(self, step: int) -> Path:
        return self.prints / f"{step}.npz"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, index: int, count: int) -> RecordFiles:
        return RecordFiles(self.shards / f"{index}-of-{count}")

    def shard_parts(self) -> list[RecordFiles]:
        """The shards written so far, by index."""
        parts = sorted(self.shards.glob("*-of-*"), key=lambda d: int(d.name.split("-")[0]))
        return [RecordFiles(p) for p in parts]


class RunFiles(RecordFiles):
    """A run directory of `dynascope fit`."""

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def manifest(self) -> Path:
        return self.snapshots / "manifest.jsonl"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"step_{step:08d}.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"

    @property
    def wandb_url(self) -> Path:
        """The wandb run's web page, written when the run is online."""
        return self.root / "wandb_url"

    @property
    def wandb(self) -> Path:
        """Where wandb writes its run directories (it adds `wandb/` to the directory it is given: the root)."""
        return self.root / "wandb"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def counts(self) -> Path:
        return self.root / "counts.npy"


    @property
    def analysis(self) -> RecordFiles:
        return RecordFiles(self.root / "analysis")

    def zoom(self, start: int, end: int) -> RunFiles:
        """The run directory of `dynascope zoom --from start --to end`, inside this one."""
        return RunFiles(self.root / "zoom" / f"{start}-{end}")

    def zooms(self) -> list[RunFiles]:
        """The zooms of this run so far."""
        return [RunFiles(p) for p in sorted((self.root / "zoom").glob("*-*")) if p.is_dir()]
