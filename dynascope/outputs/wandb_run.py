"""The wandb run of a record: online with an API key, offline otherwise (`WANDB_MODE` overrides this).

Whose run it is follows from the `Destination`:

- a fit (its files are the run directory's): the run whose id is RUN_DIR/wandb_id (made on first use), so a
  resumed fit continues it; after a rewind the steps the run already holds are not logged a second time;
- an offline analysis of a run directory: the training run itself (its wandb_id), with only the keys
  training did not log (those measured against the final checkpoint);
- an analysis of Hugging Face checkpoints: a run of its own, of job type `analyze`;
- `dynascope sync`: a new run (`id_suffix`) rebuilt from the run directory's record.

Laid out for reading training dynamics: every key plots against `trainer/global_step` (`tokens_seen` is
declared too, an x-axis choice). A key's chart is hidden until its value first changes, so the automatic
panels hold no constant; per-layer keys (`.../L{l}`) show while training, a metric's layers side by side in
its section (with "group by all segments" in the workspace settings, one section per metric), and the end of
the record adds one chart per per-layer metric with a line per layer. Each table key is one growing table
(wandb's incremental log mode, a `step` column first). The summary's step and tokens are those of the last
measured checkpoint, as the report's.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from dynascope.core.io import atomic_write_text, read_json
from dynascope.core.records import LAYER, MEASURED_KEY, STEP_KEY, Table, read_metrics
from dynascope.core.settings import trajectory
from dynascope.outputs.base import Destination, Sink


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "online" if wandb_has_credentials() else "offline")


def wandb_grouping(config: dict, preset: str | None) -> tuple[str, str, list[str]]:
    """The wandb run name of a resolved fit config (preset, activation, seed), its group (runs that differ only
    in their seeds share it) and its tags (activation, preset); WANDB_RUN_GROUP and WANDB_TAGS
    (comma-separated), e.g. a sweep's, win."""
    setup = {k: v for k, v in trajectory(config).items() if not k.endswith("seed") and k != "seed_everything"}
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:8]
    activation, preset = config["model"]["arch"]["activation"], preset or "custom"
    name = f"{preset}-{activation}-seed{config.get('seed_everything')}"
    group = os.environ.get("WANDB_RUN_GROUP") or f"{preset}-{activation}-{digest}"  # wandb's own variables
    tags = [f"activation={activation}", f"preset={preset}"]
    return name, group, list(dict.fromkeys(tags + [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]))


