"""Faults a run directory survives. Each asserts its invariant: the files already there are unchanged,
or the run resumes to the per-step losses of an uninterrupted run, or every (step, key) appears once."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import copy_run, tiny_args

from dynascope.cli import main
from dynascope.core.records import read_csv, read_metrics, read_table
from dynascope.core.rundir import RunLock, release_locks, resume_checkpoint
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest

EXE = str(Path(sys.executable).parent / "dynascope")
TOKENS_PER_STEP = 4 * 32  # tiny_args: batch 4 of 32 tokens, one rank


def hashes(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def once_per_step_and_key(rows: list[dict]) -> bool:
    """No (step, key) twice; wandb's own `_step`, `_timestamp` and `_runtime` are in every row."""
    seen = [(r["trainer/global_step"], k) for r in rows for k in r if k != "trainer/global_step" and k[0] != "_"]
    return len(seen) == len(set(seen))


@pytest.fixture
def run(tiny_run, tmp_path):
    return copy_run(tiny_run, tmp_path)


def test_fit_into_a_directory_that_holds_a_run_refuses_and_writes_nothing(run, corpus_file, capsys):
    before = hashes(run)
    err = refused(capsys, tiny_args(corpus_file, run, 7))
    assert "already holds a run" in err and "--ckpt_path last" in err and "--start_over" in err
    assert hashes(run) == before


def test_start_over_moves_the_old_run_aside_whole(run, corpus_file, capsys):
    before = hashes(run)
    main(tiny_args(corpus_file, run, 2, "--dynamics.analyses", "basic", "--start_over", "true"))
    (moved,) = [p for p in run.parent.iterdir() if p.name.startswith(run.name + ".")]
    assert str(moved) in capsys.readouterr().out
    assert hashes(moved) == before  # nothing of the old run is lost
    assert sorted(read_manifest(run)) == [0, 1, 2]  # the new run, from scratch


@pytest.mark.parametrize("change", [["--model.arch.n_layers", "3"], ["--model.lr", "0.01"], ["--seed_everything", "7"],
                                    ["--data.batch_size", "8"], ["--trainer.max_steps", "9"]],
                         ids=["architecture", "optimizer", "seed", "data", "schedule"])
def test_resume_with_another_trajectory_refuses_before_writing(change, run, corpus_file, capsys):
    before = hashes(run)
    err = refused(capsys, tiny_args(corpus_file, run, 7, "--ckpt_path", "last", *change))
    assert "cannot resume" in err and change[0].lstrip("-") in err
    assert hashes(run) == before  # config.yaml included


def test_resume_of_a_mistyped_directory_is_an_error_and_creates_nothing(tmp_path, corpus_file, capsys):
    err = refused(capsys, tiny_args(corpus_file, tmp_path / "typo", 7, "--ckpt_path", "last"))
    assert "no resume checkpoint" in err and not (tmp_path / "typo").exists()


def test_a_garbage_manifest_line_is_named_before_training(run, corpus_file, capsys):
    manifest = RunFiles(run).manifest
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:3]) + "garbage\n" + "".join(lines[3:]))
    before = hashes(run)
    err = refused(capsys, tiny_args(corpus_file, run, 9, "--ckpt_path", "last", "--trainer.max_steps", "7"))
    assert f"{manifest} line 4" in err
    assert hashes(run) == before  # no step trained, no snapshot orphaned


def test_a_directory_in_use_is_refused_and_released_when_its_holder_dies(run, corpus_file, capsys):
    holder = subprocess.Popen([sys.executable, "-c", f"from dynascope.core.rundir import RunLock; "
                               f"lock = RunLock(__import__('pathlib').Path({str(run)!r})); print('held', flush=True); "
                               "import time; time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = hashes(run)
        err = refused(capsys, tiny_args(corpus_file, run, 7, "--ckpt_path", "last"))
        assert "is in use by dynascope fit (pid" in err and hashes(run) == before
    finally:
        holder.kill()  # as kill -9: the kernel drops the lock with the process
        holder.wait()
    RunLock(run).release()  # free again


def test_a_checkpoint_save_cut_short_leaves_the_previous_one(run, monkeypatch):
    from lightning.fabric.plugins import TorchCheckpointIO

    from dynascope.callbacks.resume import AtomicCheckpointIO

    last = RunFiles(run).last_checkpoint
    before = hashlib.sha256(last.read_bytes()).hexdigest()

    def disk_full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"global_step": 99}, last)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before and not list(last.parent.glob(".*tmp*"))
    newest = last.parent / "step_00000099.ckpt"
    newest.write_bytes(b"PK\x03\x04 a truncated newer checkpoint")  # e.g. a copy cut short
    assert resume_checkpoint(run) == last  # --ckpt_path last picks a complete one


