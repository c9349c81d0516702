"""The third fault catalogue: divergence, OS errors, concurrent commands, resume options, odd values, pages and
untrusted files. Each bad input asserts its exit code, one line with no traceback naming the file or option;
each fault asserts its invariant (files unchanged, rows complete, nothing measured on what is not there)."""

import fcntl
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import copy_run, tiny_args

from dynascope.cli import main
from dynascope.core.records import read_csv, read_metrics
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest

REPO = Path(__file__).parents[1]


def fails(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI, expecting exit `code` and one line on stderr without a traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("dynascope")]
    assert exit_info.value.code == code and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def dynascope(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynascope.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=os.environ | (env or {}))


# --- divergence ---------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_at_the_step_and_says_so(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    line = fails(tiny_args(corpus_file, run, 6, "--model.lr", "1e30", "--model.warmup_steps", "0"), capsys, code=3)
    step = json.loads(RunFiles(run).summary.read_text())["train/diverged_step"]
    assert line.startswith(f"dynascope: training diverged at step {step:.0f}: the loss is ")
    assert "--stop_on_divergence false" in line and 1 <= step < 6
    assert all(not row.get("nonfinite") for row in read_manifest(run).values())  # nothing non-finite was written


def test_a_run_that_goes_on_marks_nonfinite_snapshots_and_nothing_is_measured_on_them(tmp_path, corpus_file):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 6, "--model.lr", "1e30", "--model.warmup_steps", "0",
                   "--stop_on_divergence", "false"))
    manifest = read_manifest(run)
    bad = sorted(s for s, row in manifest.items() if row.get("nonfinite"))
    assert bad and bad[-1] == 6 and 0 not in bad
    online = {r["trainer/global_step"] for r in read_metrics(run) if "basic/probe_loss" in r}
    assert online == set(manifest) - set(bad)  # no "findings" on NaN weights online
    main(["analyze", str(run), "--analyses", "basic,sparsity", "--no_plot"])
    offline = {int(r["step"]) for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    assert offline == set(manifest) - set(bad)
    # the first non-finite loss comes a step before the first non-finite weights (its update makes them)
    assert json.loads(RunFiles(run).summary.read_text())["train/diverged_step"] == bad[0] - 1
    main(["report", str(run)])
    assert f"diverged at step {bad[0] - 1} (a non-finite training loss" in (RunFiles(run).report / "index.html"
                                                                           ).read_text()


def test_loss_spikes_are_events_and_their_window_survives_a_resume():
    from dynascope.callbacks.stability import LossSpikes

    losses = [5.0 + 0.01 * (i % 3) for i in range(40)] + [9.0] + [5.0] * 10 + [12.0]
    whole = LossSpikes(window=32, threshold=6.0, min_steps=8)
    flagged = [i for i, x in enumerate(losses) if whole.judge(x) is not None]
    assert flagged == [40, 51]
    first, second = LossSpikes(window=32, threshold=6.0, min_steps=8), LossSpikes(window=32, threshold=6.0, min_steps=8)
    before = [i for i, x in enumerate(losses[:45]) if first.judge(x) is not None]
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through a checkpoint
    after = [45 + i for i, x in enumerate(losses[45:]) if second.judge(x) is not None]
    assert before + after == flagged


# --- OS errors ------------------------------------------------------------------------------------------------

def test_a_full_disk_during_a_snapshot_is_one_line_and_leaves_the_previous_files_whole(tmp_path, corpus_file,
                                                                                       capsys, monkeypatch):
    from safetensors import SafetensorError

    from dynascope.core import snapshots

    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 2, "--model.decay_steps", "8"))
    before = {p.name: p.read_bytes() for p in RunFiles(run).snapshots.iterdir()}
    real = snapshots.save_file

    def full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # what a full disk leaves: part of the file, then the error
            f.truncate(100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(snapshots, "save_file", full)
    line = fails(tiny_args(corpus_file, run, 4, "--ckpt_path", "last", "--model.decay_steps", "8"), capsys)
    assert "No space left on device" in line and str(RunFiles(run).snapshot(4)) in line and "free" in line
    after = {p.name: p.read_bytes() for p in RunFiles(run).snapshots.iterdir()}
    assert after == before  # no temporary file, no half snapshot, the manifest unchanged


def test_an_os_error_anywhere_is_one_line_naming_the_file(tmp_path, corpus_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = fails(tiny_args(corpus_file, blocker / "run", 2), capsys)
    assert str(blocker / "run") in line
    line = fails(["sync", str(blocker)], capsys)
    assert str(blocker) in line


# --- concurrent commands ------------------------------------------------------------------------------------

def test_two_analyses_of_one_run_lose_no_row(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    RunFiles(run).analysis.metrics_csv.unlink()
    both = [subprocess.Popen([sys.executable, "-m", "dynascope.cli", "analyze", str(run), "--no_plot", "--analyses",
                              names], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for names in ("basic", "sparsity")]
    outs = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], [o[1][-800:] for o in outs]
    rows = read_csv(RunFiles(run).analysis.metrics_csv)
    assert {int(r["step"]) for r in rows} == set(read_manifest(run))
    assert all(r["basic/probe_loss"] == r["basic/probe_loss"] and "sparsity/batch_usage/L0" in r for r in rows)


def test_analyze_of_a_run_still_training_measures_nothing_against_a_final_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    RunFiles(run).analysis.metrics_csv.unlink()
    with open(RunFiles(run).lock, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running fit holds it
        done = dynascope("analyze", str(run), "--redo", "--no_plot", "--analyses", "frequency", "--steps", "0,7")
    assert done.returncode == 0, done.stderr[-1000:]
    assert "is still training" in done.stderr
    rows = read_csv(RunFiles(run).analysis.metrics_csv)
    assert {int(r["step"]) for r in rows} == {0, 7} and all(r["frequency/r2_corpus"] == r["frequency/r2_corpus"]
                                                           for r in rows)
    assert all(r.get("frequency/dist_to_final", float("nan")) != r.get("frequency/dist_to_final") for r in rows)
    assert json.loads(RunFiles(run).analysis.summary.read_text())["analysis/partial"] is True


# --- resume ---------------------------------------------------------------------------------------------------

def test_resume_refuses_a_changed_analysis_option_and_a_missing_snapshot(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 4, "--model.decay_steps", "8"))
    config = RunFiles(run).config.read_bytes()
    line = fails(tiny_args(corpus_file, run, 6, "--ckpt_path", "last", "--model.decay_steps", "8",
                           "--dynamics.probe_windows", "8"), capsys)
    assert "dynamics.probe_windows" in line and RunFiles(run).config.read_bytes() == config
    RunFiles(run).snapshot(2).unlink()
    line = fails(tiny_args(corpus_file, run, 6, "--ckpt_path", "last", "--model.decay_steps", "8"), capsys)
    assert str(RunFiles(run).snapshot(2)) in line and "missing" in line


# --- odd values -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, option", [
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches"),
    (["--model.arch.context_length", "1"], "model.arch.context_length"),
    (["--dynamics.probe_windows", "0"], "dynamics.probe_windows"),
])
def test_odd_fit_values_are_refused_where_parsed(tmp_path, corpus_file, capsys, extra, option):
    line = fails(tiny_args(corpus_file, tmp_path / "run", 2, *extra), capsys)
    assert option in line and not (tmp_path / "run" / "snapshots").exists()


@pytest.mark.parametrize("argv, option", [
    (["analyze", "RUN", "--batch_size", "0"], "--batch_size"),
    (["analyze", "RUN", "--devices", "0"], "--devices"),
    (["zoom", "RUN", "--from", "0", "--to", "4", "--every", "0"], "--every"),
    (["batch", "RUN", "--step", "1", "--rank", "-1"], "--rank"),
])
def test_odd_command_values_are_refused_where_parsed(tiny_run, capsys, argv, option):
    line = fails([str(tiny_run) if a == "RUN" else a for a in argv], capsys)
    assert option in line


# --- pages ------------------------------------------------------------------------------------------------------

def test_compare_of_runs_without_a_common_step_draws_each_at_its_own(tiny_run, tmp_path):
    from dynascope.outputs.files import write_csv

    hf = tmp_path / "suite"
    write_csv(hf / "metrics.csv", [{"step": s, "tokens_seen": float("nan"), "label": f"step{s}",
                                    "basic/probe_loss": y} for s, y in [(1000, 4.0), (2000, 3.5), (3000, 3.2)]])
    main(["compare", str(tiny_run), str(hf), "--out", str(tmp_path / "page")])
    assert (tmp_path / "page" / "basic.png").stat().st_size > 1000


# --- untrusted files ----------------------------------------------------------------------------------------------

def test_a_planted_pickle_runs_no_code_whatever_the_environment_says(tmp_path, corpus_file):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 2, "--model.decay_steps", "8"))
    marker = tmp_path / "pwned"
    payload = (f"import os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               "import torch\ntorch.save({'x': P()}, '" + str(RunFiles(run).last_checkpoint) + "')\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    assert zipfile.is_zipfile(RunFiles(run).last_checkpoint)
    done = dynascope(*tiny_args(corpus_file, run, 4, "--ckpt_path", "last", "--model.decay_steps", "8"),
                     env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert not marker.exists()
    lines = [line for line in done.stderr.splitlines() if line.startswith("dynascope")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert str(RunFiles(run).last_checkpoint) in lines[-1]


def test_analyze_of_a_copied_run_reads_only_its_own_files(tiny_run, tmp_path, capsys, cache_dir, corpus_file):
    """Without its counts.npy, a run's analysis does not rebuild them from the data paths its config names (here:
    the test corpus, readable), which would read files and fill a cache outside the run."""
    run = copy_run(tiny_run, tmp_path / "copy")
    RunFiles(run).counts.unlink()
    assert str(corpus_file) in RunFiles(run).config.read_text()
    cached = sorted(cache_dir.rglob("*"))
    line = fails(["analyze", str(run), "--redo", "--no_plot"], capsys)
    assert str(RunFiles(run).counts) in line and sorted(cache_dir.rglob("*")) == cached


# --- the three known tracebacks ---------------------------------------------------------------------------------

def test_a_manifest_row_without_its_sha256_is_named(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    manifest = RunFiles(run).manifest
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    del rows[1]["sha256"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    RunFiles(run).snapshot(rows[1]["step"]).write_bytes(b"truncated")
    line = fails(["analyze", str(run), "--redo", "--no_plot"], capsys)
    assert str(manifest) in line and "sha256" in line


def test_probe_windows_longer_than_the_context_are_named(tiny_run, tmp_path, capsys):
    import torch

    from dynascope.core.probe import save_probe

    run = copy_run(tiny_run, tmp_path)
    save_probe(RunFiles(run).probe, torch.zeros(4, 64, dtype=torch.long))  # the tiny run's context is 32
    line = fails(["analyze", str(run), "--redo", "--no_plot"], capsys)
    assert str(RunFiles(run).probe) in line and "context (32)" in line


def test_plot_where_nothing_can_be_written_is_one_line(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = fails(["plot", str(tiny_run), "--out", str(blocker / "plots")], capsys)
    assert str(blocker / "plots") in line and "not writable" in line
