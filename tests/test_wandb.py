"""What reaches wandb: a fit's run file read back once, end to end; the rest through a stand-in for wandb's
run (helpers.FakeWandb), which records what dynascope's wandb output sends."""

import glob
import itertools
import subprocess
import sys

import yaml
from helpers import copy_run, tiny_args, wandb_file

from dynascope.cli import main
from dynascope.core.records import read_metrics, read_table
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest
from dynascope.outputs.wandb_run import wandb_grouping


def test_a_fit_writes_its_offline_run_file(tmp_path, corpus_file):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 4, "--report", "true", "--snapshots.wandb_artifacts", "true"))
    run_id = RunFiles(run).wandb_id.read_text().strip()
    (path,) = glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    written = wandb_file(path)
    assert [sorted(a.aliases) for a in written["artifacts"] if a.type == "model"] == [
        ["latest", f"step{s}"] for s in sorted(read_manifest(run))]
    config = written["config"]  # the whole resolved config, architecture included
    assert config["model"]["arch"] == {**config["model"]["arch"], "activation": "relu", "n_layers": 2, "d_model": 32}
    assert config["dynamics"]["options"]["regions"] == {"pairs_per_window": 1}
    assert sorted(written["run"].tags) == ["activation=relu", "preset=tiny-relu"]
    assert written["run"].run_group.startswith("tiny-relu-relu-") and written["run"].job_type == "train"
    assert written["metrics"]["*"].step_metric == "trainer/global_step"
    losses = [(r["trainer/global_step"], r["train/loss"]) for r in written["history"] if "train/loss" in r]
    assert losses == [(r["trainer/global_step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r]
    assert {r.get("plots/overview/_type") for r in written["history"]} >= {"image-file"}
    assert {r.get("report/_type") for r in written["history"]} >= {"html-file"}


def test_a_fit_sends_growing_tables_layer_keys_no_constants_their_charts_and_the_pages(tmp_path, corpus_file,
                                                                                      fake_wandb):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 4, "--report", "true"))
    (wandb_run,) = fake_wandb.runs
    assert wandb_run.init["name"] == "tiny-relu-relu-seed1234" and wandb_run.init["job_type"] == "train"
    assert wandb_run.metrics["tokens_seen"] == {"step_metric": "trainer/global_step", "hidden": False}
    rows = [r for r in read_metrics(run)]
    for key in {k for r in rows for k in r} - {"trainer/global_step", "tokens_seen", "label"}:
        values = {r[key] for r in rows if key in r and r[key] == r[key]}
        assert wandb_run.metrics[key]["hidden"] == (len(values) <= 1), key  # a chart for each key that moves
    assert not wandb_run.metrics["basic/resid_norm/L0"]["hidden"]  # per-layer curves show while training
    assert {"train/lr"} == {k for k in wandb_run.metrics if k.startswith("train/lr")}
    measured = max(r["trainer/global_step"] for r in rows if "dynamics/seconds" in r)
    assert wandb_run.summary["trainer/global_step"] == measured == 4
    assert wandb_run.summary["tokens_seen"] == next(r["tokens_seen"] for r in rows
                                                    if r["trainer/global_step"] == 4 and "dynamics/seconds" in r)
    measured = [r for r in wandb_run.history if "basic/probe_loss" in r]
    tables = RunFiles(run).table_files()
    assert len(tables) >= 5
    for key, path in tables.items():  # one growing table per key: each measured step adds that step's rows
        sizes = [len(entry["rows"]) for entry in read_table(path)]
        sent = [r[key][1] for r in wandb_run.history if key in r]
        assert len(sent) == len(measured) and sent == list(itertools.accumulate(sizes)), key
    sent = {k for r in wandb_run.history for k in r}
    assert {"layers/sparsity/dead_frac", "plots/overview", "report"} <= sent  # at the end of the fit
    assert (RunFiles(run).report / "index.html").exists() and wandb_run.exit_code == 0


def test_an_offline_analysis_goes_into_the_training_run(tiny_run, tmp_path, fake_wandb):
    main(["analyze", str(copy_run(tiny_run, tmp_path)), "--wandb", "--redo"])
    (attached,) = fake_wandb.runs
    assert attached.init["id"] == RunFiles(tiny_run).wandb_id.read_text().strip() and attached.init["resume"]
    sent = [r for r in attached.history if "trainer/global_step" in r]
    assert {r["trainer/global_step"] for r in sent if "frequency/dist_to_final" in r} == set(read_manifest(tiny_run))
    assert not any("basic/probe_loss" in r for r in sent)  # what training logged is not sent again
    assert {"plots/overview", "report"} <= {k for r in attached.history for k in r}


def test_sync_rebuilds_one_run_in_step_order(tiny_run, tmp_path, fake_wandb):
    main(["sync", str(tiny_run)])
    (synced,) = fake_wandb.runs
    config = yaml.safe_load(RunFiles(tiny_run).config.read_text())
    assert synced.init["id"] == RunFiles(tiny_run).wandb_id.read_text().strip() + "-synced"
    assert synced.init["group"] == config["wandb_group"] and synced.init["config"]["model"] == config["model"]
    losses = [(r["trainer/global_step"], r["train/loss"]) for r in synced.history if "train/loss" in r]
    assert losses == sorted((r["trainer/global_step"], r["train/loss"]) for r in read_metrics(tiny_run)
                            if "train/loss" in r)
    assert [s for s, _ in losses] == list(range(7))


def test_seeds_of_one_setup_share_a_wandb_group_and_other_settings_do_not():
    config = yaml.safe_load(open("configs/tiny-relu.yaml"))
    name, group, tags = wandb_grouping(config, "tiny-relu")
    assert name == "tiny-relu-relu-seed1234"
    reseeded = {**config, "seed_everything": 7, "data": {**config["data"], "seed": 3}}
    assert wandb_grouping(reseeded, "tiny-relu")[1:] == (group, tags)
    gelu = {**config, "model": {**config["model"], "arch": {**config["model"]["arch"], "activation": "gelu"}}}
    _, other_group, other_tags = wandb_grouping(gelu, "tiny-relu")
    assert other_group != group and "activation=gelu" in other_tags
    wider = {**config, "model": {**config["model"], "arch": {**config["model"]["arch"], "d_model": 256}}}
    assert wandb_grouping(wider, "tiny-relu")[1] != group


def test_outputs_and_monitors_are_declared_in_the_presets_and_printed_by_print_config():
    out = subprocess.run([sys.executable, "-m", "dynascope.cli", "fit", "--config", "configs/tiny-gpt.yaml",
                          "--print_config"], capture_output=True, text=True, check=True).stdout
    printed = yaml.safe_load(out)
    assert printed["outputs"] == {"wandb": {"project": "dynascope"}}
    assert [cb["class_path"] for cb in printed["trainer"]["callbacks"]] == [
        "dynascope.callbacks.throughput.TrainingThroughput"]
