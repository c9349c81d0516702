"""Each analysis key's value at random init (step 0) and at the last checkpoint: the README's key table.

    python benchmarks/key_table.py --train DIR [--seeds 1234 1 2]   # the demo (tiny-relu), once per seed
    python benchmarks/key_table.py RUN_DIR [RUN_DIR ...]              # runs already trained and analysed

`--train` trains configs/tiny-relu.yaml into DIR/seed-S for each seed and analyses it (about 3.5 minutes
each on two CPU cores). The rows are read as the report reads them (online and offline merged). The first
run gives the values; with several runs a value that differs across them (at 3 significant digits) is
followed by its range over the runs in brackets. Per-layer keys are folded into one line (`L0, L1, ...`).
The last column says whether the key reads differently at init and after training in the first run:
`same` marks one that does not, which the README must explain.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from dynascope.core.records import LAYER, RunHistory


def fmt(value: float) -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "—"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


def cell(values: list[float]) -> str:
    """The first run's value, and the range over the runs when they differ."""
    shown = [fmt(v) for v in values]
    finite = [v for v in values if isinstance(v, float) and not math.isnan(v)]
    if len(set(shown)) == 1 or not finite:
        return shown[0]
    return f"{shown[0]} [{fmt(min(finite))}–{fmt(max(finite))}]"


def table(run_dirs: list[Path]) -> list[str]:
    histories = [RunHistory.load(d) for d in run_dirs]
    firsts, lasts = [h.rows[0] for h in histories], [h.rows[-1] for h in histories]
    keys: dict[str, list[str]] = defaultdict(list)
    for key in sorted({k for h in histories for r in h.rows for k in r
                       if "/" in k and not k.startswith(("dynamics/", "trainer/", "train/", "lr-"))}):
        m = LAYER.match(key)
        keys[m.group(1) + "/L{l}" if m else key].append(key)
    head = lasts[0]
    lines = [f"{len(run_dirs)} run(s): step {firsts[0]['step']:.0f} vs step {head['step']:.0f} "
             f"({head.get('tokens_seen', math.nan):,.0f} tokens)",
             "| key | random init | trained | |", "| --- | --- | --- | --- |"]
    for name, members in keys.items():
        members.sort(key=lambda k: int(LAYER.match(k).group(2)) if LAYER.match(k) else -1)
        init = ", ".join(cell([r.get(k, math.nan) for r in firsts]) for k in members)
        trained = ", ".join(cell([r.get(k, math.nan) for r in lasts]) for k in members)
        same = [fmt(firsts[0].get(k, math.nan)) for k in members] == [fmt(head.get(k, math.nan)) for k in members]
        lines.append(f"| `{name}` | {init} | {trained} | {'same' if same else ''} |")
    return lines


def train(out: Path, seeds: list[int]) -> list[Path]:
    runs = []
    for seed in seeds:
        run = out / f"seed-{seed}"
        if not (run / "analysis" / "metrics.csv").exists():
            dynascope = str(Path(sys.executable).with_name("dynascope"))
            subprocess.run([dynascope, "fit", "--config", "configs/tiny-relu.yaml", "--seed_everything", str(seed),
                            "--trainer.default_root_dir", str(run)], check=True)
            subprocess.run([dynascope, "analyze", str(run)], check=True)
        runs.append(run)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, help="run directories, trained and analysed")
    p.add_argument("--train", type=Path, help="train the demo into this directory, once per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    a = p.parse_args()
    runs = train(a.train, a.seeds) if a.train else a.runs
    if not runs:
        p.error("give run directories, or --train DIR")
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
