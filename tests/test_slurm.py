"""The Slurm templates on a real one-node cluster (slurm/cluster.sh): a job signalled as before a time
limit checkpoints, requeues itself and resumes to the exact losses of an uninterrupted run, with 1 task
and with 2 (DDP); an array job's sharded analysis merges into the one-process table.

The cluster needs root (it installs and starts slurm-wlm and munge); without it these tests are
skipped, unless DYNASCOPE_REQUIRE_SLURM is set (CI sets it), which makes that a failure.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_args

from dynascope.core.records import read_csv, read_metrics, read_table
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest

REPO = Path(__file__).parents[1]
STEPS = 600  # long enough to be signalled while it trains
SCHEDULE = [0, 1, 2, 4, 8, 16, 200, 400, 600]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    started = subprocess.run([str(REPO / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        reason = f"no Slurm test cluster: {started.stderr.strip()[-500:]}"
        if os.environ.get("DYNASCOPE_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    conf = subprocess.run([str(REPO / "slurm" / "cluster.sh"), "env"], capture_output=True, text=True).stdout
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # jobs start wandb services of their own
    return env | {"SLURM_CONF": conf.strip().split("=", 1)[1], "DYNASCOPE_VENV": str(Path(sys.executable).parents[1])}


def job(slurm: dict, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a mapping (finished jobs stay listed for MinJobAge = 10 minutes)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shlex.split(out) if "=" in field)


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def fit_args(corpus_file: Path, run: Path, *extra: str) -> list[str]:
    return tiny_args(corpus_file, run, STEPS, "--dynamics.analyses", "basic", "--trainer.accelerator", "cpu",
                     "--snapshots.log_cap", "16", "--snapshots.every", "200", "--checkpoints.every_n_steps", "250",
                     *extra)[3:]  # after `fit --config CONFIG`


def preempted_job(slurm: dict, corpus_file: Path, run: Path, tasks: int) -> dict[str, str]:
    """Submit slurm/train.sbatch, signal it as Slurm does before a time limit, let the requeued job
    finish; returns its `scontrol show job`."""
    out = run.parent / f"slurm-{tasks}.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--ntasks-per-node={tasks}", "--cpus-per-task=1",
                                "--gres=none", f"--output={out}", "slurm/train.sbatch", "configs/tiny-relu.yaml",
                                *fit_args(corpus_file, run)], cwd=REPO, env=slurm, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        wait_for(lambda: (RunFiles(run).snapshot(16)).exists(), "the job to train to step 16")
        subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True)
        wait_for(lambda: job(slurm, job_id).get("Restarts") == "1", "the requeue")
        wait_for(lambda: job(slurm, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job")
    except BaseException:
        subprocess.run(["scancel", job_id], env=slurm)
        raise
    info = job(slurm, job_id)
    print(f"scontrol show job {job_id}: Restarts={info['Restarts']} JobState={info['JobState']} "
          f"ExitCode={info['ExitCode']}")
    return info | {"output": out.read_text()}


def losses(run: Path) -> dict[int, float]:
    return {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_preempted_job_requeues_and_resumes_to_the_uninterrupted_losses(tasks, slurm, tmp_path, corpus_file):
    run = tmp_path / "run"
    info = preempted_job(slurm, corpus_file, run, tasks)
    assert (info["Restarts"], info["JobState"], info["ExitCode"]) == ("1", "COMPLETED", "0:0"), info["output"]
    assert "requeued Slurm job" in info["output"] and "attempt 2" in info["output"]
    reference = tmp_path / "uninterrupted"  # the same run in one go, on as many single-threaded processes
    subprocess.run([str(Path(sys.executable).parent / "dynascope"), "fit", "--config", "configs/tiny-relu.yaml",
                    *fit_args(corpus_file, reference, "--trainer.devices", str(tasks), "--trainer.strategy", "ddp")],
                   cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True)
    assert losses(run) == losses(reference) and sorted(losses(run)) == list(range(STEPS))
    assert sorted(read_manifest(run)) == SCHEDULE
    seen = [(r["trainer/global_step"], k) for r in read_metrics(run) for k in r if k != "trainer/global_step"]
    assert len(seen) == len(set(seen))  # no (step, key) twice
    ids = {p.name.split("-")[3] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and ids == {(RunFiles(run).wandb_id).read_text()}


def test_an_array_job_analysis_merges_into_the_one_process_table(slurm, tmp_path, corpus_file):
    run = tmp_path / "run"
    subprocess.run([str(Path(sys.executable).parent / "dynascope"), "fit", "--config", "configs/tiny-relu.yaml",
                    *fit_args(corpus_file, run)], cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, check=True,
                   capture_output=True)
    one = tmp_path / "one"
    shutil.copytree(run, one)
    subprocess.run([str(Path(sys.executable).parent / "dynascope"), "analyze", str(one), "--no_plot"], check=True,
                   capture_output=True)
    sbatch = ["sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", f"--output={tmp_path}/analyze-%A_%a.out"]
    array = subprocess.run([*sbatch, "--array=0-2", "slurm/analyze.sbatch", str(run)], cwd=REPO, env=slurm,
                           capture_output=True, text=True, check=True).stdout.strip()
    merge = subprocess.run([*sbatch, f"--dependency=afterok:{array}", "slurm/analyze.sbatch", str(run), "--merge",
                            "--no_plot"], cwd=REPO, env=slurm, capture_output=True, text=True, check=True)
    merge = merge.stdout.strip()
    wait_for(lambda: job(slurm, merge).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the merge")
    assert job(slurm, merge)["JobState"] == "COMPLETED", [p.read_text() for p in tmp_path.glob("analyze-*.out")]
    merged = {int(r["step"]): r for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    expected = {int(r["step"]): r for r in read_csv(RunFiles(one).analysis.metrics_csv)}
    assert sorted(merged) == SCHEDULE == sorted(expected)
    for step, row in expected.items():
        values = {k: v for k, v in merged[step].items() if k != "label"}
        assert values == pytest.approx({k: v for k, v in row.items() if k != "label"}, rel=1e-6, nan_ok=True), step
    for path in RunFiles(one).analysis.tables.glob("*.jsonl"):
        assert [e["step"] for e in read_table(RunFiles(run).analysis.tables / path.name)] == SCHEDULE
