"""`dynascope compare`: one page overlaying the headline curves of several runs.

It takes run directories of `dynascope fit` and output directories of `dynascope analyze --hf`, mixed, and
writes `index.html` (every figure embedded as a PNG, also saved beside it). Each run is named by the settings
in which its config.yaml differs from the other runs' (those that shape the training trajectory, `trajectory`,
and those that say what is measured, `measured`; flattened; `model.arch.activation` shows as `activation`
unless two settings end alike); an `analyze --hf` directory by its name. One run given twice is an error. Runs
that differ only in seeds (settings named like `seed_everything`, `data.seed`) form a group, drawn as the mean
over its runs with a band from the smallest to the largest value (the interquartile range from 4 runs). A
group is drawn only at the steps all its runs measured: nothing is interpolated, and a run or group shows
markers at its own steps. Per-layer metrics get a panel for the first layer and one for the last (each run's
own). Panels whose curves never change are left out. A table gives each run's and each group's emergence and
convergence steps (summary.json), a group's as its range over the seeds.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from dynascope.analysis import REGISTRY
from dynascope.analysis.figures import RunPlot, TrainingAxis, changes
from dynascope.core.errors import DynascopeError
from dynascope.core.io import ensure_writable
from dynascope.core.records import RunHistory
from dynascope.core.runfiles import RunFiles
from dynascope.core.settings import measured, short_keys, trajectory, value_text
from dynascope.pages.report import embed, write_page


@dataclass
class Group:
    """Runs that differ only in seeds (or a single run), and each run's own name."""

    label: str
    runs: list[RunHistory]
    names: list[str]


def _is_seed(key: str) -> bool:
    return "seed" in key.rsplit(".", 1)[-1]  # seed_everything, data.seed, dynamics.probe_seed


def _describe(values: dict[str, Any], short: dict[str, str]) -> str:
    """`activation=relu, seed=1`: the seeds once when a run's seed settings agree."""
    parts = [f"{short[k]}={value_text(v)}" for k, v in values.items() if not _is_seed(k)]
    seeds = {k: value_text(v) for k, v in values.items() if _is_seed(k)}
    if len(set(seeds.values())) == 1:
        return ", ".join([*parts, f"seed={next(iter(seeds.values()))}"])
    return ", ".join(parts + [f"{short[k]}={v}" for k, v in seeds.items()])


def load_groups(directories: list[str | Path]) -> list[Group]:
    """The runs in `directories`, named and grouped by how their configs differ."""
    runs, seen = [], {}
    for d in map(Path, directories):
        if (same := seen.setdefault(d.resolve(), d)) is not d:
            raise DynascopeError(f"compare: {d} and {same} are the same run; give each run once")
        files = RunFiles(d)
        if not any(f.is_file() for f in (files.config, files.metrics_jsonl, files.metrics_csv)):
            raise DynascopeError(f"{d} is neither a run directory of `dynascope fit` (config.yaml, metrics.jsonl) nor "
                                 "an output directory of `dynascope analyze --hf` (metrics.csv); give one of those")
        runs.append(RunHistory.load(d))
    flat = {id(r): trajectory(r.config) | measured(r.config) for r in runs if r.config}  # what it trained, measured
    # settings every config has (an older dynascope lacks newer options) with more than one value
    keys = [k for k in dict.fromkeys(k for f in flat.values() for k in f) if all(k in f for f in flat.values())]
    differ = [k for k in keys if len({json.dumps(f[k], default=str) for f in flat.values()}) > 1]
    short = short_keys(differ)
    groups: dict[str, Group] = {}
    for run in runs:
        values = {k: flat[id(run)][k] for k in differ} if run.config else {}
        setting = {k: v for k, v in values.items() if not _is_seed(k)}
        key = json.dumps(setting, default=str) if run.config else f"dir:{run.name}"
        group = groups.setdefault(key, Group(_describe(setting, short) if setting else "", [], []))
        group.runs.append(run)
        group.names.append(_describe(values, short) if values else run.name)
    for group in groups.values():  # a lone run's label names its seed too; seeds of the only setting, all
        if len(group.runs) == 1 or not group.label:
            group.label = "; ".join(group.names)
    return list(groups.values())


