"""The GPU presets' code path, on CPU: gpt2-124m and relu-124m as written (12 layers, d=768, vocab 32768,
bf16-mixed, torch.compile with the analyses' hooks added after compiling, every analysis), with only the
batch, the context, the probe set and the data source shrunk."""

import importlib.util
import json
import math
import signal
import subprocess
import sys

import pytest
import yaml
from helpers import make_text

from dynascope.analysis import REGISTRY
from dynascope.cli import main
from dynascope.core.records import read_metrics
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest


def shrunk(corpus, run, *extra: str) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
            "--trainer.accumulate_grad_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--model.arch.context_length", "64",
            "--data.source", "files", "--data.paths", f"[{corpus}]", "--data.vocab_size", "320",
            "--data.val_fraction", "0.2", "--data.batch_size", "2", "--dynamics.probe_windows", "2",
            "--dynamics.batch_size", "2", "--dynamics.options", '{"sparsity": {"dead_min_tokens": 128}}', *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(make_text(400))
    out = {}
    for name, preset, extra in [("gpt2", "gpt2-124m", ()), ("relu", "relu-124m", ()),
                                ("gpt2 eager", "gpt2-124m", ("--model.compile", "false", "--report", "false"))]:
        out[name] = tmp_path_factory.mktemp("runs") / preset
        main(["fit", "--config", f"configs/{preset}.yaml", *shrunk(corpus, out[name], *extra)])
    return out


def losses(run) -> dict[int, float]:
    return {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}


@pytest.mark.parametrize("name, activation", [("gpt2", "gelu"), ("relu", "relu")])
def test_a_124m_preset_trains_compiled_in_bf16_and_measures_every_analysis(runs, name, activation):
    run = RunFiles(runs[name])
    config = yaml.safe_load(run.config.read_text())
    arch = config["model"]["arch"]
    assert (arch["n_layers"], arch["d_model"], arch["vocab_size"], arch["activation"]) == (12, 768, 32768, activation)
    assert config["trainer"]["precision"] == "bf16-mixed" and config["model"]["compile"] is True
    assert sorted(read_manifest(run.root)) == [0, 1, 2] and sorted(losses(run.root)) == [0, 1]
    assert all(math.isfinite(v) for v in losses(run.root).values())
    rows = {r["trainer/global_step"]: r for r in read_metrics(run.root) if "dynamics/seconds" in r}
    assert sorted(rows) == [0, 1, 2]
    for step, row in rows.items():
        for analysis in REGISTRY.values():  # every analysis measured, its headline a number
            assert math.isfinite(row[analysis.headline]), (step, analysis.headline)
        assert sum(k.startswith(tuple(REGISTRY)) for k in row) > 150
    # the training-stream hooks, added after compiling, fired: death judged on 128 training tokens per step
    assert [rows[s].get("sparsity/dead_window_tokens") for s in (1, 2)] == [128.0, 128.0]
    page = (run.report / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 6


def test_compiled_and_eager_training_agree_within_bf16_tolerance(runs):
    compiled, eager = losses(runs["gpt2"]), losses(runs["gpt2 eager"])
    assert sorted(compiled) == sorted(eager) == [0, 1]
    for step in (0, 1):  # step 1 after one AdamW update of every weight
        assert compiled[step] == pytest.approx(eager[step], rel=2e-2), step
    assert compiled[1] < compiled[0] and eager[1] < eager[0]


def test_the_gpu_check_runs_on_a_cpu_at_tiny_shapes(tmp_path, corpus_file):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--data", str(corpus_file),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--minutes", "20"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v} == {}
    assert results["resume"]["stopped_exit_code"] == 128 + signal.SIGTERM and results["resume"]["steps"] == 24
    assert results["resume"]["max_loss_difference"] == 0  # one thread of a CPU: bitwise reproducible
    loop = results["throughput gpt2-124m (loop)"]
    assert loop["dynascope"]["tokens_per_s"] > 0 and loop["hf_gpt2"]["tokens_per_s"] > 0
    assert results["throughput gpt2-124m (fit)"]["tokens_per_s"] > results["throughput gpt2-124m (fit)"][
        "wall_tokens_per_s"] > 0  # the analyses' time is left out of the one, not the other
    costs = results["analysis costs"]
    assert all(0 < costs[name]["probe_forwards"] < math.inf for name in [*REGISTRY, "all"])  # timings: no bound
    assert 0 < costs["share_1000_step_interval"] < costs["share_first_512_steps"] < 1
    assert results["replay"]["snapshots"] == 4 and results["replay"]["snapshots_per_hour"] > 0
    assert results["fsdp"]["skipped"] == "Lightning's FSDP needs a GPU"
    assert "| CPU | gpt2-124m (tiny) |" in proc.stdout and results["benchmark_rows"][0].startswith("| CPU |")


def test_a_section_the_time_budget_cannot_hold_is_skipped_and_a_failing_one_is_recorded(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", "benchmarks/gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    check = gpu_check.Check(tmp_path / "out.json", minutes=0.5)
    check.section("long", lambda: {"ran": True}, needs_seconds=60)
    check.section("broken", lambda: 1 / 0)
    check.section("quick", lambda: {"ran": True}, needs_seconds=1)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["long"]["skipped"].endswith("60 s needed") and written["quick"]["ran"]
    assert written["broken"]["error"] == "ZeroDivisionError: division by zero"
