"""Seconds per revision of `dynascope verify` and `dynascope analyze --hf` over a run's snapshots exported as
Hugging Face checkpoints (a suite as Pythia's are), beside `verify` on the run itself.

    python benchmarks/suite_rate.py RUN_DIR [--analyses all]

The exports and records go to a temporary directory; the run is left as it is.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dynascope.analyze import AnalyzeRequest, analyze
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import read_manifest
from dynascope.export import export_run
from dynascope.verify import verify


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--analyses", default="all")
    a = p.parse_args()
    n = len(read_manifest(a.run))
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(shutil.copytree(a.run, Path(scratch) / a.run.name, ignore=shutil.ignore_patterns(
            "analysis", "wandb", "checkpoints", "plots", "report")))
        export_run(copy, Path(scratch) / "hf")
        suite = [str(Path(scratch) / "hf" / f"step{s}") for s in sorted(read_manifest(a.run))]
        run = RunFiles(copy)
        seconds = {
            "verify RUN_DIR": timed(lambda: verify([str(copy)], None)),
            "verify --hf suite": timed(lambda: verify(suite, f"{scratch}/verified")),
            "analyze --hf suite": timed(lambda: analyze(AnalyzeRequest(
                hf=suite, out=f"{scratch}/analysed", probe=str(run.probe), counts=str(run.counts),
                analyses=a.analyses), plot=False)),
        }
    for what, s in seconds.items():
        print(f"{what}: {n} revisions, {s / n:.2f} s per revision ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
