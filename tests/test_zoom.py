"""`dynascope zoom`: a stretch of a run retrained from a resume checkpoint with dense snapshots, byte-identical
where the run has the same step; its points in the run's table, onsets and report; and `dynascope onsets`."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import copy_run, tiny_args

from dynascope.cli import main
from dynascope.core.records import read_csv
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest

KEPT = ("--snapshots.log_cap", "32", "--snapshots.every", "100", "--checkpoints.at_snapshots", "true",
        "--checkpoints.every_n_steps", "0")  # resume checkpoints at 1, 2, 4, ..., 32


@pytest.fixture
def one_thread():
    """Bit-exact retraining in this process: one thread (two drift by ~1e-7 on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_file) -> Path:
    run = tmp_path_factory.mktemp("zoom") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(tiny_args(corpus_file, run, 40, *KEPT))
    finally:
        torch.set_num_threads(threads)
    return run


def files_of(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file() and "zoom" not in p.relative_to(run).parts and p.name != ".lock"}


def test_a_zoom_retraces_the_run_with_dense_snapshots_and_leaves_the_run_alone(run, tmp_path, one_thread, capsys):
    run = copy_run(run, tmp_path)
    before = files_of(run)
    main(["zoom", str(run), "--from", "16", "--to", "32", "--every", "2"])
    assert f"zoom: {RunFiles(run).zoom(16, 32).root}" in capsys.readouterr().out
    zoomed, parent = read_manifest(RunFiles(run).zoom(16, 32).root), read_manifest(run)
    assert sorted(zoomed) == [18, 20, 22, 24, 26, 28, 30, 32]
    assert zoomed[32]["sha256"] == parent[32]["sha256"]  # the same bytes as the run's own step 32
    assert files_of(run) == before  # nothing of the run was written

    main(["analyze", str(run)])  # the dense points join the run's table, onsets and report
    labels = {int(r["step"]): r["label"] for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    assert [labels[s] for s in (16, 18, 30, 32)] == ["16", "zoom 18", "zoom 30", "32"]
    page = (RunFiles(run).report / "index.html").read_text()
    assert "alt='onset_0'" in page and "dynascope zoom" in page
    capsys.readouterr()
    main(["onsets", str(run)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["event", "step", "bracket", "95%", "interval", "confidence", "guarded",
                                           "revised", "resolve", "with"]
    assert "frequency/encoded" in out and "sparsity/usage_dip" in out


def test_a_zoom_resolves_an_onset_from_its_bracket(run, tmp_path, one_thread, capsys):
    from dynascope.core.io import write_json

    run = copy_run(run, tmp_path)
    write_json(RunFiles(run).summary, {"x/event_step": 8.0, "x/event_bracket_lo": 4.0, "x/event_bracket_hi": 8.0})
    main(["zoom", str(run), "--onset", "x/event"])
    assert sorted(read_manifest(RunFiles(run).zoom(4, 8).root)) == [5, 6, 7, 8]
    assert read_manifest(RunFiles(run).zoom(4, 8).root)[8]["sha256"] == read_manifest(run)[8]["sha256"]


@pytest.mark.parametrize("args, named", [
    (["--from", "16", "--to", "99"], "--to 99: the run trains steps 0 to 40"),
    (["--from", "32", "--to", "16"], "--from must come before --to"),
    (["--from", "0", "--to", "8"], "--from 0: "),  # no resume checkpoint at or before step 0
    (["--onset", "nope/never"], "--onset nope/never: not an onset of"),
    (["--from", "16"], "give --from A and --to B, or --onset EVENT"),
], ids=["outside the run", "from after to", "no checkpoint", "unknown onset", "half a stretch"])
def test_a_bad_zoom_is_one_line_and_writes_nothing(run, args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["zoom", str(run), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and named in err
    assert not (run / "zoom").exists()


def test_a_zoom_of_a_two_process_ddp_run_is_byte_identical(tmp_path, corpus_file):
    run = tmp_path / "ddp"
    exe = str(Path(sys.executable).parent / "dynascope")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    subprocess.run([exe, *tiny_args(corpus_file, run, 20, *KEPT, *ddp, "--dynamics.analyses", "basic")], env=env,
                   check=True, capture_output=True, timeout=600)
    proc = subprocess.run([exe, "zoom", str(run), "--from", "8", "--to", "16", "--every", "4"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    zoomed = read_manifest(RunFiles(run).zoom(8, 16).root)
    assert sorted(zoomed) == [12, 16] and zoomed[16]["sha256"] == read_manifest(run)[16]["sha256"]