def _points(run: RunHistory, key: str, axis: TrainingAxis) -> dict[float, float]:
    return {axis.x(r): r[key] for r in run.rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])}


def _layers(run: RunHistory, metric: str) -> list[int]:
    """The layers a run measured a per-layer metric at."""
    return [l for l in range(run.n_layers) if any(f"{metric}/L{l}" in r for r in run.rows)]


def _layer_key(run: RunHistory, metric: str, which: str | None) -> str | None:
    """The key of `metric` for a run: itself, or its first or last layer's (`which`)."""
    if which is None:
        return metric
    layers = _layers(run, metric)
    return f"{metric}/L{layers[0 if which == 'first' else -1]}" if layers else None


def _panel(groups: list[Group], metric: str, which: str | None, axis: TrainingAxis,
           reference: dict[str, float]) -> Callable:
    """A panel drawing every group's curve of one metric, at the steps all the group's runs measured; it draws
    nothing when no curve changes."""
    curves = []  # (group index, steps, [values at them, per run])
    for i, group in enumerate(groups):
        keys = [_layer_key(run, metric, which) for run in group.runs]
        series = [_points(run, key, axis) if key else {} for run, key in zip(group.runs, keys, strict=True)]
        xs = sorted(set.intersection(*(set(s) for s in series)))  # nothing is interpolated
        if xs:
            curves.append((i, xs, np.array([[s[x] for x in xs] for s in series])))
    layers = {k for g in groups for r in g.runs if (k := _layer_key(r, metric, which))}
    title = metric if which is None else f"{layers.pop() if len(layers) == 1 else metric} ({which} layer measured)"

    def draw(ax) -> bool:
        if not any(changes(list(run)) for _, _, ys in curves for run in ys):
            return False
        for i, xs, ys in curves:
            color, group = matplotlib.colormaps["tab10"](i % 10), groups[i]
            label = f"{group.label} ({len(ys)} seeds)" if len(ys) > 1 else group.label
            ax.plot(xs, ys.mean(0), marker="o", markersize=3, color=color, label=label)
            if len(ys) > 1:
                lo, hi = np.percentile(ys, [25, 75], axis=0) if len(ys) >= 4 else (ys.min(0), ys.max(0))
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        if metric in reference:
            ax.axhline(reference[metric], color="gray", linewidth=0.8, linestyle="--")
        axis.setup(ax)
        ax.set_title(title, fontsize=10, pad=axis.title_pad)
        ax.set_ylabel(metric.rsplit("/", 1)[-1].replace("_", " "), fontsize=9)
        ax.grid(alpha=0.3)
        return True

    return draw


