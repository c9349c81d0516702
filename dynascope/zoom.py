"""`dynascope zoom RUN --from A --to B [--every K]`: the steps between A and B trained again, densely measured.

An onset reported "between snapshots 512 and 1000" is resolved by retraining that stretch: batches are a pure
function of (seed, step, rank, micro-batch), so a fit resumed from the newest resume checkpoint at or before A
retraces the run's own trajectory, and snapshotting every K steps on the way (each measured, online, by every
analysis of the run) shows where the event happens. The zoom is a run directory of its own,
`RUN/zoom/A-B/`: the run's config with `trainer.max_steps` B (and the learning-rate schedule's length fixed at
the run's own), `snapshots.at` the dense steps, and copies of the run's probe set, tokenizer and token counts.
Nothing of the run itself is written. A killed zoom resumes from its own newest checkpoint when started again.

Where a zoom snapshot's step is also one of the run's, the two files must be byte-identical (sha256): the
command checks and fails loudly when they are not, since a zoom that does not retrace the run says nothing
about it. `dynascope analyze RUN` then measures the run's snapshots and the zooms' in step order (labelled
`zoom`), so the offline table, the onsets and the report include the dense points.

To zoom, a run needs a resume checkpoint at or before A: `--checkpoints.every_n_steps`, or
`--checkpoints.at_snapshots true`, which keeps one at every log-spaced snapshot step.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from dynascope.core.errors import DynascopeError
from dynascope.core.io import atomic_write_text, read_json, read_yaml
from dynascope.core.rundir import resume_checkpoint
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest
from dynascope.train.cli import fit_cli


def bracket(run: RunFiles, onset: str) -> tuple[int, int]:
    """The bracket of an onset (e.g. `outliers/emergence`) in the run's summary (the offline one first)."""
    name = onset.removesuffix("_step")
    for path in (run.analysis.summary, run.summary):
        summary = read_json(path, "run summary") if path.exists() else {}
        lo, hi = summary.get(f"{name}_bracket_lo"), summary.get(f"{name}_bracket_hi")
        if f"{name}_step" in summary:
            if lo is None or hi is None:
                raise DynascopeError(f"--onset {onset}: {path} gives it no bracket to zoom into (it has not "
                                     "happened, or held from the first checkpoint); give --from and --to")
            return int(lo), int(hi)
    events = sorted({k.removesuffix("_step") for p in (run.analysis.summary, run.summary) if p.exists()
                     for k in read_json(p, "run summary") if k.endswith("_step")})
    raise DynascopeError(f"--onset {onset}: not an onset of {run.root}; its onsets: {', '.join(events) or 'none'} "
                         f"(`dynascope onsets {run.root}` lists them)")


def checkpoint_at_or_before(run: RunFiles, step: int) -> Path:
    """The run's newest step checkpoint at or before `step`."""
    steps = {int(m[1]): p for p in run.checkpoints.glob("step_*.ckpt") if (m := re.fullmatch(r"step_(\d+)\.ckpt",
                                                                                             p.name))}
    usable = [s for s in steps if s <= step]
    if not usable:
        raise DynascopeError(f"--from {step}: {run.checkpoints} has no resume checkpoint at or before step {step} "
                             f"(it has {sorted(steps) or 'none'}); zoom from a later step, or train runs with "
                             "--checkpoints.at_snapshots true (or a smaller --checkpoints.every_n_steps)")
    return steps[max(usable)]


def zoom_config(config: dict, zoom: RunFiles, start: int, end: int, every: int) -> dict:
    """The zoom's config: the run's, ending at `end`, with its learning-rate schedule's length kept."""
    trainer, model = dict(config["trainer"]), dict(config["model"])
    model["decay_steps"] = model.get("decay_steps") or trainer["max_steps"]
    trainer |= {"max_steps": end, "default_root_dir": str(zoom.root)}
    snapshots = dict(config.get("snapshots") or {}) | {"at": list(range(start + every, end + 1, every))}
    checkpoints = dict(config.get("checkpoints") or {}) | {"at_snapshots": False}
    return {**config, "trainer": trainer, "model": model, "snapshots": snapshots, "checkpoints": checkpoints,
            "outputs": {}, "report": False, "ckpt_path": None, "start_over": False}


def prepare(run: RunFiles, start: int, end: int, every: int) -> RunFiles:
    """Check the request against the run; write the zoom's config and its copies of the run's files."""
    if not run.config.is_file():
        raise DynascopeError(f"{run.root} is not a dynascope run directory (no config.yaml)")
    config = read_yaml(run.config, "run config")
    last = config["trainer"]["max_steps"]
    for option, step in (("--from", start), ("--to", end)):
        if not 0 <= step <= last:
            raise DynascopeError(f"{option} {step}: the run trains steps 0 to {last}; give a step in that range")
    if start >= end:
        raise DynascopeError(f"--from {start} --to {end}: --from must come before --to")
    if every < 1:
        raise DynascopeError(f"--every {every}: give a positive number of steps")
    checkpoint_at_or_before(run, start)
    zoom = run.zoom(start, end)
    zoom.root.mkdir(parents=True, exist_ok=True)
    for name in ("probe", "tokenizer", "counts"):  # what its measurements read, as the run's
        if getattr(run, name).exists() and not getattr(zoom, name).exists():
            shutil.copyfile(getattr(run, name), getattr(zoom, name))
    atomic_write_text(zoom.config, yaml_dump(zoom_config(config, zoom, start, end, every)))
    return zoom


def yaml_dump(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def zoom(run_dir: str | Path, start: int, end: int, every: int = 1) -> RunFiles:
    """Retrain steps `start`..`end` of a run into RUN/zoom/start-end, snapshotting every `every` steps, and check
    that every step the run also has is byte-identical to the run's snapshot."""
    run = RunFiles(run_dir)
    zoom_dir = prepare(run, start, end, every)
    resume = resume_checkpoint(zoom_dir.root) or checkpoint_at_or_before(run, start)  # a killed zoom: its own
    fit_cli(["--config", str(zoom_dir.config), "--ckpt_path", str(resume)])
    if rank_zero_only.rank == 0:
        check_identical(run, zoom_dir)
    return zoom_dir


def check_identical(run: RunFiles, zoom_dir: RunFiles) -> list[int]:
    """The steps the zoom shares with the run, each byte-identical (sha256); a DynascopeError names any that is
    not."""
    ours, theirs = read_manifest(zoom_dir.root), read_manifest(run.root)
    shared = sorted(ours.keys() & theirs.keys())
    differ = [s for s in shared if ours[s]["sha256"] != theirs[s]["sha256"]]
    if differ:
        raise DynascopeError(f"zoom {zoom_dir.root}: the snapshots of steps {differ} differ from the run's "
                             f"({run.snapshot(differ[0])}): the retraining did not retrace the run (another "
                             "number of threads or devices, non-deterministic kernels?); its points say nothing "
                             "about the run")
    return shared
