"""Publishing a run: its pages drawn into the run directory and handed to its outputs, and `dynascope sync`,
which rebuilds one wandb run from a run directory's record through the same wandb output."""

from __future__ import annotations

from pathlib import Path

from dynascope.core.io import read_yaml
from dynascope.core.records import STEP_KEY, Table, read_metrics, read_table
from dynascope.core.runfiles import RunFiles
from dynascope.outputs import Destination, Recorder
from dynascope.pages.plots import plot_run
from dynascope.pages.report import write_report


def draw_pages(directory: str | Path) -> dict[str, Path]:
    """Draw the plots and the report page of a run directory (or an `analyze --hf` output directory); returns
    them by what they show (`plots/<name>` and `report`), as outputs take them."""
    overview, report = plot_run(directory), write_report(directory)
    print(f"overview: {overview}\nreport: {report}")
    return {f"plots/{p.stem}": p for p in sorted(overview.parent.glob("*.png"))} | {"report": report}


def sync_run(run_dir: str | Path, project: str | None = None) -> str:
    """One wandb run rebuilt from a run directory's record, for a run that resumed offline (each session
    wrote its own offline run directory): its config, group and tags, metrics.jsonl in step order (one
    value per step and key), the growing tables, the summary and the pages. Online with credentials;
    otherwise offline, to upload with `wandb sync`. Returns its directory."""
    run = RunFiles(run_dir)
    config = read_yaml(run.config, "run config")
    rows: dict[int, dict] = {}
    for r in read_metrics(run.root):
        rows.setdefault(r[STEP_KEY], {}).update(r)
    wandb_options = ((config.get("outputs") or {}).get("wandb") or {}) | ({"project": project} if project else {})
    destination = Destination(run, run, config, group=config.get("wandb_group"), tags=config.get("wandb_tags") or [])
    recorder = Recorder.open(destination, {"wandb": wandb_options | {"id_suffix": "-synced"}})
    for step in sorted(rows):
        recorder.log_metrics({k: v for k, v in rows[step].items() if k != STEP_KEY}, step)
    for key, path in run.table_files().items():
        for entry in read_table(path):
            recorder.log_table(key, Table(entry["columns"], entry["rows"]), entry["step"])
    directory = recorder.sinks[0].directory
    recorder.finalize(draw_pages(run.root))
    return directory
