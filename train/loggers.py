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

STEP_KEY = "trainer/global_step"


class JsonlLogger(Logger):
    """Appends every logged row to RUN_DIR/metrics.jsonl; each row carries `trainer/global_step`."""

    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.run_dir = Path(run_dir)

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

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {STEP_KEY: step, **{k: float(v) for k, v in metrics.items()}}
        if STEP_KEY in metrics:
            row[STEP_KEY] = int(metrics[STEP_KEY])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

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


def make_wandb_logger(run_dir: str | Path, project: str = "dynascope") -> WandbLogger:
    """A WandbLogger whose run id lives in RUN_DIR/wandb_id, so a resumed run continues the same run.
    Offline unless WANDB_MODE says otherwise or credentials are configured."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    offline = os.environ.get("WANDB_MODE", "offline" if not wandb_has_credentials() else "online") == "offline"
    return WandbLogger(project=project, name=run_dir.resolve().name, id=id_file.read_text().strip(),
                       save_dir=str(run_dir), offline=offline, resume="allow")


def finish_wandb(trainer) -> None:
    """Close the wandb run so the next run in the same process starts its own (rank 0 only)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()


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
