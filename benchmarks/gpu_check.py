"""dynascope on one GPU, in one command: `make gpu-check` (at most about 8 minutes, no network).

    python benchmarks/gpu_check.py [--device cuda|cpu] [--shape 124m|tiny] [--data FILE] [--out gpu-check.json]

On the embedded corpus (or `--data`, a text file), at the 124M presets' shapes (`--shape tiny` and
`--device cpu` check this script's own logic on a CPU in a minute or two), it measures and writes to
`--out`, printing rows ready for BENCHMARKS.md:

a. training tokens/s and MFU of gpt2-124m and relu-124m (bf16, compile): `dynascope fit` itself (Lightning,
   the analyses' time left out by its throughput callback), and for gpt2-124m a plain PyTorch loop over our
   model and, at the same shape, batch and precision, Hugging Face's GPT2LMHeadModel (sdpa attention);
b. each analysis's cost in probe forwards and seconds (on the preset's probe set), and the analyses' share of
   training time over the default schedule's first 512 steps and over one 1000-step interval;
c. peak GPU memory of training and of a measurement;
d. resume on the device: a run stopped by SIGTERM and resumed, against an uninterrupted one;
e. FSDP on one device (GPU only): a few steps with every analysis;
f. offline replay throughput, in snapshots per hour.

Each section is measured on its own: one that fails records its error and the others still run; a section
that would outlast the time budget (`--minutes`) is skipped and says so. litgpt is not among the peers: its
0.5 releases pin huggingface-hub<1.4 and jsonargparse<=4.41, which transformers 5 and dynascope's own
requirements rule out, so it does not install cleanly beside dynascope.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

from dynascope.core.heap import heap_up_to

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"gpt2-124m": "gelu", "relu-124m": "relu"}
SHAPES = {  # fit overrides per shape: the 124M presets as they are, or a tiny model for a CPU
    "124m": {"data": ["--data.batch_size", "16"], "steps": 40},
    "tiny": {"data": ["--data.batch_size", "4", "--data.vocab_size", "512"], "steps": 12,
             "arch": ["--model.arch.n_layers", "2", "--model.arch.d_model", "64", "--model.arch.n_heads", "2",
                      "--model.arch.d_mlp", "256", "--model.arch.vocab_size", "512",
                      "--model.arch.context_length", "64"]},
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, as `dynascope fit` computes MFU against (None on a CPU)."""
    from dynascope.callbacks.throughput import available_flops

    return available_flops(device, torch.bfloat16) if device.type == "cuda" else None


class Check:
    """The results, written after every section, and the time budget."""

    def __init__(self, out: Path, minutes: float):
        self.out, self.deadline, self.results = out, time.monotonic() + 60 * minutes, {}

    def section(self, name: str, fn, needs_seconds: float = 0) -> None:
        left = self.deadline - time.monotonic()
        if left < needs_seconds:
            self.results[name] = {"skipped": f"{left:.0f} s of the time budget left, {needs_seconds:.0f} s needed"}
        else:
            start = time.monotonic()
            try:
                self.results[name] = fn()
            except Exception as e:  # a section that fails is a finding: the others still run
                self.results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            self.results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(f"gpu-check: {name}: {json.dumps(self.results[name])[:600]}", flush=True)
        self.out.write_text(json.dumps(self.results, indent=2))


