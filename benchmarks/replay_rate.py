"""Offline replay throughput: snapshots per hour of `dynascope analyze RUN_DIR` (every analysis, no pages).

    python benchmarks/replay_rate.py RUN_DIR [--repeats 2] [--device cpu|cuda]

Replays a copy of the run (the run itself is left as it is) `--repeats` times and prints the best rate.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dynascope.analyze import AnalyzeRequest, analyze
from dynascope.core.heap import heap_up_to
from dynascope.core.snapshots import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    heap_up_to()  # as the dynascope executable runs
    rates = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(shutil.copytree(a.run, Path(scratch) / a.run.name, ignore=shutil.ignore_patterns(
                "analysis", "wandb", "checkpoints", "plots", "report")))
            start = time.perf_counter()
            analyze(AnalyzeRequest(run=str(copy), device=a.device), plot=False)
            rates.append(len(read_manifest(copy)) / (time.perf_counter() - start) * 3600)
    print(f"{a.run}: {len(read_manifest(a.run))} snapshots, {max(rates):,.0f} snapshots/hour on {a.device} "
          f"({torch.get_num_threads()} threads; best of {a.repeats})")


if __name__ == "__main__":
    main()
