"""`dynascope sweep` and `dynascope compare`: a 2×2 grid trained here, its runs compared on one page, the
seed pair as one band, names from the settings that differ; the Slurm array path without a cluster (a
fake srun runs the template's array task) and, with DYNASCOPE_REQUIRE_SLURM, on the test cluster."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_slurm
import yaml
from helpers import tiny_args
from matplotlib.collections import PolyCollection
from test_slurm import job, wait_for

from dynascope.cli import main
from dynascope.core.io import write_json
from dynascope.core.records import read_metrics
from dynascope.core.runfiles import RunFiles
from dynascope.outputs.files import write_csv
from dynascope.pages.compare import compare_figures, event_rows, load_groups
from dynascope.train.sweep import sweep

slurm = test_slurm.slurm  # the test cluster's fixture

REPO = Path(__file__).parents[1]
GRID = "seed=1,2 model.arch.activation=relu,gelu"
RUNS = {"seed=1,activation=relu": (1, "relu"), "seed=1,activation=gelu": (1, "gelu"),
        "seed=2,activation=relu": (2, "relu"), "seed=2,activation=gelu": (2, "gelu")}
SNAPSHOTS = [0, 1, 2, 4, 6, 8]  # 8 steps, log_cap 4, every 3


def fit_args(corpus_file: Path, *extra: str) -> list[str]:
    """The tiny run's fit arguments, without `fit --config C --trainer.default_root_dir D` (the sweep's)."""
    return tiny_args(corpus_file, Path("unused"), 8, "--dynamics.analyses", "basic,outliers,sparsity", *extra)[5:]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "act-vs-seed"
    main(["sweep", "--config", "configs/tiny-relu.yaml", "--grid", GRID, "--out", str(out), *fit_args(corpus_file)])
    return out


def test_a_sweep_trains_one_run_per_combination(swept):
    assert sorted(p.name for p in swept.iterdir() if p.is_dir()) == sorted(RUNS)
    loss0 = {}
    for name, (seed, activation) in RUNS.items():
        run = swept / name
        config = yaml.safe_load((RunFiles(run).config).read_text())
        assert (config["seed_everything"], config["data"]["seed"]) == (seed, seed)
        assert config["model"]["arch"]["activation"] == activation
        assert config["trainer"]["default_root_dir"] == str(run) and config["trainer"]["max_steps"] == 8
        rows = read_metrics(run)
        assert sorted(r["trainer/global_step"] for r in rows if "train/loss" in r) == list(range(8))
        assert sorted(r["trainer/global_step"] for r in rows if "basic/probe_loss" in r) == SNAPSHOTS
        loss0[name] = next(r["basic/probe_loss"] for r in rows if r["trainer/global_step"] == 0)
        assert config["wandb_group"] == "act-vs-seed"  # the group and tags its wandb run was given
        assert {f"seed={seed}", f"activation={activation}"} <= set(config["wandb_tags"])
    # the seed reached the initialisation: the two seeds start from different weights
    assert abs(loss0["seed=1,activation=relu"] - loss0["seed=2,activation=relu"]) > 1e-4


def test_compare_draws_the_seed_pair_as_one_band(swept):
    runs = [swept / "seed=1,activation=relu", swept / "seed=2,activation=relu", swept / "seed=1,activation=gelu"]
    groups = load_groups(runs)
    assert [(g.label, g.names) for g in groups] == [
        ("activation=relu", ["activation=relu, seed=1", "activation=relu, seed=2"]),
        ("activation=gelu, seed=1", ["activation=gelu, seed=1"])]
    figures = dict(compare_figures(groups))
    assert set(figures) == {"basic", "outliers", "sparsity"}
    ax = figures["basic"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"activation=relu (2 seeds)", "activation=gelu, seed=1"}
    assert ax.get_ylabel() == "probe loss"  # every panel says what its y axis is
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 1  # one band: the seed pair's
    losses = [{r["trainer/global_step"]: r["basic/probe_loss"] for r in read_metrics(run) if "basic/probe_loss" in r}
              for run in runs]
    tokens = [s * 4 * 32 for s in SNAPSHOTS]  # batch 4 × context 32 per step
    pair = np.array([[losses[i][s] for s in SNAPSHOTS] for i in (0, 1)])
    assert list(lines["activation=relu (2 seeds)"].get_xdata()) == tokens
    np.testing.assert_allclose(lines["activation=relu (2 seeds)"].get_ydata(), pair.mean(0))
    np.testing.assert_allclose(lines["activation=gelu, seed=1"].get_ydata(), [losses[2][s] for s in SNAPSHOTS])
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(pair.min()) and band[:, 1].max() == pytest.approx(pair.max())
    # per-layer metrics: the first and the last layer, each its own panel
    titles = [a.get_title() for a in figures["sparsity"].axes if a.get_title()]
    assert {"sparsity/batch_usage/L0 (first layer measured)", "sparsity/batch_usage/L1 (last layer measured)"} <= set(
        titles)


def test_the_compare_page_holds_each_runs_events_and_the_spread_over_seeds(swept, tmp_path, capsys):
    runs = [swept / "seed=1,activation=relu", swept / "seed=2,activation=relu", swept / "seed=1,activation=gelu"]
    for run, events in zip(runs, [{"outliers/emergence_step": 4.0, "frequency/converged_step": None},
                                  {"outliers/emergence_step": 6.0, "outliers/emergence_revisions": 2.0,
                                   "frequency/converged_step": 8.0},
                                  {"outliers/emergence_step": 2.0}], strict=True):
        write_json(RunFiles(run).summary, events)
    assert event_rows(load_groups(runs)) == (["frequency/converged_step", "outliers/emergence_step"], [
        ("activation=relu (2 seeds)", True, ["8 (1 of 2)", "4–6"]),
        ("activation=relu, seed=1", False, ["none", "4"]),
        ("activation=relu, seed=2", False, ["8", "6 (revised 2×)"]),
        ("activation=gelu, seed=1", False, ["—", "2"])])
    main(["compare", *map(str, runs), "--out", str(tmp_path / "page")])
    index = tmp_path / "page" / "index.html"
    assert str(index) in capsys.readouterr().out
    page = index.read_text()
    cells = re.findall(r"<tr class='(?:group|run)'><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    assert cells[:2] == [("activation=relu (2 seeds)", "8 (1 of 2)", "4–6"), ("activation=relu, seed=1", "none", "4")]
    assert page.count("data:image/png;base64,") == len(list(index.parent.glob("*.png"))) == 3
    assert "<h1>dynascope compare: 3 runs, 2 settings (the seeds of each drawn together)</h1>" in page
    main(["compare", *map(str, runs[:2]), "--out", str(tmp_path / "pair")])
    pair = (tmp_path / "pair" / "index.html").read_text()
    assert "<h1>dynascope compare: 2 runs, the seeds of one setting</h1>" in pair
    with pytest.raises(SystemExit) as exit_info:  # one run given twice is not a group of two seeds
        main(["compare", str(runs[0]), f"{runs[0]}/", "--out", str(tmp_path / "twice")])
    assert exit_info.value.code == 2 and "are the same run; give each run once" in capsys.readouterr().err


def test_an_analyze_hf_directory_is_named_by_its_directory_and_drawn_by_step(swept, tmp_path):
    hf = tmp_path / "pythia-70m"  # what `analyze --hf` writes: no config, no token counts, steps from the labels
    write_csv(hf / "metrics.csv", [{"step": s, "tokens_seen": math.nan, "label": f"step{s}", "basic/probe_loss": y}
                                   for s, y in [(0, 10.9), (1000, 4.2), (143000, 3.1)]])
    groups = load_groups([swept / "seed=1,activation=relu", hf])
    assert [g.label for g in groups] == ["seed=1,activation=relu", "pythia-70m"]  # nothing to tell runs apart: dirs
    ax = dict(compare_figures(groups))["basic"].axes[0]
    assert ax.get_xlabel() == "step"
    assert list(next(line for line in ax.get_lines() if line.get_label() == "pythia-70m").get_xdata()) == [0, 1000,
                                                                                                           143000]


def test_compare_refuses_a_directory_that_holds_no_run(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "notes"), "--out", str(tmp_path / "page")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'notes'} is neither a run directory" in err and not (tmp_path / "page").exists()


def fake(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def test_a_slurm_sweep_is_one_array_job_whose_tasks_read_their_runs(tmp_path, corpus_file, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake(bin_dir, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args; env > {tmp_path}/sbatch.env; echo 4242')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "grid"
    job = sweep("configs/tiny-relu.yaml", {"seed": ["1", "2"], "model.arch.activation": ["relu", "gelu"]}, out,
                ["--trainer.max_steps", "8"], slurm=True, sbatch_args=["--gres=none"])
    assert job == "4242"
    args = (tmp_path / "sbatch.args").read_text().splitlines()
    assert args[:2] == ["--parsable", "--array=0-3"] and "--gres=none" in args
    assert args[-4:] == [str(REPO / "slurm" / "train.sbatch"), "configs/tiny-relu.yaml", "--trainer.max_steps", "8"]
    env = dict(line.split("=", 1) for line in (tmp_path / "sbatch.env").read_text().splitlines() if "=" in line)
    assert env["WANDB_RUN_GROUP"] == "grid" and env["DYNASCOPE_SWEEP"] == str(out / "sweep.tsv")
    # array task 2 of the template, with srun faked: the fit it starts trains the third run of the grid
    fake(bin_dir, "srun", f'echo "WANDB_TAGS=$WANDB_TAGS $*" >> {tmp_path}/srun.log')
    slurm_env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4243",
                 "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", "DYNASCOPE_VENV": sys.prefix}
    subprocess.run(["bash", *args[-4:]], env={**env, **slurm_env}, check=True, capture_output=True)
    prepare, fit = (tmp_path / "srun.log").read_text().splitlines()
    assert prepare.startswith("WANDB_TAGS=seed=2,activation=relu --ntasks=1 --nodes=1 dynascope prepare")
    assert fit.endswith("--ckpt_path auto --trainer.max_steps 8 --seed_everything=2 --data.seed=2 "
                        f"--model.arch.activation=relu --trainer.default_root_dir={out}/seed=2,activation=relu")


@pytest.mark.skipif(not os.environ.get("DYNASCOPE_REQUIRE_SLURM"), reason="needs the Slurm test cluster "
                    "(slurm/cluster.sh): set DYNASCOPE_REQUIRE_SLURM")
def test_a_slurm_sweep_trains_on_the_test_cluster(slurm, tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.setenv("DYNASCOPE_VENV", slurm["DYNASCOPE_VENV"])
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # the jobs start wandb services of their own
    out = tmp_path / "seeds"
    job_id = sweep("configs/tiny-relu.yaml", {"seed": [1, 2]}, out, fit_args(corpus_file, "--trainer.accelerator",
                   "cpu"), slurm=True, sbatch_args=["--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"])
    tasks = [f"{job_id}_{i}" for i in range(2)]
    wait_for(lambda: all(job(slurm, t).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") for t in tasks),
             "the array job")
    assert [job(slurm, t)["JobState"] for t in tasks] == ["COMPLETED"] * 2, [p.read_text() for p in out.glob("*.out")]
    for seed in (1, 2):
        run = out / f"seed={seed}"
        assert yaml.safe_load((RunFiles(run).config).read_text())["seed_everything"] == seed
        assert sorted(r["trainer/global_step"] for r in read_metrics(run) if "basic/probe_loss" in r) == SNAPSHOTS
