"""Each analysis key's value at random init (step 0) and at the last checkpoint of a run.

    python benchmarks/key_table.py RUN_DIR

Reads the run's analysis rows (online and offline merged, as the report does) and prints one line per
key, per-layer keys folded into one line (`L0, L1, ...` values in order). The README's key table
quotes these numbers for the tiny-relu demo.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict

from dynascope.core.records import LAYER, RunHistory


def fmt(value: float) -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "—"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


def main(run_dir: str) -> None:
    rows = RunHistory.load(run_dir).rows
    first, last = rows[0], rows[-1]
    keys: dict[str, list[str]] = defaultdict(list)
    for key in sorted({k for r in rows for k in r if "/" in k and not k.startswith(("dynamics/", "trainer/"))}):
        m = LAYER.match(key)
        keys[m.group(1) if m else key].append(key)
    print(f"step {first['step']:.0f} vs step {last['step']:.0f} ({last.get('tokens_seen', math.nan):,.0f} tokens)")
    for name, members in keys.items():
        members.sort(key=lambda k: int(LAYER.match(k).group(2)) if LAYER.match(k) else -1)
        init = ", ".join(fmt(first.get(k, math.nan)) for k in members)
        trained = ", ".join(fmt(last.get(k, math.nan)) for k in members)
        print(f"{name}{'/L{l}' if LAYER.match(members[0]) else ''}\t{init}\t{trained}")


if __name__ == "__main__":
    main(sys.argv[1])
