"""The run's loggers: wandb (online with an API key, offline otherwise) and RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import re
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dynascope.io import atomic_write_text, read_json, read_jsonl, read_yaml, write_jsonl
from dynascope.train.rundir import trajectory

STEP_KEY = "trainer/global_step"
LAYER = re.compile(r"^(.+)/L(\d+)$")


class JsonlLogger(Logger):
    """RUN_DIR/metrics.jsonl: every logged row, each with `trainer/global_step`, one value per (step, key).

    Rows are appended. A key logged again at its step with the same value (a step's training and analysis
    rows both carry `tokens_seen`) is left out; with another value the old one is replaced and the file
    rewritten atomically. `rewind` drops the rows after a resumed run's checkpoint. Lightning's `epoch`
    is not kept: the batch stream is indexed by step."""

    def __init__(self, run_dir: str | Path | None = None):
        """Args:
            run_dir: Where metrics.jsonl goes (default: the run directory, set by `dynascope fit`).
        """
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._step: int | None = None  # the latest step logged, and its values
        self._values: dict[str, float] = {}

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @property
    def path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _logged_at(self, step: int) -> dict[str, float]:
        """What the file holds at `step` (read from it unless it is the latest step logged)."""
        if step != self._step:
            self._step = step
            self._values = {k: v for r in read_jsonl(self.path, "metrics log") if r[STEP_KEY] == step
                            for k, v in r.items() if k != STEP_KEY}
        return self._values

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = int(metrics.get(STEP_KEY, step))
        logged = self._logged_at(step)
        row = {k: float(v) for k, v in metrics.items() if k not in (STEP_KEY, "epoch") and logged.get(k) != float(v)}
        if not row:
            return
        if row.keys() & logged.keys():  # a value replaced: rewrite without the old ones
            kept = [{k: v for k, v in r.items() if r[STEP_KEY] != step or k == STEP_KEY or k not in row}
                    for r in read_jsonl(self.path, "metrics log")]
            write_jsonl(self.path, [r for r in kept if len(r) > 1] + [{STEP_KEY: step, **row}])
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({STEP_KEY: step, **row}) + "\n")
        logged |= row

    @rank_zero_only
    def rewind(self, step: int, replayed_through: int) -> None:
        """Drop the rows logged after `step`: a resumed run logs them again."""
        write_jsonl(self.path, [r for r in read_jsonl(self.path, "metrics log") if r[STEP_KEY] <= step])
        self._step = None

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # LightningCLI already writes RUN_DIR/config.yaml


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class RunWandbLogger(WandbLogger):
    """wandb's logger for a run that may be resumed, laid out for reading training dynamics:

    - steps a resumed run replays, which the wandb run already holds, are not logged a second time
      (tables included: they are logged as metrics);
    - every key plots against `trainer/global_step` (Lightning's definition), and `tokens_seen` is
      declared as a metric too, so it is an x-axis choice in the UI;
    - per-layer keys (`.../L{l}`) are hidden from the automatic panels: `log_layer_charts` draws one
      chart per metric with a line per layer instead;
    - each table key is one growing table (wandb's incremental log mode, a `step` column first),
      not a new table per step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._replayed_through = -1
        self._tables: dict[str, Any] = {}
        self._declared: set[str] = set()

    def bind(self, run_dir: Path, group: str | None = None, tags: list[str] | None = None,
             id_suffix: str = "") -> None:
        """Make this the wandb run of `run_dir` (before its first use): the run id lives in RUN_DIR/wandb_id
        (written by rank 0 only), so a resumed fit continues the same run; the run's files go under
        RUN_DIR/wandb; offline unless WANDB_MODE says otherwise or credentials are configured."""
        id_file = run_dir / "wandb_id"
        if rank_zero_only.rank == 0 and not id_file.exists():
            atomic_write_text(id_file, uuid.uuid4().hex[:12])
        run_id = id_file.read_text().strip() + id_suffix if id_file.exists() else None
        self._wandb_init.update(id=run_id, dir=str(run_dir), name=run_dir.resolve().name, resume="allow",
                                group=group, tags=tags)
        self._save_dir, self._name, self._id = str(run_dir), run_dir.resolve().name, run_id
        self._offline = _mode() == "offline"

    def rewind(self, step: int, replayed_through: int) -> None:
        self._replayed_through = replayed_through

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is not None and step <= self._replayed_through:
            return
        run = self.experiment
        for key in metrics.keys() - self._declared:
            if key == "tokens_seen" or LAYER.match(key):
                run.define_metric(key, step_metric=STEP_KEY, hidden=key != "tokens_seen")
            self._declared.add(key)
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    @rank_zero_only
    def log_growing_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        if key not in self._tables:
            self._tables[key] = wandb.Table(columns=["step", *columns], log_mode="INCREMENTAL")
        for row in rows:
            self._tables[key].add_data(step, *row)
        self.log_metrics({key: self._tables[key]}, step)

    @rank_zero_only
    def log_layer_charts(self, rows: list[dict]) -> None:
        """One chart per per-layer metric of `rows` (a run's measurement rows), a line per layer."""
        import wandb

        layers: dict[str, dict[int, str]] = {}
        for key in sorted({k for r in rows for k in r}):
            if m := LAYER.match(key):
                layers.setdefault(m.group(1), {})[int(m.group(2))] = key
        for metric, keys in layers.items():
            measured = [r for r in rows if any(k in r for k in keys.values())]
            ys = [[r.get(keys[l], float("nan")) for r in measured] for l in sorted(keys)]
            chart = wandb.plot.line_series(xs=[r[STEP_KEY] for r in measured], ys=ys,
                                           keys=[f"L{l}" for l in sorted(keys)], title=metric, xname=STEP_KEY)
            self.experiment.log({f"layers/{metric}": chart})


def wandb_project(config: dict) -> str:
    """The wandb project of a resolved fit config (its RunWandbLogger's), dynascope by default."""
    loggers = (config.get("trainer") or {}).get("logger") or []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and logger.get("class_path", "").endswith("RunWandbLogger"):
            return (logger.get("init_args") or {}).get("project") or "dynascope"
    return "dynascope"


def wandb_grouping(config: dict, preset: str | None) -> tuple[str, list[str]]:
    """The wandb group of a resolved fit config (runs that differ only in their seeds share it) and its
    tags (activation, preset); WANDB_RUN_GROUP and WANDB_TAGS (comma-separated), e.g. a sweep's, win."""
    setup = {k: v for k, v in trajectory(config).items() if not k.endswith("seed") and k != "seed_everything"}
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:8]
    activation, preset = config["model"]["arch"]["activation"], preset or "custom"
    group = os.environ.get("WANDB_RUN_GROUP") or f"{preset}-{activation}-{digest}"  # wandb's own variables
    tags = [f"activation={activation}", f"preset={preset}"]
    return group, list(dict.fromkeys(tags + [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]))


def finish_wandb(trainer) -> None:
    """Close the wandb run so the next run in the same process starts its own (rank 0 only), with the run
    directory's summary.json, the events as they stand at the end, as its summary."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.summary.update(_summary(Path(trainer.default_root_dir)))
            logger.experiment.finish()


def finish_wandb_run() -> None:
    """Finish this process's wandb run if one is still open (a fit that failed), so the next fit in the
    same process starts its own instead of logging into it."""
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=1)


def _mode() -> str:
    return os.environ.get("WANDB_MODE", "online" if wandb_has_credentials() else "offline")


def _summary(directory: Path) -> dict:
    """DIRECTORY/summary.json (the events as they stand), empty when there is none."""
    path = directory / "summary.json"
    return read_json(path, "summary") if path.exists() else {}


def _pictures(plots_dir: Path, report: Path) -> dict:
    """The PNGs of `plots_dir` as `plots/<name>` images and the report page as `report`, to log to wandb."""
    import wandb

    images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(plots_dir.glob("*.png"))}
    return {**images, "report": wandb.Html(report.read_text())}


def upload_to_wandb(out_dir: Path, run_dir: Path | None = None, project: str = "dynascope",
                    config: dict | None = None, group: str | None = None) -> str:
    """Log an offline analysis (`out_dir`: metrics.csv, summary.json, plots/, the report page) to wandb;
    returns the wandb run's directory. A run directory's analysis goes into the training run itself (its
    `wandb_id`): the keys training did not log (those measured against the final checkpoint), the plots,
    the report and the summary. Any other analysis (of Hugging Face checkpoints) gets a run of its own
    with `config` and `group`."""
    import wandb

    from dynascope.analysis.records import read_csv, read_metrics
    from dynascope.analysis.report import write_report

    out_dir = Path(out_dir)
    id_file = run_dir / "wandb_id" if run_dir else None
    if id_file and id_file.exists():
        logged = {k for r in read_metrics(run_dir) for k in r} - {"tokens_seen"}
        run = wandb.init(project=project, dir=str(run_dir), mode=_mode(), id=id_file.read_text().strip(),
                         resume="allow")
    else:
        logged = set()
        run = wandb.init(project=project, dir=str(out_dir), mode=_mode(), job_type="analyze", config=config,
                         group=group, name=f"analyze-{out_dir.resolve().name}")
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    for r in read_csv(out_dir / "metrics.csv"):
        values = {k: v for k, v in r.items() if k not in ("step", "label", *logged)}
        if set(values) - {"tokens_seen"}:
            run.log({STEP_KEY: int(r["step"]), **values})
    run.log(_pictures(out_dir / "plots", write_report(run_dir or out_dir)))
    run.summary.update(_summary(out_dir))
    run.finish()
    return run.dir


def sync_run(run_dir: Path, project: str | None = None) -> str:
    """One wandb run rebuilt from a run directory's record, for a run that resumed offline (each
    session wrote its own offline run directory): its config, group and tags, metrics.jsonl in step
    order (one value per step and key), the growing tables, the summary and the end-of-fit pictures.
    Online with credentials; otherwise offline, to upload with `wandb sync`. Returns its directory."""
    from dynascope.analysis.records import read_metrics, read_table

    config = read_yaml(run_dir / "config.yaml", "run config")
    rows: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        rows.setdefault(r[STEP_KEY], {}).update(r)
    logger = RunWandbLogger(project=project or wandb_project(config), config=config)
    logger.bind(run_dir, config.get("wandb_group"), config.get("wandb_tags"), id_suffix="-synced")  # a new run
    for step in sorted(rows):
        logger.log_metrics({k: v for k, v in rows[step].items() if k != STEP_KEY}, step)
    for path in sorted((run_dir / "tables").glob("*.jsonl")):
        for entry in read_table(path):
            logger.log_growing_table(path.stem.replace("__", "/"), entry["columns"], entry["rows"], entry["step"])
    logger.experiment.summary.update(_summary(run_dir))
    publish_run(run_dir, logger)
    directory = logger.experiment.dir
    logger.experiment.finish()
    return directory


def publish_run(run_dir: Path, logger: RunWandbLogger | None) -> None:
    """The end of a fit: the plots and the report page in the run directory and, with a wandb run, in it
    too, beside one chart per per-layer metric (the summary reached it as it changed)."""
    from dynascope.analysis.plots import plot_run
    from dynascope.analysis.records import read_metrics
    from dynascope.analysis.report import write_report

    overview, report = plot_run(run_dir), write_report(run_dir)
    print(f"overview: {overview}\nreport: {report}")
    if logger is None:
        return
    rows = [r for r in read_metrics(run_dir) if "dynamics/seconds" in r]
    logger.log_layer_charts(rows)
    logger.experiment.log(_pictures(overview.parent, report))
