"""End-to-end runs of `dynascope fit` on a tiny model and the test corpus (a few seconds each)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb_reader
from conftest import copy_run, tiny_args

from dynascope.analysis.base import REGISTRY
from dynascope.analysis.records import read_csv, read_metrics
from dynascope.cli import main
from dynascope.train.cli import fit_cli
from dynascope.train.loggers import finish_wandb
from dynascope.train.rundir import release_locks
from dynascope.train.snapshots import load_snapshot, read_manifest, snapshot_path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_fit_writes_snapshots_manifest_metrics_and_wandb(tiny_run):
    run = tiny_run
    manifest = read_manifest(run)
    assert sorted(manifest) == [0, 1, 2, 4, 6, 7]  # log-spaced to 4, every 3, final
    assert [manifest[s]["tokens_seen"] for s in (0, 1, 7)] == [0, 4 * 32, 7 * 4 * 32]
    assert len({manifest[s]["sha256"] for s in manifest}) == 6
    w0, w7 = load_snapshot(run, 0), load_snapshot(run, 7)
    assert set(w0) >= {"wte.weight", "unembed.weight", "blocks.1.mlp.fc_in.weight"}
    assert not torch.equal(w0["unembed.weight"], w7["unembed.weight"])
    rows = read_metrics(run)
    assert sorted(losses(run)) == list(range(7))
    assert all("trainer/global_step" in r for r in rows)
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    wandb_file = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(wandb_file) == 1
    history = wandb_reader.history(wandb_file[0])
    logged = {r["trainer/global_step"]: r["train/loss"] for r in history if "train/loss" in r}
    assert logged == losses(run)
    online = analysis_rows(run)
    assert sorted(online) == sorted(manifest) and "basic/probe_loss" in online[0]
    assert {r["trainer/global_step"]: r["basic/probe_loss"] for r in history if "basic/probe_loss" in r} == {
        s: online[s]["basic/probe_loss"] for s in online}
    assert {"basic/probe_loss", "regions/sharpness_median/L1", "sparsity/batch_usage/L1", "vocab/agree_final/L0",
            "outliers/score_max", "frequency/r2_corpus", "frequency/wu_rel_change"} <= set(online[4])
    # death is judged on the training stream every 256 tokens (2 steps of 4 × 32): at steps 2, 4 and 6
    judged = {s: online[s]["sparsity/dead_window_tokens"] for s in online if "sparsity/dead_window_tokens" in online[s]}
    assert judged == {2: 256, 4: 256, 6: 256} and all(0 <= online[s]["sparsity/dead_frac/L0"] < 1 for s in judged)
    assert online[4]["sparsity/interval_grad_norm_max"] > 0
    for step, row in online.items():  # each analysis's time is part of the measurement's time
        parts = [row[f"dynamics/seconds/{name}"] for name in REGISTRY]
        assert all(p > 0 for p in parts) and sum(parts) < row["dynamics/seconds"], step
    # training time (train/time) leaves the measurements out; the wall-clock tokens/s beside it does not
    by_step: dict[int, dict] = {}
    for r in rows:
        by_step.setdefault(r["trainer/global_step"], {}).update(r)
    speeds = [(r["train/lengths"] / r["train/time"], r["train/device/wall_items_per_sec"]) for r in by_step.values()
              if "train/time" in r and "train/device/wall_items_per_sec" in r]
    assert len(speeds) == 7 and all(wall < training for training, wall in speeds)
    offline = {r["step"]: r for r in read_csv(run / "analysis" / "metrics.csv")}
    assert sorted(offline) == sorted(manifest)
    assert offline[7]["frequency/dist_to_final"] == 0 < offline[4]["frequency/dist_to_final"] < offline[0][
        "frequency/dist_to_final"]  # measured against the last snapshot, offline
    assert len((run / "tables" / "regions__median_curve.jsonl").read_text().splitlines()) == len(manifest)


def test_analyze_names_a_corrupt_snapshot_and_keeps_the_others(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    path = snapshot_path(run, 2)
    path.write_bytes(path.read_bytes()[:-100])
    before = {r["step"]: r for r in read_csv(run / "analysis" / "metrics.csv")}
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(run)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert str(path) in err and "skipped" in err
    after = {r["step"]: r for r in read_csv(run / "analysis" / "metrics.csv")}
    assert sorted(after) == [0, 1, 2, 4, 6, 7]  # step 2 keeps the row measured while its snapshot was intact
    assert after[2] == pytest.approx(before[2], nan_ok=True)
    assert (run / "analysis" / "plots" / "overview.png").stat().st_size > 10_000
    assert (run / "analysis" / "plots" / "basic.png").exists()
    assert (run / "analysis" / "plots" / "regions__median_curve.png").exists()


def analysis_keys(row: dict) -> list[str]:
    """Keys an offline replay reproduces (the training-batch stream exists online only)."""
    return [k for k in row if "/" in k and not k.startswith(("dynamics/", "trainer/", "sparsity/train_"))]


def analysis_rows(run_dir: Path) -> dict[int, dict]:
    return {r["trainer/global_step"]: r for r in read_metrics(run_dir) if "dynamics/seconds" in r}


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_resumed_run_matches_uninterrupted_run_at_every_step(tmp_path, corpus_file):
    full = tmp_path / "full"
    fit_cli(tiny_args(corpus_file, full, 8))
    part = tmp_path / "part"
    cli = fit_cli(tiny_args(corpus_file, part, 8)[1:], run=False)
    cli.trainer.callbacks.append(StopAt(4))
    cli.trainer.fit(cli.model, cli.datamodule)
    finish_wandb(cli.trainer)
    release_locks()
    assert sorted(losses(part)) == [0, 1, 2, 3]
    fit_cli(tiny_args(corpus_file, part, 8, "--ckpt_path", "last"))
    assert losses(part) == losses(full)  # exact equality, fp32 on CPU
    assert sorted(read_manifest(part)) == sorted(read_manifest(full))
    for s in (4, 8):
        assert torch.equal(load_snapshot(part, s)["unembed.weight"], load_snapshot(full, s)["unembed.weight"])
    assert len(set((part / "wandb_id").read_text().split())) == 1
    ids = {p.name.split("-")[3] for p in (part / "wandb").glob("offline-run-*")}  # offline-run-<time>-<id>[-n]
    assert ids == {(part / "wandb_id").read_text().strip()}  # the resumed run continues the same wandb run


def test_two_process_cpu_ddp_run(tmp_path, corpus_file):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    fit_cli(tiny_args(corpus_file, single, 2))
    exe = Path(sys.executable).parent / "dynascope"
    args = tiny_args(corpus_file, ddp, 2, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(ddp)
    assert sorted(manifest) == [0, 1, 2]
    assert manifest[2]["tokens_seen"] == 2 * 2 * 4 * 32  # two ranks' batches per step
    assert torch.equal(load_snapshot(ddp, 0)["unembed.weight"], load_snapshot(single, 0)["unembed.weight"])
    assert not torch.equal(load_snapshot(ddp, 2)["unembed.weight"], load_snapshot(single, 2)["unembed.weight"])
    # step 0: same weights and the same probe set, sharded over two ranks and reduced, give the same values
    one, two = analysis_rows(single)[0], analysis_rows(ddp)[0]
    keys = analysis_keys(one)
    assert "regions/sharpness_median" in keys
    for k in keys:
        assert two[k] == pytest.approx(one[k], rel=1e-5, nan_ok=True), k


def test_one_off_events_reach_the_wandb_summary_and_summary_json(tmp_path, corpus_file, capsys):
    from dynascope.analysis.base import REGISTRY, Analysis, Result

    class Event(Analysis):
        name = "event"
        headline = "event/value"

        def update(self, tokens, logits, cache, windows):
            pass

        def compute(self):
            events = {"event/first_step": 2.0} if self.step >= 2 else {}
            return Result({"event/value": float(self.step)}, summary=events)

    try:
        run = tmp_path / "run"
        fit_cli(tiny_args(corpus_file, run, 4, "--dynamics.analyses", "basic,event"))
    finally:
        del REGISTRY["event"]
    assert json.loads((run / "summary.json").read_text()) == {"event/first_step": 2.0}
    (wandb_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_reader.summary(wandb_file)["event/first_step"] == 2.0
    assert "dynascope: step 2: event/first_step = 2.0" in capsys.readouterr().out


def test_gelu_preset_logs_every_analysis(tmp_path, corpus_file):
    run = tmp_path / "gelu"
    args = tiny_args(corpus_file, run, 2)
    args[args.index("configs/tiny-relu.yaml")] = "configs/tiny-gpt.yaml"
    fit_cli(args)
    row = analysis_rows(run)[2]
    for key in ("sparsity/token_density_mean/L1", "vocab/saturation_layer_mean", "regions/sharpness_median",
                "outliers/score_max", "frequency/r2_output", "basic/probe_loss"):
        assert key in row and row[key] == row[key], key  # present and not NaN
    assert 0 < row["sparsity/token_density_mean/L1"] < 1  # GELU: the pre-activation sign
    assert "regions/relu_flips_mean" not in row
