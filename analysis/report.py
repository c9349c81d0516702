"""`dynascope report`: one self-contained page with each paper's headline figure, drawn from one run.

It reads what the run directory (or an `analyze --hf` output directory) already holds: the metrics
(the offline table if `dynascope analyze` wrote one, else the rows logged online), the tables and
the summary. It writes `report/index.html`, every figure embedded as a PNG (also saved beside it),
readable without wandb. Curves are drawn against tokens seen (log axis, steps on top), one colour per
layer in every figure; panels whose curves never change are left out.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt

from dynascope.analysis.plots import (
    TrainingAxis,
    changes,
    layer_color,
    load_rows,
    n_layers_of,
    time_colors,
)
from dynascope.analysis.records import read_table, table_path
from dynascope.io import atomic_path, ensure_writable, read_json, read_yaml

REPORT_DIR = "report"


@dataclass
class RunData:
    name: str
    rows: list[dict]
    tables: Path
    summary: dict
    config: dict | None
    axis: TrainingAxis = field(init=False)
    n_layers: int = field(init=False)

    def __post_init__(self) -> None:
        self.axis, self.n_layers = TrainingAxis(self.rows), n_layers_of(self.rows)

    @classmethod
    def load(cls, directory: str | Path) -> RunData:
        directory = Path(directory)
        rows, tables, _ = load_rows(directory)
        summary = {}
        for path in (directory / "summary.json", tables.parent / "summary.json"):  # online, then offline
            summary |= read_json(path, "run summary") if path.exists() else {}
        config = read_yaml(directory / "config.yaml", "run config") if (directory / "config.yaml").exists() else None
        return cls(directory.resolve().name, rows, tables, summary, config)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        points = [(self.axis.x(r), r[key]) for r in self.rows if _finite(r.get(key))]
        return ([x for x, _ in points], [y for _, y in points]) if points else ([], [])

    def layered(self, metric: str) -> dict[int, tuple[list[float], list[float]]]:
        """{layer: series} of a per-layer metric (`metric/L{l}`)."""
        return {l: self.series(f"{metric}/L{l}") for l in range(self.n_layers) if self.series(f"{metric}/L{l}")[0]}

    def table(self, key: str) -> list[dict]:
        path = table_path(self.tables, key)
        return read_table(path) if path.exists() else []

    def last(self, key: str) -> dict:
        return self.rows[-1].get(key, math.nan) if self.rows else math.nan

    def step_x(self, step: float | None) -> float | None:
        """Where a step (e.g. an emergence step) falls on the x axis."""
        if step is None:
            return None
        row = next((r for r in self.rows if r["step"] == step), None)
        return self.axis.x(row) if row else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------- figures (each returns None if nothing to draw)

Series = tuple[list[float], list[float]]


def _curves_panel(ax, run: RunData, keys: dict[str, str], title: str, ylabel: str = "") -> bool:
    """Curves of plain keys ({label: key}); False (nothing drawn) when none of them ever changes."""
    return _two_scales(ax, run, {label: run.series(key) for label, key in keys.items()}, None, title, ylabel)


def _two_scales(ax, run: RunData, left: dict[str, Series], right: tuple[str, Series] | None, title: str,
                ylabel: str) -> bool:
    """Curves on the left axis and, optionally, one on a right axis of its own; False when none changes."""
    if not any(changes(ys) for _, ys in [*left.values(), *([right[1]] if right else [])]):
        return False
    for label, (xs, ys) in left.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    _finish(ax, run, title, ylabel, legend=len(left) > 1)
    if right and right[1][0]:
        twin = ax.twinx()
        twin.plot(*right[1], color="gray", linestyle=":", marker="x", markersize=4)
        twin.set_ylabel(right[0], fontsize=8, color="gray")
    return True


def _layers_panel(ax, run: RunData, metric: str, title: str, ylabel: str = "", emphasise_ends: bool = False) -> bool:
    """One curve per layer of `metric/L{l}`, in the layer's colour; False when no layer's curve changes."""
    layers = run.layered(metric)
    if not any(changes(ys) for _, ys in layers.values()):
        return False
    for l, (xs, ys) in layers.items():
        wide = emphasise_ends and l in (0, run.n_layers - 1)
        ax.plot(xs, ys, marker="o", markersize=3, color=layer_color(l, run.n_layers), label=f"layer {l}",
                linewidth=2.5 if wide else 1.2, alpha=1 if wide or not emphasise_ends else 0.6)
    _finish(ax, run, title, ylabel, legend=True)
    return True


def _finish(ax, run: RunData, title: str, ylabel: str, legend: bool) -> None:
    run.axis.setup(ax)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _mark(ax, run: RunData, step: float | None, label: str) -> None:
    x = run.step_x(step)
    if x is not None:
        ax.axvline(x, color="crimson", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1], f" {label}", color="crimson", fontsize=7, va="top")


def figure_row(panels: list[Callable], width: float = 5.2, height: float = 3.8):
    """A row of the panels that have something to show: each draws into its axes and returns False when
    it has nothing (a curve that never changes); those are left out."""
    kept = []
    for draw in panels:  # a throwaway figure per panel tells which ones draw anything
        scratch = plt.figure()
        if draw(scratch.add_subplot()):
            kept.append(draw)
        plt.close(scratch)
    if not kept:
        return None
    fig, axes = plt.subplots(1, len(kept), figsize=(width * len(kept), height), squeeze=False)
    for ax, draw in zip(axes.flat, kept, strict=True):
        draw(ax)
    fig.tight_layout()
    return fig


def outlier_figures(run: RunData) -> list:
    def medians(ax) -> bool:
        entries = run.table("outliers/medians")
        if not entries:
            return False
        picks = sorted({entries[0]["step"], entries[len(entries) // 2]["step"], entries[-1]["step"]})
        for color, entry in zip(time_colors(len(picks)), [e for e in entries if e["step"] in picks], strict=True):
            values = [row[2] for row in entry["rows"]]
            ax.plot(range(len(values)), values, marker="o", markersize=3, color=color, label=f"step {entry['step']}")
        for row in entries[-1]["rows"]:
            if row[2] > 1:
                ax.annotate(f"d{row[1]}", (row[0], row[2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="crimson", linewidth=1)
        ax.text(len(values) - 1, 1.0, "threshold T", color="crimson", fontsize=7, ha="right", va="bottom")
        ax.set_xlabel("dimensions, by median |h_d|")
        ax.set_ylabel("median |h_d| / T")
        ax.set_title("outlier dimensions: sorted medians against the threshold", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return True

    def count(ax) -> bool:
        drawn = _two_scales(ax, run, {"OD count": run.series("outliers/count")},
                            ("max median / T (> 1: an OD)", run.series("outliers/score_max")),
                            "OD count over training", "ODs")
        _mark(ax, run, run.summary.get("outliers/emergence_step"), "emergence")
        return drawn

    def ablation(ax) -> bool:
        kl = {"ODs ablated": "outliers/ablate_kl", "random dims ablated": "outliers/random_kl"}
        return _curves_panel(ax, run, kl, "KL(full ‖ ablated): ODs vs random dimensions", "nats")

    return [figure_row([medians, count, ablation])]


def frequency_figures(run: RunData) -> list:
    def pca(ax) -> bool:
        entries = run.table("frequency/pca")
        if not entries:
            return False
        rows = entries[-1]["rows"]
        points = ax.scatter([r[0] for r in rows], [r[1] for r in rows], c=[r[2] for r in rows], cmap="viridis_r",
                            s=6)
        plt.colorbar(points, ax=ax).set_label("frequency rank (0 = most frequent)", fontsize=8)
        ax.set(xlabel="PC 1", ylabel="PC 2")
        ax.set_title(f"unembedding rows, first two PCs (step {entries[-1]['step']})", fontsize=10)
        return True

    def fit(ax) -> bool:
        entries = run.table("frequency/fit")
        if not entries:
            return False
        rows = entries[-1]["rows"]
        ax.scatter([r[0] for r in rows], [r[1] for r in rows], s=6, alpha=0.6)
        lo, hi = min(min(r) for r in rows), max(max(r) for r in rows)
        ax.plot([lo, hi], [lo, hi], color="crimson", linewidth=1)
        ax.set(xlabel="actual −log frequency", ylabel="predicted from the output embedding")
        ax.set_title(f"held-out tokens, R² = {run.last('frequency/r2_corpus'):.3f} (step {entries[-1]['step']})",
                     fontsize=10)
        ax.grid(alpha=0.3)
        return True

    def settles(ax) -> bool:
        offline = bool(run.series("frequency/dist_to_final")[0])
        key, label = (("frequency/dist_to_final", "‖E − E_final‖ / ‖E_final‖") if offline
                      else ("frequency/wu_rel_change", "‖E − E_prev‖ / ‖E‖"))
        drawn = _two_scales(ax, run, {"R² (corpus frequency)": run.series("frequency/r2_corpus")},
                            (label, run.series(key)), "the encoding settles before the weights do", "R²")
        _mark(ax, run, run.summary.get("frequency/converged_step"), "converged")
        return drawn

    def deletion(ax) -> bool:
        entries = run.table("frequency/deletion_curve")
        if not entries:
            return False
        rows = entries[-1]["rows"]
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="smallest |A| first")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], marker="s", label="random order")
        ax.set_yscale("log")
        ax.set(xlabel="fraction of dimensions deleted", ylabel="mean KL (nats)")
        ax.set_title(f"dimension deletion (step {entries[-1]['step']})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return True

    return [figure_row([pca, fit]), figure_row([settles, deletion])]


def sparsity_figures(run: RunData) -> list:
    def usage(ax) -> bool:
        tokens = run.last("sparsity/batch_window_tokens")
        return _layers_panel(ax, run, "sparsity/batch_usage", f"batch usage ({tokens:,.0f}-token window)",
                             "units active at least once", emphasise_ends=True)

    def dead(ax) -> bool:
        return _layers_panel(ax, run, "sparsity/dead_frac", "dead units (judged on the training stream)",
                             "fraction of units")

    def turning(ax) -> bool:
        totals = {}
        for kind in ("turned_off", "revived", "dead_expected_chance"):
            layers = run.layered(f"sparsity/{kind}")
            if layers:
                xs = next(iter(layers.values()))[0]
                totals[kind.replace("_", " ")] = (xs, [sum(layers[l][1][i] for l in layers) for i in range(len(xs))])
        if not any(changes(ys) for _, ys in totals.values()):
            return False  # nothing turned off or revived: the grad-norm spikes alone say nothing
        return _two_scales(ax, run, totals, ("max grad norm in the interval",
                                             run.series("sparsity/interval_grad_norm_max")),
                           "units turned off and revived (all layers) against gradient spikes", "units")

    return [figure_row([usage, dead, turning])]


def regions_figures(run: RunData) -> list:
    def curves(ax) -> bool:
        entries = run.table("regions/median_curve")
        if not entries:
            return False
        columns = entries[0]["columns"]
        first = columns[1]
        j, lo, hi = columns.index(first), columns.index(f"{first} p25"), columns.index(f"{first} p75")
        picks = entries if len(entries) <= 5 else [entries[round(i * (len(entries) - 1) / 4)] for i in range(5)]
        for color, entry in zip(time_colors(len(picks)), picks, strict=True):
            rows = entry["rows"]
            alpha = [r[0] for r in rows]
            ax.plot(alpha, [r[j] for r in rows], color=color, label=f"step {entry['step']}")
            ax.fill_between(alpha, [r[lo] for r in rows], [r[hi] for r in rows], color=color, alpha=0.12)
        ax.plot([0, 1], [0, 1], color="gray", linewidth=0.5, linestyle=":")
        ax.set(xlabel="α (A → B)", ylabel="d̃(α) = d(α)/d(1)")
        ax.set_title(f"median output distance along the path, write layer {first[1:]} (IQR band)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return True

    def sharpness(ax) -> bool:
        layers = run.layered("regions/sharpness_median")  # per write layer
        if not any(changes(ys) for _, ys in layers.values()):
            return False
        for l, (xs, ys) in layers.items():
            color = layer_color(l, run.n_layers)
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"write layer {l}")
            ax.fill_between(xs, run.series(f"regions/sharpness_p25/L{l}")[1],
                            run.series(f"regions/sharpness_p75/L{l}")[1], color=color, alpha=0.15)
        ax.axhline(1.0, color="gray", linewidth=0.5)
        _finish(ax, run, "boundary sharpness S (median, IQR): 1 = no boundary", "S", legend=True)
        return True

    return [figure_row([curves, sharpness])]


def vocab_figures(run: RunData) -> list:
    def scores(ax) -> bool:
        layers = list(range(run.n_layers))
        drawn = False
        for key, label, style in (("promoted_max", "promoted token, max", "-o"),
                                  ("eliminated_max", "eliminated tokens, max", "-s"),
                                  ("eliminated_mean", "eliminated tokens, mean", ":s"),
                                  ("random_max", "random sub-updates, max", "--x")):
            ys = [run.last(f"vocab/{key}/L{l}") for l in layers]
            if any(_finite(y) for y in ys):
                ax.plot(layers, ys, style, label=label)
                drawn = True
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set(xlabel="layer", ylabel="e_w · m_i v_i")
        ax.set_xticks(layers)
        ax.set_title(f"dominant sub-updates at saturation events (step {run.rows[-1]['step']:.0f})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return drawn

    def exits(ax) -> bool:
        return _curves_panel(ax, run, {"accuracy (held-out)": "vocab/exit_accuracy",
                                       "layers saved (held-out)": "vocab/exit_saving",
                                       "layers saved by an oracle": "vocab/oracle_exit_saving"},
                             "early exit: predictive rule vs oracle", "fraction")

    return [figure_row([scores, exits])]


SECTIONS = [
    ("000 · Outlier dimensions", "Macocco et al. 2025", "outliers", outlier_figures,
     "Last-layer dimensions whose median |h_d| exceeds the 99th percentile of all |h| (the threshold). "
     "Expect none early, then a few after warmup; ablating them should cost far more than ablating random "
     "dimensions, and push predictions away from frequent tokens."),
    ("001 · Frequency in the unembedding", "Cho et al. 2025", "frequency", frequency_figures,
     "How linearly −log corpus frequency can be read from each token's output embedding (held-out fit). "
     "Expect the first PC to order tokens by frequency, R² to rise early and settle while the weights are "
     "still far from their final values, and deletion in |A| order to cost less than a random order."),
    ("002 · ReLU sparsity and neuron death", "Wild & Anderson 2024", "sparsity", sparsity_figures,
     "Units active at least once in a fixed token window, per layer, and units that stop firing on the "
     "training stream. Expect the first layer to collapse while the last stays used, and units to turn off "
     "in bursts unrelated to gradient spikes if death follows training dynamics."),
    ("003 · Stable regions in the residual stream", "Janiak et al. 2024", "regions", regions_figures,
     "Output distance along the straight path between two prompts' residuals. A straight line (S ≈ 1) at "
     "initialisation; a sigmoid-like step, and S rising with training, once stable regions form."),
    ("004 · FFN sub-updates in vocabulary space", "Geva et al. 2022", "vocab", vocab_figures,
     "Scores e_w · m_i v_i of the 10 dominant FFN sub-updates. The paper: the promoted token scores far "
     "above the eliminated ones, whose mean is ≈ 0, and random sub-updates score ≈ 0; an early exit "
     "rule saves ~20% of layers at ~95% accuracy."),
]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def embed(fig, path: Path) -> str:
    """The figure as an <img> embedded in the page (and saved as a PNG at `path`); closes it."""
    png = _png(fig)
    path.write_bytes(png)
    return f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' alt='{html.escape(path.stem)}'>"


def write_page(out: Path, title: str, body: list[str], style: str = "") -> Path:
    """Write `out`/index.html: one self-contained page; returns its path."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}{style}</style></head><body>{''.join(body)}</body></html>")
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page)
    return index


