"""Emergence curves: one PNG per analysis (every key a panel) and a one-page overview of the headlines.

Per-layer keys (`.../L{l}`) share one panel per metric, one colour per layer, the same in every panel.
Curve tables (e.g. the regions analysis's median d̃(α), with its interquartile band in `... p25` /
`... p75` columns) get one figure with a curve per checkpoint. The axes are those of
`dynascope.analysis.figures`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from dynascope.analysis import REGISTRY
from dynascope.analysis.figures import RunPlot, finite, layer_color, time_colors
from dynascope.core.io import ensure_writable
from dynascope.core.records import LAYER, RunHistory, read_table

BAND = re.compile(r"^(.*) p(25|75)$")


def plot_curve_table(path: Path, out: Path, max_curves: int = 6) -> Path | None:
    """One panel per series column (a `... p25`/`... p75` pair is drawn as that series' band); one
    curve per checkpoint (at most `max_curves`, spread over the run)."""
    entries = read_table(path)
    if not entries:
        return None
    n = min(max_curves, len(entries))
    picks = sorted({round(i * (len(entries) - 1) / max(1, n - 1)) for i in range(n)})
    columns = entries[0]["columns"]
    series = [j for j, c in enumerate(columns) if j and not BAND.match(c)]
    fig = Figure(figsize=(5 * len(series), 3.8))
    for ax, j in zip(fig.subplots(1, len(series), squeeze=False).flat, series, strict=True):
        band = [columns.index(f"{columns[j]} p{p}") for p in (25, 75) if f"{columns[j]} p{p}" in columns]
        for color, i in zip(time_colors(len(picks)), picks, strict=True):
            rows = entries[i]["rows"]
            xs = [r[0] for r in rows]
            ax.plot(xs, [r[j] for r in rows], color=color, label=f"step {entries[i]['step']}")
            if len(band) == 2:
                ax.fill_between(xs, [r[band[0]] for r in rows], [r[band[1]] for r in rows], color=color, alpha=0.12)
        ax.set_xlabel(columns[0])
        ax.set_title(f"{path.stem.replace('__', '/')} ({columns[j]})" + (", median and IQR" if band else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = out / f"{path.stem}.png"
    fig.savefig(target, dpi=110)
    return target


def _panels(rows: list[dict], analysis: str) -> dict[str, dict[str, list]]:
    """metric -> curve label -> (row, value) of the rows that have it, for one analysis's keys."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key, value in r.items():
            if not key.startswith(analysis + "/") or not finite(value):
                continue
            m = LAYER.match(key)
            metric, label = (m.group(1), f"layer {m.group(2)}") if m else (key, key.split("/", 1)[1])
            panels[metric][label].append((r, value))
    for metric, curves in panels.items():  # a headline alias of a per-layer metric (e.g. its first layer)
        if len(curves) > 1 and metric.split("/", 1)[1] in curves:
            del curves[metric.split("/", 1)[1]]
    return panels


def _layer_order(label: str):
    return (0, int(label.split()[-1])) if label.startswith("layer ") else (1, label)


def draw_curves(ax, curves: dict[str, list], title: str, plot: RunPlot) -> None:
    for label, points in sorted(curves.items(), key=lambda kv: _layer_order(kv[0])):
        xs, ys = zip(*sorted((plot.axis.x(r), v) for r, v in points), strict=True)
        layer = label.startswith("layer ")
        ax.plot(xs, ys, marker="o", markersize=3, label=label,
                color=layer_color(int(label.split()[-1]), plot.n_layers) if layer else None)
    plot.finish(ax, title, legend=len(curves) > 1)


def _grid(n: int, cols: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure of n panels in rows of `cols`; the unused axes are hidden."""
    cols = min(cols, max(1, n))
    rows = math.ceil(max(1, n) / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig: Figure, title: str, path: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    return path


def measured(history: RunHistory) -> list[str]:
    """The registered analyses with keys in the run's rows, in registry order."""
    return [name for name in REGISTRY if any(k.startswith(name + "/") for r in history.rows for k in r)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<analysis>.png` for each analysis present and `overview.png` into `out_dir` (default RUN/plots),
    in place of the ones an earlier call wrote there (other files are left alone); returns the overview path."""
    history = RunHistory.load(run_dir)
    plot = RunPlot(history)
    out = ensure_writable(Path(out_dir or history.root.plots))
    for name in [*REGISTRY, "overview"]:  # an analysis measured before but not now leaves no stale picture
        (out / f"{name}.png").unlink(missing_ok=True)
    present = measured(history)
    for name in present:
        panels = _panels(history.rows, name)
        fig, axes = _grid(len(panels), 3, 5, 3.8)
        for ax, (metric, curves) in zip(axes, sorted(panels.items()), strict=False):
            draw_curves(ax, curves, metric, plot)
        _save(fig, f"{name} analysis — {history.name}", out / f"{name}.png")
        for key in REGISTRY[name].curve_tables:
            if history.files.table(key).exists():
                plot_curve_table(history.files.table(key), out)
    fig, axes = _grid(len(present), 3, 5.5, 4)
    for ax, name in zip(axes, present, strict=False):
        key = REGISTRY[name].headline
        metric = LAYER.match(key).group(1) if LAYER.match(key) else key
        curves = _panels(history.rows, name).get(metric, {})
        draw_curves(ax, curves, metric, plot)
        if not curves:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, f"dynascope overview — {history.name}", out / "overview.png")
