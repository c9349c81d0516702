"""Throughput and analysis overhead of a finished `dynascope fit` run, from its metrics.jsonl.

    python benchmarks/run_report.py RUN_DIR [RUN_DIR ...]

Prints, per run: steps, training tokens/s (`train/device/items_per_sec`, mean over the logged
windows; runs whose throughput monitor leaves the analyses out also log the wall-clock figure
`train/device/wall_items_per_sec`, printed beside it), MFU where the device has a known peak, the
number of analysis measurements, their mean and total wall time (`dynamics/seconds`), and that total
as a share of the training wall time (the throughput monitor's `train/time` at the last step, plus the
measurements when the monitor left them out).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from dynascope.core.records import read_metrics


def report(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.mean(values) if values else None

    analysis = [r["dynamics/seconds"] for r in rows if "dynamics/seconds" in r]
    left_out = any("train/device/wall_items_per_sec" in r for r in rows)  # train/time is training alone
    wall = max((r["train/time"] for r in rows if "train/time" in r), default=float("nan")) + left_out * sum(analysis)
    return {"run": str(run_dir), "steps": max(r["trainer/global_step"] for r in rows),
            "tokens_per_s": mean("train/device/items_per_sec"),
            "wall_tokens_per_s": mean("train/device/wall_items_per_sec"),
            "mfu": mean("train/device/mfu"), "measurements": len(analysis),
            "analysis_s_mean": statistics.mean(analysis) if analysis else 0.0, "analysis_s_total": sum(analysis),
            "train_wall_s": wall, "analysis_share": sum(analysis) / wall if wall == wall and wall else float("nan")}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        r = report(Path(arg))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known peak)"
        wall = f" ({r['wall_tokens_per_s']:,.0f} wall-clock)" if r["wall_tokens_per_s"] is not None else ""
        print(f"{r['run']}: {r['steps']} steps, {r['tokens_per_s']:,.0f} tokens/s{wall}, MFU {mfu}, "
              f"{r['measurements']} analysis measurements, {r['analysis_s_mean']:.2f} s each, "
              f"{r['analysis_s_total']:.1f} s of {r['train_wall_s']:.1f} s training wall time "
              f"({100 * r['analysis_share']:.1f}%)")