def _events(run: RunData) -> str:
    events = {k: v for k, v in run.summary.items() if k.endswith("_step")}
    if not events:
        return "<p>No emergence or convergence events yet.</p>"
    lines = []
    for key, step in sorted(events.items()):
        row = next((r for r in run.rows if step is not None and r["step"] == step), None)
        tokens = f"{row['tokens_seen']:,.0f}" if row and _finite(row.get("tokens_seen")) else "—"
        revised = run.summary.get(key.replace("_step", "_revisions"), 0)
        lines.append(f"<tr><td>{html.escape(key)}</td><td>{'none (revised away)' if step is None else int(step)}"
                     f"</td><td>{tokens}</td><td>{revised:.0f}</td></tr>")
    return ("<table><tr><th>event</th><th>step</th><th>tokens seen</th><th>revisions</th></tr>"
            + "".join(lines) + "</table>")


def _header(run: RunData) -> str:
    first, last = run.rows[0], run.rows[-1]
    parts = [f"{len(run.rows)} checkpoints, steps {first['step']:.0f}–{last['step']:.0f}"]
    if _finite(last.get("tokens_seen")):
        parts.append(f"{last['tokens_seen']:,.0f} tokens")
    if run.config:
        arch = run.config.get("model", {}).get("arch", {})
        parts.append(", ".join(f"{k}={arch[k]}" for k in ("n_layers", "d_model", "d_mlp", "activation", "norm")
                               if k in arch))
    elif any(r.get("label") for r in run.rows):
        parts.append("checkpoints: " + ", ".join(str(r["label"]) for r in run.rows))
    return " · ".join(html.escape(p) for p in parts)


def write_report(directory: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report page of a run directory or an `analyze --hf` output directory; returns its path."""
    run = RunData.load(directory)
    out = ensure_writable(Path(out_dir) if out_dir else run.tables.parent / REPORT_DIR)
    body = [f"<h1>{html.escape(run.name)}</h1><p class='meta'>{_header(run)}</p>",
            "<h2>Emergence and convergence</h2>", _events(run)]
    for title, paper, name, figures, text in SECTIONS:
        if not any(k.startswith(name + "/") for r in run.rows for k in r):
            continue
        body.append(f"<h2>{html.escape(title)}</h2><p class='paper'>{html.escape(paper)}. {html.escape(text)}</p>")
        body += [embed(fig, out / f"{name}_{i}.png") for i, fig in enumerate(f for f in figures(run) if f is not None)]
    return write_page(out, f"dynascope report — {run.name}", body)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd} .meta{color:#555}
.paper{color:#444;max-width:70em} img{max-width:100%;display:block;margin:.6em 0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.3em .7em} th{background:#f4f4f4}"""
