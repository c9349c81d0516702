"""The run's loggers: wandb (online with an API key, offline otherwise) and RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dynascope.io import atomic_write_text, read_jsonl, write_jsonl

STEP_KEY = "trainer/global_step"


class JsonlLogger(Logger):
    """RUN_DIR/metrics.jsonl: every logged row, each with `trainer/global_step`, one value per (step, key).

    Rows are appended. A key logged again at its step with the same value (a step's training and analysis
    rows both carry `tokens_seen`) is left out; with another value the old one is replaced and the file
    rewritten atomically. `rewind` drops the rows after a resumed run's checkpoint. Lightning's `epoch`
    is not kept: the batch stream is indexed by step."""

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.run_dir = Path(run_dir)
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
    """wandb's logger for a run that may be resumed: steps a resumed run replays, which the wandb run
    already holds, are not logged a second time (tables included: they are logged as metrics)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._replayed_through = -1

    def rewind(self, step: int, replayed_through: int) -> None:
        self._replayed_through = replayed_through

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None or step > self._replayed_through:
            super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def make_wandb_logger(run_dir: str | Path, project: str = "dynascope") -> WandbLogger:
    """A WandbLogger whose run id lives in RUN_DIR/wandb_id, so a resumed run continues the same run.
    Offline unless WANDB_MODE says otherwise or credentials are configured. Only rank 0 logs to wandb,
    and only rank 0 writes the id."""
    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id"
    if rank_zero_only.rank == 0 and not id_file.exists():
        atomic_write_text(id_file, uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip() if id_file.exists() else None
    offline = os.environ.get("WANDB_MODE", "offline" if not wandb_has_credentials() else "online") == "offline"
    return RunWandbLogger(project=project, name=run_dir.resolve().name, id=run_id, save_dir=str(run_dir),
                          offline=offline, resume="allow")


def finish_wandb(trainer) -> None:
    """Close the wandb run so the next run in the same process starts its own (rank 0 only)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()


def finish_wandb_run() -> None:
    """Finish this process's wandb run if one is still open (a fit that failed), so the next fit in the
    same process starts its own instead of logging into it."""
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=1)


def upload_to_wandb(table: Path, plots_dir: Path, out_dir: Path, project: str = "dynascope") -> str:
    """Log an offline analysis table (metrics.csv: one row per checkpoint, against `trainer/global_step`)
    and its plots to a new wandb run in `out_dir/wandb`; returns the run's directory."""
    import wandb

    from dynascope.analysis.records import read_csv

    rows = read_csv(table)
    mode = os.environ.get("WANDB_MODE", "online" if wandb_has_credentials() else "offline")
    run = wandb.init(project=project, dir=str(out_dir), mode=mode, job_type="analyze",
                     name=f"analyze-{Path(out_dir).resolve().parent.name}")
    run.define_metric("*", step_metric=STEP_KEY)
    for r in rows:
        run.log({STEP_KEY: int(r["step"]), **{k: v for k, v in r.items() if k not in ("step", "label")}})
    columns = list(rows[0])
    run.log({"analysis/table": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
    run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(Path(plots_dir).glob("*.png"))})
    run.finish()
    return run.dir
