"""The run directory as a record: one trajectory per directory, checked before anything is written.

`prepare_run_dir` runs before `dynascope fit` writes anything. It refuses a directory that already
holds a run unless the run is resumed (`--ckpt_path`) or started over (`--start_over`, which moves
the old run aside, never deleting it); on resume it checks every setting that shapes the trajectory
(architecture, optimizer, schedule, data, seed, batch layout) against the run's config.yaml, and
reads every file of the run, so a bad one is named before training rather than at the next snapshot.
A `RunLock` then holds the directory for the life of the process.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
import zipfile
from pathlib import Path

from dynascope.core.data import load_tokenizer
from dynascope.core.errors import DynascopeError
from dynascope.core.io import read_json, read_jsonl, read_yaml
from dynascope.core.probe import load_probe
from dynascope.core.runfiles import RunFiles
from dynascope.core.settings import measured, trajectory
from dynascope.core.snapshots import read_manifest

_HELD: list[RunLock] = []  # this process's locks


class RunLock:
    """An exclusive lock on DIR/.lock until `release()` (or the end of a `with` block) or `release_locks()` (the
    kernel drops it when the process dies, however it dies). A fit refuses a directory another process holds; an
    analyze (`wait`) waits for it, so two commands writing one table never interleave."""

    def __init__(self, run_dir: Path, command: str = "dynascope fit", wait: bool = False):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = RunFiles(run_dir).lock
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            if not wait:
                self._file.close()
                raise DynascopeError(f"{run_dir} is in use by {holder}; wait for it to finish, or give another "
                                     "trainer.default_root_dir") from None
            print(f"dynascope: waiting for {holder} to finish with {run_dir}", file=sys.stderr, flush=True)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{command} (pid {os.getpid()})")
        self._file.flush()
        _HELD.append(self)

    def release(self) -> None:
        self._file.close()
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: Path) -> bool:
    """Whether a process (a running fit) holds RUN_DIR/.lock now."""
    lock = RunFiles(run_dir).lock
    if not lock.exists():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def release_locks() -> None:
    """Release every run directory this process holds (a `fit` call ended, however it ended)."""
    for lock in list(_HELD):
        lock.release()


def holds_run(run_dir: Path) -> bool:
    """Whether a fit has left snapshots or resume checkpoints in `run_dir`."""
    return bool(read_manifest(run_dir)) or any(RunFiles(run_dir).checkpoints.glob("*.ckpt"))


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete resume checkpoint: a checkpoint is a zip file whose central directory, written
    last, is intact (a save cut short has none)."""
    candidates = sorted(RunFiles(run_dir).checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if zipfile.is_zipfile(p)), None)


def move_aside(run_dir: Path) -> Path:
    """Rename a run directory to `<name>.<date-time>` beside it and return the new path."""
    target = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    while target.exists():
        target = target.with_name(target.name + "_")
    run_dir.rename(target)
    return target


def check_files(run_dir: Path) -> None:
    """Read every file of a run, so that a bad one is an error naming it (and its line) now."""
    run = RunFiles(run_dir)
    for step, row in read_manifest(run_dir).items():
        if not (run.snapshots / row["file"]).is_file():
            raise DynascopeError(f"snapshot {run.snapshots / row['file']} (step {step} of {run.manifest}) is missing; "
                                 "restore it from a copy of the run, or start a new run")
    read_jsonl(run.metrics_jsonl, "metrics log")
    for path in (run.summary, run.analysis.summary):
        if path.exists():
            read_json(path, "run summary")
    for path in run.table_files().values():
        read_jsonl(path, "table")
    if run.probe.exists():
        load_probe(run.probe)
    if run.tokenizer.exists():
        load_tokenizer(run.tokenizer)
    if run.wandb_id.exists() and not run.wandb_id.read_text().strip().isalnum():
        raise DynascopeError(f"{run.wandb_id} does not hold a wandb run id; restore it or delete it")


def resolve_checkpoint(run_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint a fit resumes from: `last` is the newest complete one of the run and must exist;
    `auto` is that one if there is one (a requeued job), else none (a first start)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        newest = resume_checkpoint(run_dir)
        return None if newest is None else str(newest)
    resumed = resume_checkpoint(run_dir) if ckpt_path == "last" else Path(ckpt_path)
    if resumed is None or not resumed.is_file():
        where = RunFiles(run_dir).checkpoints if ckpt_path == "last" else ckpt_path
        raise DynascopeError(f"--ckpt_path {ckpt_path}: no resume checkpoint at {where}; check "
                             "trainer.default_root_dir, or drop --ckpt_path to start a new run")
    return str(resumed)


def prepare_run_dir(run_dir: Path, config: dict, ckpt_path: str | None, start_over: bool) -> None:
    """Check `run_dir` for `config` before anything is written: a run resumed from `ckpt_path` (resolved)
    must keep its trajectory, a new one needs an empty directory or `start_over`."""
    if ckpt_path is not None:
        if start_over:
            raise DynascopeError("--ckpt_path resumes a run and --start_over starts a new one; give one of them")
        if not RunFiles(run_dir).config.exists():
            raise DynascopeError(f"--ckpt_path {ckpt_path}: {run_dir} has no config.yaml to resume with")
        old = read_yaml(RunFiles(run_dir).config, "run config")
        for what, settings in (("its trajectory", trajectory), ("what it measures", measured)):
            before, now = settings(old), settings(config)
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
                raise DynascopeError(f"cannot resume {run_dir} with settings that change {what} ({shown}"
                                     f"{'; ...' if len(changed) > 4 else ''}); resume with the run's settings, or "
                                     "start a new run in another directory")
        check_files(run_dir)
        return
    if holds_run(run_dir):
        if not start_over:
            steps = sorted(read_manifest(run_dir))
            held = (f"snapshots of steps {steps[0]}-{steps[-1]}" if steps
                    else f"checkpoints in {RunFiles(run_dir).checkpoints}")
            raise DynascopeError(f"{run_dir} already holds a run ({held}); resume it with --ckpt_path last, start "
                                 "over with --start_over true (the old run is moved aside), or give another "
                                 "trainer.default_root_dir")
        print(f"dynascope: moved the previous run to {move_aside(run_dir)}")
    elif start_over and run_dir.exists() and any(p != RunFiles(run_dir).lock for p in run_dir.iterdir()):
        print(f"dynascope: moved the previous run to {move_aside(run_dir)}")