def test_last_checkpoint_is_the_final_step(tiny_run):
    ckpt = torch.load(RunFiles(tiny_run).last_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 7  # the run ends at 7, between periodic checkpoints (every 4)


def test_one_definition_of_tokens_seen_in_every_row(tiny_run):
    steps = {}  # each step's values, its training and analysis rows together
    for row in read_metrics(tiny_run):
        steps.setdefault(row["trainer/global_step"], {}).update(row)
    assert sorted(s for s, values in steps.items() if "train/loss" in values) == list(range(7))
    assert all(values["tokens_seen"] == step * TOKENS_PER_STEP for step, values in steps.items())
    assert all(row["tokens_seen"] == step * TOKENS_PER_STEP for step, row in read_manifest(tiny_run).items())


def test_analysing_again_or_in_part_keeps_one_value_per_step_and_key(run, capsys):
    full = {r["step"]: r for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    main(["analyze", str(run), "--no_plot", "--redo"])  # everything measured again
    main(["analyze", str(run), "--steps", "4", "--analyses", "basic", "--no_plot", "--redo"])
    again = read_csv(RunFiles(run).analysis.metrics_csv)
    assert [r["step"] for r in again] == sorted(full)  # merged: every step still there, once
    for row in again:
        values = {k: v for k, v in row.items() if k != "label"}
        assert values == pytest.approx({k: full[row["step"]][k] for k in values}, nan_ok=True), row["step"]
    for table in RunFiles(run).analysis.tables.glob("*.jsonl"):
        steps = [e["step"] for e in read_table(table)]
        assert steps == sorted(set(steps)), table


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def test_kill_9_then_resume_gives_the_uninterrupted_losses_and_one_value_per_step_and_key(tmp_path, corpus_file):
    steps = 12  # snapshots 0, 1, 2, 4, 6, 9, 12; checkpoints 4, 8, 12
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    main(tiny_args(corpus_file, whole, steps))
    own_service = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # as a process of its own
    proc = subprocess.Popen([EXE, *tiny_args(corpus_file, killed, steps)], env=own_service, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # wandb offline, as the resumed run
    wait_for(RunFiles(killed).snapshot(9), proc)  # past the checkpoint at step 8
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(resume_checkpoint(killed), map_location="cpu", weights_only=False)["global_step"] == 8
    main(tiny_args(corpus_file, killed, steps, "--ckpt_path", "last"))
    rows = read_metrics(killed)
    losses = {r["trainer/global_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses == {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(whole) if "train/loss" in r}
    assert once_per_step_and_key(rows) and sorted(read_manifest(killed)) == [0, 1, 2, 4, 6, 9, 12]
    for table in RunFiles(killed).tables.glob("*.jsonl"):
        assert [e["step"] for e in read_table(table)] == [0, 1, 2, 4, 6, 9, 12], table
    run_id = RunFiles(killed).wandb_id.read_text().strip()  # the killed run's and the resumed run's offline runs
    assert len(list(killed.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2
    online = {r["trainer/global_step"]: r for r in rows if "dynamics/seconds" in r}
    reference = {r["trainer/global_step"]: r for r in read_metrics(whole) if "dynamics/seconds" in r}
    assert online[12]["basic/probe_loss"] == reference[12]["basic/probe_loss"]


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([EXE, *tiny_args(corpus_file, run, 100000, "--dynamics.analyses", "basic")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(RunFiles(run).snapshot(6), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "resume with --ckpt_path last" in proc.stderr.read()
    ckpt = torch.load(resume_checkpoint(run), map_location="cpu", weights_only=False)
    assert 6 <= ckpt["global_step"] < 100000
    assert ckpt["global_step"] >= max(read_manifest(run))  # nothing snapshotted beyond what can be resumed
    release_locks()


def test_a_snapshot_of_another_trajectory_is_named_and_left_out(run, capsys):
    import json

    from dynascope.core.io import read_yaml
    from dynascope.core.settings import trajectory_hash

    manifest = RunFiles(run).manifest
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["trajectory_hash"] for r in rows} == {trajectory_hash(read_yaml(RunFiles(run).config))}
    rows[3]["trajectory_hash"] = "0123456789abcdef"  # step 4, as if another trajectory had written it
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(run), "--no_plot", "--redo"])
    assert exit_info.value.code == 1 and "step_00000004.safetensors belongs to another trajectory" in \
        capsys.readouterr().err
