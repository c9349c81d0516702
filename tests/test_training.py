"""End-to-end runs of `dynascope fit` on a tiny model and the test corpus (a few seconds each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import copy_run, tiny_args

from dynascope.analysis.base import REGISTRY
from dynascope.cli import main
from dynascope.core.records import read_csv, read_metrics
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import load_snapshot, read_manifest
from dynascope.train.cli import build_fit


def losses(run_dir: Path) -> dict[int, float]:
    return {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_fit_writes_log_spaced_snapshots_with_their_manifest(tiny_run):
    manifest = read_manifest(tiny_run)
    assert sorted(manifest) == [0, 1, 2, 4, 6, 7]  # log-spaced to 4, every 3, final
    assert [manifest[s]["tokens_seen"] for s in (0, 1, 7)] == [0, 4 * 32, 7 * 4 * 32]
    assert len({manifest[s]["sha256"] for s in manifest}) == 6
    w0, w7 = load_snapshot(tiny_run, 0), load_snapshot(tiny_run, 7)
    assert set(w0) >= {"wte.weight", "unembed.weight", "blocks.1.mlp.fc_in.weight"}
    assert not torch.equal(w0["unembed.weight"], w7["unembed.weight"])
    files = RunFiles(tiny_run)
    assert files.config.exists() and files.last_checkpoint.exists()


def test_fit_logs_every_step_and_every_analysis_at_every_snapshot(tiny_run):
    assert sorted(losses(tiny_run)) == list(range(7))
    assert all("trainer/global_step" in r for r in read_metrics(tiny_run))
    online = analysis_rows(tiny_run)
    assert sorted(online) == sorted(read_manifest(tiny_run)) and "basic/probe_loss" in online[0]
    assert {"basic/probe_loss", "regions/sharpness_median/L1", "sparsity/batch_usage/L1", "vocab/agree_final/L0",
            "outliers/score_max", "frequency/r2_corpus", "frequency/wu_change_per_step"} <= set(online[4])
    assert len(RunFiles(tiny_run).table("regions/median_curve").read_text().splitlines()) == len(online)


def test_death_is_judged_on_the_training_stream(tiny_run):
    online = analysis_rows(tiny_run)  # every 256 tokens (2 steps of 4 × 32): at steps 2, 4 and 6
    judged = {s: online[s]["sparsity/dead_window_tokens"] for s in online if "sparsity/dead_window_tokens" in online[s]}
    assert judged == {2: 256, 4: 256, 6: 256} and all(0 <= online[s]["sparsity/dead_frac/L0"] < 1 for s in judged)
    assert online[4]["sparsity/interval_grad_norm_max"] > 0


def test_measurement_time_is_logged_and_left_out_of_training_speed(tiny_run):
    for step, row in analysis_rows(tiny_run).items():  # each analysis's time is part of the measurement's time
        parts = [row[f"dynamics/seconds/{name}"] for name in REGISTRY]
        assert all(p > 0 for p in parts) and sum(parts) < row["dynamics/seconds"], step
    by_step: dict[int, dict] = {}
    for r in read_metrics(tiny_run):
        by_step.setdefault(r["trainer/global_step"], {}).update(r)
    # training time (train/time) leaves the measurements out; the wall-clock tokens/s beside it does not
    speeds = [(r["train/lengths"] / r["train/time"], r["train/device/wall_items_per_sec"]) for r in by_step.values()
              if "train/time" in r and "train/device/wall_items_per_sec" in r]
    assert len(speeds) == 7 and all(wall < training for training, wall in speeds)


def test_offline_distances_are_measured_against_the_last_snapshot(tiny_run):
    offline = {r["step"]: r for r in read_csv(RunFiles(tiny_run).analysis.metrics_csv)}
    assert sorted(offline) == sorted(read_manifest(tiny_run))
    assert offline[7]["frequency/dist_to_final"] == 0 < offline[4]["frequency/dist_to_final"] < offline[0][
        "frequency/dist_to_final"]


def test_fit_sends_its_steps_and_measurements_to_the_wandb_output(tmp_path, corpus_file, fake_wandb):
    run = tmp_path / "run"
    main(tiny_args(corpus_file, run, 4))
    (wandb_run,) = fake_wandb.runs
    assert wandb_run.init["id"] == (RunFiles(run).wandb_id).read_text().strip() and wandb_run.exit_code == 0
    logged = {r["trainer/global_step"]: r["train/loss"] for r in wandb_run.history if "train/loss" in r}
    assert logged == losses(run)
    online = analysis_rows(run)
    assert {r["trainer/global_step"]: r["basic/probe_loss"] for r in wandb_run.history if "basic/probe_loss" in r} \
        == {s: online[s]["basic/probe_loss"] for s in online}


def test_analyze_names_a_corrupt_snapshot_and_keeps_the_others(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    path = RunFiles(run).snapshot(2)
    path.write_bytes(path.read_bytes()[:-100])
    before = {r["step"]: r for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(run), "--redo"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert str(path) in err and "skipped" in err
    after = {r["step"]: r for r in read_csv(RunFiles(run).analysis.metrics_csv)}
    assert sorted(after) == [0, 1, 2, 4, 6, 7]  # step 2 keeps the row measured while its snapshot was intact
    assert after[2] == pytest.approx(before[2], nan_ok=True)
    plots = RunFiles(run).plots
    assert (plots / "overview.png").stat().st_size > 10_000
    assert (plots / "basic.png").exists() and (plots / "regions__median_curve.png").exists()
    assert RunFiles(run).report.joinpath("index.html").exists()


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


def killed_at(args: list[str], step: int) -> None:
    """A fit stopped after `step` as a kill leaves it: with its periodic checkpoints only."""
    cli = build_fit(args[1:])
    cli.trainer.callbacks.append(StopAt(step))
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        cli.close()
    RunFiles(cli.run_dir).last_checkpoint.unlink()


def test_resumed_run_matches_uninterrupted_run_at_every_step(tmp_path, corpus_file, fake_wandb):
    full = tmp_path / "full"
    main(tiny_args(corpus_file, full, 8))
    part = tmp_path / "part"
    killed_at(tiny_args(corpus_file, part, 8, "--checkpoints.every_n_steps", "3"), 5)  # resumes from step 3
    assert sorted(losses(part)) == [0, 1, 2, 3, 4]
    main(tiny_args(corpus_file, part, 8, "--ckpt_path", "last"))
    assert losses(part) == losses(full)  # exact equality, fp32 on CPU
    assert sorted(read_manifest(part)) == sorted(read_manifest(full))
    for s in (4, 8):
        assert torch.equal(load_snapshot(part, s)["unembed.weight"], load_snapshot(full, s)["unembed.weight"])
    _, killed, resumed = fake_wandb.runs
    run_id = (RunFiles(part).wandb_id).read_text().strip()
    assert killed.init["id"] == resumed.init["id"] == run_id  # the resumed run continues the same wandb run
    sent = {}  # what wandb got: each (step, key) once, though steps 3 and 4 were trained and measured twice
    for row in (r for r in killed.history + resumed.history if "trainer/global_step" in r):  # not the end's charts
        for key in row.keys() - {"trainer/global_step", "tokens_seen"}:  # both in every row of a step
            sent.setdefault((row["trainer/global_step"], key), []).append(row[key])
    assert {k: v for k, v in sent.items() if len(v) > 1} == {}
    assert {s for s, k in sent if k == "train/loss"} == set(range(8))


def test_two_process_cpu_ddp_run(tmp_path, corpus_file):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    main(tiny_args(corpus_file, single, 2))
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


def test_one_off_events_reach_the_wandb_summary_and_summary_json(tmp_path, corpus_file, capsys, fake_wandb):
    from dynascope.analysis.base import REGISTRY, Analysis, Measurement

    class Event(Analysis):
        name = "event"
        headline = "event/value"

        def update(self, tokens, logits, cache, windows):
            pass

        def compute(self):
            events = {"event/first_step": 2.0} if self.step >= 2 else {}
            return Measurement({"event/value": float(self.step)}, summary=events)

    try:
        run = tmp_path / "run"
        main(tiny_args(corpus_file, run, 4, "--dynamics.analyses", "basic,event"))
    finally:
        del REGISTRY["event"]
    assert json.loads((RunFiles(run).summary).read_text()) == {"event/first_step": 2.0}
    assert fake_wandb.runs[0].summary["event/first_step"] == 2.0
    assert "dynascope: step 2: event/first_step = 2.0" in capsys.readouterr().out


def test_gelu_preset_logs_every_analysis(tmp_path, corpus_file):
    run = tmp_path / "gelu"
    args = tiny_args(corpus_file, run, 2)
    args[args.index("configs/tiny-relu.yaml")] = "configs/tiny-gpt.yaml"
    main(args)
    row = analysis_rows(run)[2]
    for key in ("sparsity/token_density_mean/L1", "vocab/saturation_layer_mean", "regions/sharpness_median",
                "outliers/score_max", "frequency/r2_output", "basic/probe_loss"):
        assert key in row and row[key] == row[key], key  # present and not NaN
    assert 0 < row["sparsity/token_density_mean/L1"] < 1  # GELU: the pre-activation sign
    assert "regions/relu_flips_mean" not in row


@pytest.mark.parametrize("resumed", [False, True])
def test_the_progress_bar_counts_optimizer_steps_against_max_steps(resumed, tmp_path, corpus_file, capsys):
    args = tiny_args(corpus_file, tmp_path / "run", 6, "--dynamics.analyses", "basic",
                     "--trainer.accumulate_grad_batches", "2")
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    if resumed:  # from its step-4 checkpoint: Lightning restarts the endless epoch mid-way, without its start hook
        killed_at(args, 5)
        args += ["--ckpt_path", "last"]
    cli = build_fit(args[1:])
    try:
        cli.fit()
    finally:
        cli.close()
    bar = cli.trainer.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total, bar.desc) == (6, 6, "training: ")  # steps, not the 12 micro-batches
    assert "6/6 steps" in capsys.readouterr().out