class WandbRun(Sink):
    name = "wandb"

    def __init__(self, destination: Destination, project: str = "dynascope", id_suffix: str = ""):
        """Args:
            project: The wandb project.
            id_suffix: Appended to the run directory's wandb id: a new run beside the training run.
        """
        super().__init__(destination)
        run, files = destination.run, destination.files
        attached = run is not None and (files.root == run.root or run.wandb_id.exists())
        from_analysis = attached and files.root != run.root
        if attached and not run.wandb_id.exists():
            atomic_write_text(run.wandb_id, uuid.uuid4().hex[:12])
        logged = read_metrics(run.root) if attached else []
        # an offline analysis adds to the training run only what training did not log
        self.skip_keys = {k for r in logged for k in r} - {"tokens_seen"} if from_analysis else set()
        self.held_through = max((r[STEP_KEY] for r in logged), default=-1) if not from_analysis else -1
        self.skip_through = -1  # steps the run holds, which a rewound run logs again: not sent twice
        self._first: dict[str, float] = {}  # each key's first value; its chart shows once a value differs
        self._shown: set[str] = set()
        for row in sorted(logged, key=lambda r: r[STEP_KEY]) if not from_analysis else []:
            self._note_values(row)
        self._last_measured: tuple[int, float] | None = None
        own_name = destination.name or files.root.resolve().name
        self._init = dict(project=project, dir=str(run.root if attached else files.root), mode=wandb_mode(),
                          id=run.wandb_id.read_text().strip() + id_suffix if attached else None,
                          resume="allow" if attached else None, job_type=destination.job_type,
                          name=own_name if not from_analysis else None, group=destination.group,
                          tags=destination.tags or None, config=destination.config)
        self._run = None
        self._declared: set[str] = set()
        self._tables: dict[str, Any] = {}
        self._layer_rows: list[dict] = []
        self._finished = False
        if destination.job_type == "train":  # a fit's snapshots become artifacts of this run from step 0 on
            self.start()

    def start(self):
        """The wandb run, started at the first use: a command that fails before recording anything leaves none."""
        import wandb

        if self._run is None:
            self._run = wandb.init(**self._init)
            self._run.define_metric(STEP_KEY)
            self._run.define_metric("*", step_metric=STEP_KEY)
            run = self.destination.run
            if self._init["mode"] == "online" and self._init["id"] and run is not None and self._run.url:
                atomic_write_text(run.wandb_url, self._run.url)  # the report links to it
        return self._run

    @property
    def run(self):
        return self.start()

    @property
    def directory(self) -> str:
        """The wandb run's local directory (what `wandb sync` uploads)."""
        return self.run.dir

    def _note_values(self, values: dict) -> set[str]:
        """Record the keys' values; returns the keys whose value has now changed for the first time."""
        changed = set()
        for key, value in values.items():
            if key in (STEP_KEY, "tokens_seen", "label") or key in self._shown:
                continue
            first = self._first.setdefault(key, value)
            if value != first and not (value != value and first != first):  # NaN equals NaN here
                self._shown.add(key)
                changed.add(key)
        return changed

    def log_metrics(self, metrics: dict[str, float | str], step: int) -> None:
        values = {k: v for k, v in metrics.items() if k not in self.skip_keys and k != "label"}
        if step <= self.skip_through or not set(values) - {"tokens_seen"}:
            return
        changed = self._note_values(values)
        for key in (values.keys() - self._declared) | changed:
            self.run.define_metric(key, step_metric=STEP_KEY, hidden=key != "tokens_seen" and key not in self._shown)
            self._declared.add(key)
        if any(LAYER.match(k) for k in values):
            self._layer_rows.append({STEP_KEY: step, **values})
        if MEASURED_KEY in values and (self._last_measured is None or step >= self._last_measured[0]):
            self._last_measured = (step, values.get("tokens_seen", float("nan")))
        self.run.log({STEP_KEY: step, **values})

    def log_summary(self, summary: dict[str, float | None]) -> None:
        self.run.summary.update(summary)

    def log_table(self, key: str, table: Table, step: int) -> None:
        import wandb

        if step <= self.skip_through:
            return
        if key not in self._tables:
            self._tables[key] = wandb.Table(columns=["step", *table.columns], log_mode="INCREMENTAL")
        for row in table.rows:
            self._tables[key].add_data(step, *row)
        self.run.log({STEP_KEY: step, key: self._tables[key]})

    def rewind(self, step: int) -> None:
        self.skip_through = self.held_through

    def finalize(self, pictures: dict[str, Path] | None = None, failed: bool = False) -> None:
        """The layer charts and the pictures, the summary as summary.json holds it, and the run closed."""
        import wandb

        if self._finished or (self._run is None and failed):  # nothing was recorded: no run to close
            return
        self._finished = True
        if not failed:
            self._log_layer_charts()
            self.run.log({name: wandb.Html(path.read_text()) if path.suffix == ".html" else wandb.Image(str(path))
                          for name, path in (pictures or {}).items()})
        summary = self.destination.files.summary
        if summary.exists():  # the summary as summary.json holds it when the run closes
            self.run.summary.update(read_json(summary, "summary"))
        if self._last_measured is not None:  # not the last training row's: the checkpoint the record ends at
            self.run.summary.update(dict(zip((STEP_KEY, "tokens_seen"), self._last_measured, strict=True)))
        self.run.finish(exit_code=1 if failed else 0)

    def _log_layer_charts(self) -> None:
        """One chart per per-layer metric of the logged rows, a line per layer."""
        import wandb

        layers: dict[str, dict[int, str]] = {}
        for key in sorted({k for r in self._layer_rows for k in r}):
            if m := LAYER.match(key):
                layers.setdefault(m.group(1), {})[int(m.group(2))] = key
        for metric, keys in layers.items():
            measured = [r for r in self._layer_rows if any(k in r for k in keys.values())]
            ys = [[r.get(keys[l], float("nan")) for r in measured] for l in sorted(keys)]
            chart = wandb.plot.line_series(xs=[r[STEP_KEY] for r in measured], ys=ys,
                                           keys=[f"L{l}" for l in sorted(keys)], title=metric, xname=STEP_KEY)
            self.run.log({f"layers/{metric}": chart})