def compare_figures(groups: list[Group]) -> list[tuple[str, Figure]]:
    """(analysis, figure) for each analysis with a curve that changes; one legend per figure, below it."""
    axis = TrainingAxis([r for g in groups for run in g.runs for r in run.rows])
    figures = []
    for name, analysis in REGISTRY.items():
        panels = []
        for metric in analysis.compared():
            layered = any(_layers(run, metric) for g in groups for run in g.runs)
            panels += [_panel(groups, metric, which, axis, analysis.reference_lines)
                       for which in (("first", "last") if layered else (None,))]
        fig = RunPlot.row(panels, width=4.6, height=3.6)
        if fig is None:
            continue
        labels = {}  # every group drawn in any panel, in group order
        for ax in fig.axes:
            labels |= {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        columns = max(1, min(4, len(labels), len(fig.axes)))  # a narrow figure's legend is one column
        fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=columns, fontsize=8, frameon=False)
        rows = -(-len(labels) // columns)
        fig.tight_layout(rect=(0, (0.1 + 0.2 * rows) / fig.get_figheight(), 1, 1))  # room for the legend
        figures.append((name, fig))
    return figures


def _step(summary: dict, key: str) -> str:
    """A run's onset: its step, its bracket where it has one, and how often it was revised."""
    if key not in summary:
        return "—"
    name = key.removesuffix("_step")
    revised = summary.get(f"{name}_revisions") or 0
    lo, hi = summary.get(f"{name}_bracket_lo"), summary.get(f"{name}_bracket_hi")
    step = "none" if summary[key] is None else f"{summary[key]:.0f}"
    notes = ([f"between {lo:.0f} and {hi:.0f}"] if lo is not None and hi is not None else []) + (
        [f"revised {revised:.0f}×"] if revised else [])
    return step + (f" ({', '.join(notes)})" if notes else "")


def event_rows(groups: list[Group]) -> tuple[list[str], list[tuple[str, bool, list[str]]]]:
    """The emergence and convergence steps: the event keys, and a row (name, is a group, cells) per group of
    several runs, with the range over its runs (and how many have the event, when not all), and per run. A
    cell is "—" where a run has no such event, "none" where it was revised away (and how often it was revised)."""
    keys = sorted({k for g in groups for run in g.runs for k in run.summary if k.endswith("_step")})
    rows = []
    for group in groups:
        if len(group.runs) > 1:
            cells = []
            for key in keys:
                steps = [run.summary[key] for run in group.runs if run.summary.get(key) is not None]
                if not steps:
                    cells.append("none" if any(key in run.summary for run in group.runs) else "—")
                    continue
                spread = f"{min(steps):.0f}" + (f"–{max(steps):.0f}" if max(steps) > min(steps) else "")
                cells.append(spread + (f" ({len(steps)} of {len(group.runs)})" if len(steps) < len(group.runs) else ""))
            rows.append((f"{group.label} ({len(group.runs)} seeds)", True, cells))
        rows += [(name, False, [_step(run.summary, key) for key in keys])
                 for run, name in zip(group.runs, group.names, strict=True)]
    return keys, rows


def _table(groups: list[Group]) -> str:
    keys, rows = event_rows(groups)
    if not keys:
        return "<p>No emergence or convergence events in these runs' summaries.</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", *keys])
    body = "".join(f"<tr class='{'group' if is_group else 'run'}'><td>{html.escape(name)}</td>"
                   + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for name, is_group, cells in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_compare(directories: list[str | Path], out_dir: str | Path) -> Path:
    """Write the comparison page of `directories` to `out_dir`/index.html; returns its path."""
    groups = load_groups(directories)
    out = ensure_writable(out_dir)
    runs = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(str(run.root.root))}, {len(run.rows)} "
                   f"checkpoints</li>" for g in groups for run, name in zip(g.runs, g.names, strict=True))
    n_runs = sum(len(g.runs) for g in groups)
    seeded = "" if len(groups) == n_runs else ", the seeds of one setting" if len(groups) == 1 else \
        f", {len(groups)} settings (the seeds of each drawn together)"
    body = [f"<h1>dynascope compare: {n_runs} runs{seeded}</h1>",
            f"<ul class='meta'>{runs}</ul><p class='meta'>Runs that differ only in seeds are drawn as their mean with "
            "a min–max band (interquartile range from 4 seeds), at the steps all of them measured.</p>",
            "<h2>Emergence and convergence (step)</h2>", _table(groups)]
    for name, fig in compare_figures(groups):
        analysis = REGISTRY[name]
        title = analysis.title or name
        body += [f"<h2>{html.escape(f'{title} ({analysis.paper})' if analysis.paper else title)}</h2>",
                 embed(fig, out / f"{name}.png")]
    return write_page(out, "dynascope compare", body, _STYLE)


_STYLE = "tr.group td{font-weight:bold;background:#f8f8f8} tr.run td:first-child{padding-left:1.6em}"
