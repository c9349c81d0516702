"""Throughput and analysis overhead of a finished `dynascope fit` run, from its metrics.jsonl.

    python benchmarks/run_report.py RUN_DIR [RUN_DIR ...]

Prints, per run: steps, tokens/s (Lightning's ThroughputMonitor, mean over the logged windows; it
includes the time spent in callbacks), MFU where the device has a known peak, the number of
analysis measurements, their mean and total wall time (`dynamics/seconds`), and that total as a
share of the training wall time (`train/time` at the last step).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def report(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tput = [r["train/device/items_per_sec"] for r in rows if "train/device/items_per_sec" in r]
    mfu = [r["train/device/mfu"] for r in rows if "train/device/mfu" in r]
    analysis = [r["dynamics/seconds"] for r in rows if "dynamics/seconds" in r]
    wall = max((r["train/time"] for r in rows if "train/time" in r), default=float("nan"))
    steps = max(r["trainer/global_step"] for r in rows)
    return {"run": str(run_dir), "steps": steps, "tokens_per_s": statistics.mean(tput) if tput else float("nan"),
            "mfu": statistics.mean(mfu) if mfu else None, "measurements": len(analysis),
            "analysis_s_mean": statistics.mean(analysis) if analysis else 0.0, "analysis_s_total": sum(analysis),
            "train_wall_s": wall, "analysis_share": sum(analysis) / wall if wall == wall and wall else float("nan")}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        r = report(Path(arg))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak)"
        print(f"{r['run']}: {r['steps']} steps, {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
              f"{r['measurements']} analysis measurements, {r['analysis_s_mean']:.2f} s each, "
              f"{r['analysis_s_total']:.1f} s of {r['train_wall_s']:.1f} s training wall time "
              f"({100 * r['analysis_share']:.1f}%)")