def fit_args(preset: str, run: Path, shape: str, data: list[str], device: str, *extra: str) -> list[str]:
    """`dynascope fit` arguments of a preset at a shape, here: steps, accelerator, data, no wandb upload."""
    arch = SHAPES[shape].get("arch", [])
    return ["--config", str(REPO / "configs" / f"{preset}.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.accumulate_grad_batches",
            "1", "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false", "--report", "false",
            "--outputs", "{}", *arch, *data, *SHAPES[shape]["data"], *extra]


def run_fit(args: list[str]) -> None:
    from dynascope.train.cli import fit_cli

    fit_cli(args)


def last(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def fit_throughput(preset: str, work: Path, shape: str, data: list[str], device: str) -> dict:
    """tokens/s and MFU of `dynascope fit` over the last logged window, no measurement inside the timed steps."""
    from dynascope.core.records import read_metrics

    run = work / f"fit-{preset}"
    steps = SHAPES[shape]["steps"]
    run_fit(fit_args(preset, run, shape, data, device, "--trainer.max_steps", str(steps), "--snapshots.log_cap",
                     "0", "--snapshots.every", "0", "--checkpoints.every_n_steps", "0"))
    rows = read_metrics(run)
    return {"tokens_per_s": last(rows, "train/device/items_per_sec"), "mfu": last(rows, "train/device/mfu"),
            "wall_tokens_per_s": last(rows, "train/device/wall_items_per_sec"), "run": str(run)}


def loop_throughput(preset: str, shape: str, device: torch.device, batch: int, steps: int) -> dict:
    """tokens/s and MFU of a plain training loop (bf16 autocast, torch.compile, AdamW) over our model and over
    Hugging Face's GPT2LMHeadModel at the same shape."""
    import transformers

    from dynascope.core.model import ModelConfig, Transformer

    config = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())["model"]["arch"]
    if shape == "tiny":
        config |= {"n_layers": 2, "d_model": 64, "n_heads": 2, "d_mlp": 256, "vocab_size": 512, "context_length": 64}
    cfg = ModelConfig(**config)
    hf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                                 n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                                 activation_function=cfg.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 tie_word_embeddings=cfg.tie_embeddings)
    models = {"dynascope": Transformer(cfg),
              "hf_gpt2": transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")}
    peak = peak_flops(device)
    out = {}
    for name, model in models.items():
        model = model.to(device).train()
        flops_per_token = Transformer(cfg).flops_per_token() if name == "dynascope" else (
            6 * sum(p.numel() for p in model.parameters()) + 12 * cfg.n_layers * cfg.d_model * cfg.context_length)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device=device)

        def step(forward=forward, optimizer=optimizer, x=x) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = forward(x[:, :-1])
                logits = out if isinstance(out, torch.Tensor) else out.logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):  # compile and warm up
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        tokens = batch * cfg.context_length / seconds
        out[name] = {"tokens_per_s": round(tokens), "step_ms": round(1e3 * seconds, 2),
                     "mfu": tokens * flops_per_token / peak if peak else None,
                     "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        del model, optimizer, forward
    return out


def analysis_costs(run: Path, device: str, step_seconds: float) -> dict:
    """Each analysis's cost on the run's last snapshot and its probe set, and the analyses' share of training time
    over the default schedule's first 512 steps and over one 1000-step interval."""
    from analysis_cost import seconds  # beside this script

    from dynascope.analysis import resolve
    from dynascope.analysis.base import build
    from dynascope.analysis.measure import measure
    from dynascope.analysis.replay import run_context, run_options
    from dynascope.analysis.view import TransformerView
    from dynascope.core.io import read_yaml
    from dynascope.core.model import ModelConfig
    from dynascope.core.probe import load_probe
    from dynascope.core.runfiles import RunFiles
    from dynascope.core.schedule import CheckpointSchedule
    from dynascope.core.snapshots import load_snapshot, read_manifest

    files = RunFiles(run)
    config = read_yaml(files.config)
    step = max(read_manifest(run))
    weights = load_snapshot(run, step, device=device)
    view = TransformerView.from_snapshot(ModelConfig(**config["model"]["arch"]), weights)
    probe, batch = load_probe(files.probe), (config.get("dynamics") or {}).get("batch_size", 16)
    context = run_context(run, config)
    context.final_output_embeddings = view.output_embeddings.detach().clone()

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, len(probe), batch):
                view.forward(probe[i:i + batch].to(device))

    base = seconds(forward, 3, device)
    out = {"probe": f"{len(probe)} windows of {probe.shape[1]} tokens", "forward_s": base}
    for name in [*resolve("all"), "all"]:
        analyses = build(resolve(name), view.shape, context, run_options(run), device)
        if device == "cuda" and name == "all":
            torch.cuda.reset_peak_memory_stats()
        s = seconds(lambda analyses=analyses: measure(view, analyses, probe, step, batch_size=batch), 3, device)
        out[name] = {"seconds": s, "probe_forwards": s / base}
    if device == "cuda":
        out["measurement_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    every = out["all"]["seconds"]
    first = len(CheckpointSchedule().steps(512))  # 0, 1, 2, 4, ..., 512
    out["share_first_512_steps"] = first * every / (512 * step_seconds + first * every)
    out["share_1000_step_interval"] = every / (1000 * step_seconds + every)
    return out


def resume_check(work: Path, shape: str, data: list[str], device: str) -> dict:
    """A run stopped by SIGTERM (its own process) and resumed, against an uninterrupted run: the losses."""
    from dynascope.core.records import read_metrics

    steps = 24  # snapshots at 0, 8, 16, 24 for the replay; the probe loss measured there
    common = ["--trainer.max_steps", str(steps), "--model.compile", "false", "--checkpoints.every_n_steps", "8",
              "--trainer.log_every_n_steps", "1", "--snapshots.log_cap", "0", "--snapshots.every", "8",
              "--dynamics.analyses", "basic"]
    exe = [sys.executable, "-m", "dynascope.cli", "fit"]
    whole, stopped = work / "resume-whole", work / "resume-stopped"
    env = {**os.environ, "WANDB_MODE": "disabled"} | ({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})
    subprocess.run([*exe, *fit_args("gpt2-124m", whole, shape, data, device, *common)], env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen([*exe, *fit_args("gpt2-124m", stopped, shape, data, device, *common)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (stopped / "checkpoints" / "step_00000008.ckpt").exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run to stop ended first: {proc.stderr.read()[-500:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    subprocess.run([*exe, *fit_args("gpt2-124m", stopped, shape, data, device, *common, "--ckpt_path", "last")],
                   env=env, check=True, capture_output=True)

    def losses(run: Path) -> dict[int, float]:
        return {r["trainer/global_step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}

    a, b = losses(whole), losses(stopped)
    diff = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else math.inf
    cause = None if diff == 0 else ("GPU kernels are not bitwise reproducible from one process to the next (e.g. "
                                    "the attention backward's atomics)" if device == "cuda" else "unexplained (the "
                                    "processes ran on one thread each)")
    return {"stopped_exit_code": code, "steps": len(a), "same_steps": a.keys() == b.keys(), "max_loss_difference": diff,
            "cause": cause, "run": str(whole)}


def fsdp_check(work: Path, shape: str, data: list[str], device: str) -> dict:
    from dynascope.core.records import read_metrics

    if device != "cuda":
        return {"skipped": "Lightning's FSDP needs a GPU"}
    run = work / "fsdp"
    run_fit(fit_args("gpt2-124m", run, shape, data, device, "--trainer.max_steps", "4", "--trainer.strategy", "fsdp",
                     "--model.compile", "false"))
    rows = [r for r in read_metrics(run) if "dynamics/seconds" in r]
    finite = all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("basic/"))
    return {"measured_steps": [r["trainer/global_step"] for r in rows], "finite": finite,
            "keys": len({k for r in rows for k in r})}


def replay_rate(run: Path, device: str) -> dict:
    """Every analysis replayed over a run's snapshots: snapshots per hour."""
    from dynascope.analyze import AnalyzeRequest, analyze

    start = time.perf_counter()
    outcome = analyze(AnalyzeRequest(run=str(run), device=device), plot=False)
    seconds = time.perf_counter() - start
    return {"snapshots": len(outcome.steps), "seconds": seconds,
            "snapshots_per_hour": len(outcome.steps) / seconds * 3600}


def benchmark_rows(results: dict, device: str, shape: str) -> list[str]:
    """Markdown table rows for BENCHMARKS.md."""
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    for preset in PRESETS:
        fit, loop = results.get(f"throughput {preset} (fit)", {}), results.get(f"throughput {preset} (loop)") or {}
        cells = [fit.get("tokens_per_s"), fit.get("mfu"), (loop.get("dynascope") or {}).get("tokens_per_s"),
                 (loop.get("hf_gpt2") or {}).get("tokens_per_s"), (loop.get("dynascope") or {}).get("mfu")]
        rows.append(f"| {name} | {preset} ({shape}) | " + " | ".join(_fmt(c) for c in cells) + " |")
    costs, replay = results.get("analysis costs", {}), results.get("replay", {})
    rows.append(f"| {name} | analyses ({shape}) | all = {_fmt((costs.get('all') or {}).get('probe_forwards'))} "
                f"forwards | share first 512 steps {_fmt(costs.get('share_first_512_steps'))} | per 1000 steps "
                f"{_fmt(costs.get('share_1000_step_interval'))} | replay {_fmt(replay.get('snapshots_per_hour'))} "
                "snapshots/h |")
    return rows


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--shape", choices=list(SHAPES), help="default: 124m on cuda, tiny on cpu")
    p.add_argument("--data", help="a text file to train on instead of the embedded corpus")
    p.add_argument("--out", default="gpu-check.json")
    p.add_argument("--work", help="scratch directory (default: a new temporary one)")
    p.add_argument("--minutes", type=float, default=7.5, help="time budget; sections that would outlast it skip")
    a = p.parse_args()
    heap_up_to()  # as the dynascope executable runs
    shape = a.shape or ("124m" if a.device == "cuda" else "tiny")
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("DYNASCOPE_CACHE", str(work / "cache"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    data = (["--data.source", "files", "--data.paths", f"[{a.data}]", "--data.val_fraction", "0.2"] if a.data
            else ["--data.source", "embedded"])
    device = torch.device(a.device)
    check = Check(Path(a.out), a.minutes)
    check.results["device"] = {"name": torch.cuda.get_device_name() if a.device == "cuda" else "CPU",
                               "torch": torch.__version__, "shape": shape, "peak_bf16_flops": peak_flops(device)}
    check.section("throughput gpt2-124m (fit)", lambda: fit_throughput("gpt2-124m", work, shape, data, a.device), 60)
    check.section("throughput gpt2-124m (loop)", lambda: loop_throughput("gpt2-124m", shape, device,
                                                                         16 if shape == "124m" else 4, 20), 60)
    step_ms = check.results["throughput gpt2-124m (loop)"].get("dynascope", {}).get("step_ms", math.nan)
    fitted = Path(check.results["throughput gpt2-124m (fit)"].get("run", work / "missing"))
    check.section("analysis costs", lambda: analysis_costs(fitted, a.device, step_ms / 1e3), 30)
    check.section("throughput relu-124m (fit)", lambda: fit_throughput("relu-124m", work, shape, data, a.device), 60)
    check.section("resume", lambda: resume_check(work, shape, data, a.device), 60)
    resumed = Path(check.results["resume"].get("run", work / "missing"))
    check.section("replay", lambda: replay_rate(resumed, a.device), 20)
    check.section("fsdp", lambda: fsdp_check(work, shape, data, a.device), 40)
    rows = benchmark_rows(check.results, a.device, shape)
    check.results["benchmark_rows"] = rows
    check.out.write_text(json.dumps(check.results, indent=2))
    print("\n".join(["", "| device | what | fit tokens/s | fit MFU | loop tokens/s | HF GPT-2 tokens/s | loop MFU |",
                     "| --- | --- | --- | --- | --- | --- | --- |", *rows]))


if __name__ == "__main__":
    main()
