"""What each analysis costs, as a multiple of one forward pass over the probe set, measured in one process.

    python benchmarks/analysis_cost.py RUN_DIR [--step N] [--repeats 5] [--device cpu|cuda]

On a run's snapshot (the last one by default) it times a plain forward pass over the probe set (in
the run's probe batches), then one `measure` of each analysis alone (its own forward pass included)
and of all of them together, as `dynascope fit` and `dynascope analyze` run them. Each timing is the
median of `--repeats` after one warm-up, which also gives every analysis its carry from a previous
checkpoint, as in a real run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dynascope.analysis.base import build, resolve
from dynascope.analysis.measure import measure
from dynascope.analysis.replay import run_context, run_options
from dynascope.analysis.view import TransformerView
from dynascope.core.io import read_yaml
from dynascope.core.model import ModelConfig
from dynascope.core.probe import load_probe
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import load_snapshot, read_manifest


def seconds(fn, repeats: int, device: str) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--step", type=int, help="snapshot step (default: the last)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    run = RunFiles(a.run)
    config = read_yaml(run.config, "run config")
    arch = ModelConfig(**config["model"]["arch"])
    step = a.step if a.step is not None else max(read_manifest(a.run))
    view = TransformerView.from_snapshot(arch, load_snapshot(a.run, step))
    view.model.to(a.device)
    probe = load_probe(run.probe)
    batch_size = (config.get("dynamics") or {}).get("batch_size", 16)
    context, options = run_context(a.run, config), run_options(a.run)
    context.final_output_embeddings = view.output_embeddings.detach().clone()

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, len(probe), batch_size):
                view.forward(probe[start:start + batch_size].to(a.device))

    def measuring(names: list[str]):
        analyses = build(names, view.shape, context, options, a.device)
        return lambda: measure(view, analyses, probe, step, batch_size=batch_size)

    base = seconds(forward, a.repeats, a.device)
    print(f"{a.run} step {step} on {a.device} ({torch.get_num_threads()} threads): one probe forward "
          f"({len(probe)} windows of {probe.shape[1]} tokens) {base * 1e3:.0f} ms")
    for name in [*resolve("all"), "all"]:
        s = seconds(measuring(resolve(name)), a.repeats, a.device)
        print(f"  {name:<10} {s * 1e3:7.0f} ms  {s / base:5.1f} probe forwards")


if __name__ == "__main__":
    main()
