"""Emergence curves: one PNG per analysis and a one-page overview.

Curves are drawn against step on a symmetric-log x axis (step 0, the initialisation, stays on the
plot); the axis label gives the tokens per step. Per-layer keys (`.../L{l}`) share one panel per
metric. Curve tables (e.g. the regions analysis's median d̃(α)) get one figure with a curve per checkpoint.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dynascope.analysis.base import REGISTRY  # noqa: E402
from dynascope.analysis.records import read_csv, read_metrics, read_table, table_path  # noqa: E402
from dynascope.errors import DynascopeError  # noqa: E402

LAYER = re.compile(r"^(.*)/L(\d+)$")


def load_rows(run_dir: str | Path) -> tuple[list[dict], Path, Path]:
    """The offline table if `dynascope analyze` wrote one (in a run's analysis/ or an --hf output
    directory), else the analysis rows logged online; with the tables directory and the plots directory."""
    run_dir = Path(run_dir)
    for table in (run_dir / "analysis" / "metrics.csv", run_dir / "metrics.csv"):
        if table.exists():
            return read_csv(table), table.parent / "tables", table.parent / "plots"
    rows = [dict(r, step=r["trainer/global_step"]) for r in read_metrics(run_dir) if "dynamics/seconds" in r]
    if not rows:
        raise DynascopeError(f"{run_dir} has no analysis rows: run `dynascope analyze {run_dir}` first")
    return rows, run_dir / "tables", run_dir / "analysis" / "plots"


def plot_curve_table(path: Path, out: Path, max_curves: int = 6) -> Path | None:
    """One panel per series column; one curve per checkpoint (at most `max_curves`, spread over the run)."""
    entries = read_table(path)
    if not entries:
        return None
    n = min(max_curves, len(entries))
    picks = sorted({round(i * (len(entries) - 1) / max(1, n - 1)) for i in range(n)})
    columns = entries[0]["columns"]
    fig, axes = plt.subplots(1, len(columns) - 1, figsize=(5 * (len(columns) - 1), 3.8), squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(picks) - 1) for i in range(len(picks))])
    for j, ax in enumerate(axes.flat, start=1):
        for color, i in zip(colors, picks, strict=True):
            rows = entries[i]["rows"]
            ax.plot([r[0] for r in rows], [r[j] for r in rows], color=color, label=f"step {entries[i]['step']}")
        ax.set_xlabel(columns[0])
        ax.set_title(f"{path.stem.replace('__', '/')} ({columns[j]})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = out / f"{path.stem}.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _panels(rows: list[dict], analysis: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metric -> curve label -> [(step, value)] for one analysis's keys."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key, value in r.items():
            if not key.startswith(analysis + "/") or not isinstance(value, float) or math.isnan(value):
                continue
            m = LAYER.match(key)
            metric, label = (m.group(1), f"layer {m.group(2)}") if m else (key, key.split("/", 1)[1])
            panels[metric][label].append((r["step"], value))
    for metric, curves in panels.items():  # a headline alias of a per-layer metric (e.g. its first layer)
        if len(curves) > 1 and metric.split("/", 1)[1] in curves:
            del curves[metric.split("/", 1)[1]]
    return panels


def _step_label(rows: list[dict]) -> str:
    """'step', with the tokens per step when the run has a constant batch (a secondary axis cannot
    follow a symlog scale)."""
    per_step = {round(r["tokens_seen"] / r["step"]) for r in rows
                if r.get("step") and not math.isnan(r.get("tokens_seen", math.nan))}
    return f"step (1 step = {per_step.pop():,} tokens)" if len(per_step) == 1 else "step"


def _draw(ax, curves: dict[str, list], title: str, rows: list[dict]) -> None:
    for label, points in sorted(curves.items(), key=lambda kv: _layer_order(kv[0])):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(_step_label(rows))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)


def _layer_order(label: str):
    return (0, int(label.split()[-1])) if label.startswith("layer ") else (1, label)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<analysis>.png` for each analysis present and `overview.png`; returns the overview path."""
    rows, tables, default_out = load_rows(run_dir)
    out = Path(out_dir or default_out)
    out.mkdir(parents=True, exist_ok=True)
    present = [name for name in REGISTRY if any(k.startswith(name + "/") for r in rows for k in r)]
    for name in present:
        panels = _panels(rows, name)
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, (metric, curves) in zip(axes.flat, sorted(panels.items()), strict=False):
            _draw(ax, curves, metric, rows)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{name} analysis — {Path(run_dir).resolve().name}")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        for key in REGISTRY[name].curve_tables:
            table = table_path(tables, key)
            if table.exists():
                plot_curve_table(table, out)
    cols = min(3, max(1, len(present)))
    nrows = math.ceil(max(1, len(present)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, present, strict=False):
        key = REGISTRY[name].headline
        metric = LAYER.match(key).group(1) if LAYER.match(key) else key
        curves = _panels(rows, name).get(metric, {})
        _draw(ax, curves, metric, rows)
        if not curves:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    fig.suptitle(f"dynascope overview — {Path(run_dir).resolve().name}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    overview = out / "overview.png"
    fig.savefig(overview, dpi=110)
    plt.close(fig)
    return overview
