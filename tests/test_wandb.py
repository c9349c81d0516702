"""What a fit sends to its wandb run (offline here), read back from the run file."""

import glob
import itertools

import wandb_reader
import yaml
from conftest import tiny_args

from dynascope.analysis.records import read_metrics, read_table
from dynascope.cli import main
from dynascope.train.cli import fit_cli
from dynascope.train.loggers import wandb_grouping
from dynascope.train.snapshots import read_manifest


def test_fit_logs_config_step_metrics_growing_tables_layer_charts_and_pictures(tmp_path, corpus_file):
    run = tmp_path / "run"
    fit_cli(tiny_args(corpus_file, run, 4, "--report", "true", "--snapshots.wandb_artifacts", "true"))
    (path,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))

    snapshots = [r.artifact for r in wandb_reader.records(path)
                 if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert [sorted(a.aliases) for a in snapshots] == [["latest", f"step{s}"] for s in sorted(read_manifest(run))]
    assert {a.name for a in snapshots} == {f"snapshots-{(run / 'wandb_id').read_text().strip()}"}

    config = wandb_reader.config(path)  # the whole resolved config, architecture included
    assert config["model"]["arch"] == {**config["model"]["arch"], "activation": "relu", "n_layers": 2, "d_model": 32}
    assert config["data"]["vocab_size"] == 320 and config["snapshots"]["every"] == 3
    assert config["dynamics"]["options"]["regions"] == {"pairs_per_window": 1}
    info = wandb_reader.run_info(path)
    assert sorted(info.tags) == ["activation=relu", "preset=tiny-relu"]
    assert info.run_group.startswith("tiny-relu-relu-")

    metrics = wandb_reader.metric_definitions(path)
    assert metrics["*"].step_metric == "trainer/global_step"
    assert metrics["tokens_seen"].step_metric == "trainer/global_step"  # an x-axis choice
    assert metrics["sparsity/dead_frac/L0"].options.hidden and not metrics["tokens_seen"].options.hidden

    history = wandb_reader.history(path)
    measured = [r for r in history if "basic/probe_loss" in r]
    tables = sorted((run / "tables").glob("*.jsonl"))
    assert len(tables) >= 5
    for table in tables:  # one growing table per key: each measured step adds that step's rows to it
        key = table.stem.replace("__", "/")
        increments = [r for r in history if f"{key}/_type" in r]
        assert [r[f"{key}/_type"] for r in increments] == ["incremental-table-file"] * len(measured), key
        sizes = [len(entry["rows"]) for entry in read_table(table)]
        assert [r[f"{key}/nrows"] for r in increments] == list(itertools.accumulate(sizes)), key
    assert [r["regions/median_curve/nrows"] for r in history if "regions/median_curve/nrows" in r] == [
        21 * (i + 1) for i in range(len(measured))]

    # the end of fit: plots and the report page in the training run, one chart per per-layer metric
    assert {r.get("plots/overview/_type") for r in history} >= {"image-file"}
    assert {r.get("report/_type") for r in history} >= {"html-file"}
    assert {r.get("layers/sparsity/dead_frac_table/_type") for r in history} >= {"table-file"}
    assert not any(k.startswith("layers/") and k.endswith("/L0") for r in history for k in r)
    assert (run / "report" / "index.html").exists()

    # an offline analysis goes into the training run (same id): what training did not log, and its pictures
    main(["analyze", str(run), "--wandb"])
    run_id = (run / "wandb_id").read_text().strip()
    (attached,) = set(glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}" / "run-*.wandb"))) - {path}
    offline = wandb_reader.history(attached)
    assert {r["trainer/global_step"] for r in offline if "frequency/dist_to_final" in r} == set(read_manifest(run))
    assert not any("basic/probe_loss" in r for r in offline)
    assert {r.get("plots/overview/_type") for r in offline} >= {"image-file"}

    # a resumed offline run's record, uploaded as one run: every step once, in order
    main(["sync", str(run)])
    (synced,) = glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}-synced" / "run-*.wandb"))
    losses = [(r["trainer/global_step"], r["train/loss"]) for r in wandb_reader.history(synced) if "train/loss" in r]
    assert losses == sorted((r["trainer/global_step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r)
    assert [s for s, _ in losses] == [0, 1, 2, 3]
    assert wandb_reader.run_info(synced).run_group == info.run_group


def test_seeds_of_one_setup_share_a_wandb_group_and_other_settings_do_not():
    config = yaml.safe_load(open("configs/tiny-relu.yaml"))
    group, tags = wandb_grouping(config, "tiny-relu")
    reseeded = {**config, "seed_everything": 7, "data": {**config["data"], "seed": 3}}
    assert wandb_grouping(reseeded, "tiny-relu") == (group, tags)
    gelu = {**config, "model": {**config["model"], "arch": {**config["model"]["arch"], "activation": "gelu"}}}
    other_group, other_tags = wandb_grouping(gelu, "tiny-relu")
    assert other_group != group and "activation=gelu" in other_tags
    wider = {**config, "model": {**config["model"], "arch": {**config["model"]["arch"], "d_model": 256}}}
    assert wandb_grouping(wider, "tiny-relu")[0] != group


def test_loggers_and_monitors_are_declared_in_the_presets_and_printed_by_print_config():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dynascope.cli", "fit", "--config", "configs/tiny-gpt.yaml",
                          "--print_config"], capture_output=True, text=True, check=True).stdout
    trainer = yaml.safe_load(out)["trainer"]
    assert [lg["class_path"] for lg in trainer["logger"]] == ["dynascope.train.loggers.JsonlLogger",
                                                              "dynascope.train.loggers.RunWandbLogger"]
    assert trainer["logger"][1]["init_args"]["project"] == "dynascope"
    assert [cb["class_path"] for cb in trainer["callbacks"]] == [
        "dynascope.callbacks.throughput.TrainingThroughput", "lightning.pytorch.callbacks.LearningRateMonitor"]
