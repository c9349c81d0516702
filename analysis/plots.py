"""Emergence curves: one PNG per analysis and a one-page overview, and the drawing helpers the report shares.

Curves are drawn against tokens seen on a symmetric-log axis (step 0, the initialisation, stays on
the plot), with the step on a secondary axis on top; without token counts (e.g. Hugging Face
checkpoints), against the step. Per-layer keys (`.../L{l}`) share one panel per metric, one colour
per layer, the same in every panel. Curve tables (e.g. the regions analysis's median d̃(α), with its
interquartile band in `... p25` / `... p75` columns) get one figure with a curve per checkpoint.
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
BAND = re.compile(r"^(.*) p(25|75)$")


def load_rows(run_dir: str | Path) -> tuple[list[dict], Path, Path]:
    """A run's analysis rows by step: those logged online (with the training-stream keys only they have)
    merged with the offline table of `dynascope analyze` (with the keys only it has), in a run directory
    or an `analyze --hf` output directory; with the tables directory and the plots directory."""
    run_dir = Path(run_dir)
    rows = {r["trainer/global_step"]: dict(r, step=r["trainer/global_step"])
            for r in read_metrics(run_dir) if "dynamics/seconds" in r}
    out = run_dir / "analysis" if (run_dir / "analysis" / "metrics.csv").exists() or rows else run_dir
    if (out / "metrics.csv").exists():
        for r in read_csv(out / "metrics.csv"):
            rows[int(r["step"])] = rows.get(int(r["step"]), {}) | {k: v for k, v in r.items() if v == v or k == "label"}
    if not rows:
        raise DynascopeError(f"{run_dir} has no analysis rows: run `dynascope analyze {run_dir}` first")
    tables = out / "tables" if (out / "tables").exists() else run_dir / "tables"
    return [rows[s] for s in sorted(rows)], tables, out / "plots"


class TrainingAxis:
    """The x axis of a run's curves: tokens seen (symlog, steps on top) when every row has them, else steps."""

    def __init__(self, rows: list[dict]):
        per_step = {r["tokens_seen"] / r["step"] for r in rows if r.get("step") and _finite(r.get("tokens_seen"))}
        self.tokens_per_step = per_step.pop() if len(per_step) == 1 else None
        self.by_tokens = bool(rows) and all(_finite(r.get("tokens_seen")) for r in rows)

    def x(self, row: dict) -> float:
        return row["tokens_seen"] if self.by_tokens else row["step"]

    def setup(self, ax) -> None:
        if not self.by_tokens:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=-0.3)
            ax.set_xlabel("step")
            return
        tps = self.tokens_per_step or 1
        ax.set_xscale("symlog", linthresh=tps)  # linear up to step 1, logarithmic after
        ax.set_xlim(left=-0.3 * tps)
        ax.set_xlabel("tokens seen")
        if self.tokens_per_step:  # steps on top: a twin with the same scale (a secondary axis cannot follow symlog)
            top = ax.twiny()
            top.set_xscale("symlog", linthresh=tps)
            top.set_xlim(ax.get_xlim())
            ax.callbacks.connect("xlim_changed", lambda a: top.set_xlim(a.get_xlim()))
            last = ax.get_xlim()[1] / tps
            steps = [0] + [10 ** k for k in range(13) if 10 ** k <= last]
            top.set_xticks([s * tps for s in steps], [f"{s:,}" for s in steps])
            top.set_xlabel("step", fontsize=8)
            top.tick_params(labelsize=7)


def layer_color(layer: int, n_layers: int):
    """The colour of layer `layer`: the same in every panel of a run."""
    return plt.cm.viridis(0.9 * layer / max(1, n_layers - 1))


def time_colors(n: int) -> list:
    """Colours of n checkpoints in training order (light to dark)."""
    return [plt.cm.plasma(0.85 * (1 - i / max(1, n - 1))) for i in range(n)]


def changes(values: list[float]) -> bool:
    finite = [v for v in values if _finite(v)]
    return len(finite) > 1 and max(finite) - min(finite) > 1e-9 * max(1.0, max(abs(v) for v in finite))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
    for ax, j in zip(axes.flat, series, strict=True):
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
    plt.close(fig)
    return target


def _panels(rows: list[dict], analysis: str) -> dict[str, dict[str, list[dict]]]:
    """metric -> curve label -> rows that have it, for one analysis's keys."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key, value in r.items():
            if not key.startswith(analysis + "/") or not _finite(value):
                continue
            m = LAYER.match(key)
            metric, label = (m.group(1), f"layer {m.group(2)}") if m else (key, key.split("/", 1)[1])
            panels[metric][label].append((r, value))
    for metric, curves in panels.items():  # a headline alias of a per-layer metric (e.g. its first layer)
        if len(curves) > 1 and metric.split("/", 1)[1] in curves:
            del curves[metric.split("/", 1)[1]]
    return panels


def draw_curves(ax, curves: dict[str, list], title: str, axis: TrainingAxis, n_layers: int) -> None:
    for label, points in sorted(curves.items(), key=lambda kv: _layer_order(kv[0])):
        xs, ys = zip(*sorted((axis.x(r), v) for r, v in points), strict=True)
        layer = label.startswith("layer ")
        ax.plot(xs, ys, marker="o", markersize=3, label=label,
                color=layer_color(int(label.split()[-1]), n_layers) if layer else None)
    axis.setup(ax)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)


def n_layers_of(rows: list[dict]) -> int:
    return 1 + max((int(m.group(2)) for r in rows for k in r if (m := LAYER.match(k))), default=0)


def _layer_order(label: str):
    return (0, int(label.split()[-1])) if label.startswith("layer ") else (1, label)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<analysis>.png` for each analysis present and `overview.png`, in place of the PNGs an earlier
    call wrote there; returns the overview path."""
    rows, tables, default_out = load_rows(run_dir)
    out = Path(out_dir or default_out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    axis, n_layers = TrainingAxis(rows), n_layers_of(rows)
    present = [name for name in REGISTRY if any(k.startswith(name + "/") for r in rows for k in r)]
    for name in present:
        panels = _panels(rows, name)
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, (metric, curves) in zip(axes.flat, sorted(panels.items()), strict=False):
            draw_curves(ax, curves, metric, axis, n_layers)
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
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, present, strict=False):
        key = REGISTRY[name].headline
        metric = LAYER.match(key).group(1) if LAYER.match(key) else key
        curves = _panels(rows, name).get(metric, {})
        draw_curves(ax, curves, metric, axis, n_layers)
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
