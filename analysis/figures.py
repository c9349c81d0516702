"""What every analysis's figures are drawn with: a run's curves on its training axis.

Curves are drawn against tokens seen on a symmetric-log axis (step 0, the initialisation, stays on the
plot), with the step on a second axis on top; without token counts (e.g. Hugging Face checkpoints), against
the step. Per-layer keys (`.../L{l}`) get one colour per layer, the same in every figure of a run. A panel
is a function that draws into its axes and returns False when it has nothing to show (a curve that never
changes, or one measured at fewer than `MIN_POINTS` checkpoints), after `RunPlot.leave_out` recorded why (the
report page says so); `RunPlot.row` leaves such panels out. Figures are plain `matplotlib.figure.Figure`s: no pyplot,
no global backend, nothing changed for a notebook that imports this.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import matplotlib
from matplotlib.figure import Figure

from dynascope.core.records import RunHistory

Series = tuple[list[float], list[float]]
Panel = Callable[[object], bool]  # draws into a matplotlib Axes; False: nothing to show
MIN_POINTS = 4  # a curve over fewer checkpoints is no curve


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def changes(values: list[float]) -> bool:
    """Whether a curve moves at all (a constant curve says nothing and is left out)."""
    kept = [v for v in values if finite(v)]
    return len(kept) > 1 and max(kept) - min(kept) > 1e-9 * max(1.0, max(abs(v) for v in kept))


def layer_color(layer: int, n_layers: int):
    """The colour of layer `layer`: the same in every panel of a run."""
    return matplotlib.colormaps["viridis"](0.9 * layer / max(1, n_layers - 1))


def time_colors(n: int) -> list:
    """Colours of n checkpoints in training order (light to dark)."""
    return [matplotlib.colormaps["plasma"](0.85 * (1 - i / max(1, n - 1))) for i in range(n)]


class TrainingAxis:
    """The x axis of a run's curves: tokens seen (symlog, steps on top) when every row has them, else steps."""

    def __init__(self, rows: list[dict]):
        per_step = {r["tokens_seen"] / r["step"] for r in rows if r.get("step") and finite(r.get("tokens_seen"))}
        self.tokens_per_step = per_step.pop() if len(per_step) == 1 else None
        self.by_tokens = bool(rows) and all(finite(r.get("tokens_seen")) for r in rows)

    def x(self, row: dict) -> float:
        return row["tokens_seen"] if self.by_tokens else row["step"]

    @property
    def title_pad(self) -> float:
        """Room above the axes for a title: the step axis on top takes some."""
        return 24 if self.by_tokens and self.tokens_per_step else 6

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


class RunPlot:
    """A run's history with its training axis: the series and panels an analysis's figures are made of."""

    def __init__(self, history: RunHistory):
        self.history, self.axis, self.n_layers = history, TrainingAxis(history.rows), history.n_layers
        self.left_out: list[str] = []  # why panels were left out, for the page to say

    def leave_out(self, reason: str) -> bool:
        """Record why a panel is left out; False, for the panel to return."""
        self.left_out.append(reason)
        return False

    def empty(self, title: str, curves: list[Series]) -> str | None:
        """Why curves are not worth a panel (none changes, or none has `MIN_POINTS` points), or None."""
        points = max((sum(finite(y) for y in ys) for _, ys in curves), default=0)
        if points == 0:
            return f"“{title}”: not measured"
        if points < MIN_POINTS:
            return f"“{title}”: measured at {points} checkpoint{'s' * (points != 1)} only"
        if not any(changes(ys) for _, ys in curves):
            return f"“{title}”: the same value at every checkpoint"
        return None

    def series(self, key: str) -> Series:
        points = [(self.axis.x(r), v) for r, v in self.history.series(key)]
        return [x for x, _ in points], [y for _, y in points]

    def layered(self, metric: str) -> dict[int, Series]:
        """{layer: series} of a per-layer metric (`metric/L{l}`)."""
        return {l: s for l in range(self.n_layers) if (s := self.series(f"{metric}/L{l}"))[0]}

    def step_x(self, step: float | None) -> float | None:
        """Where a step (e.g. an emergence step) falls on the x axis."""
        row = self.history.row_at(step)
        return self.axis.x(row) if row else None

    def finish(self, ax, title: str, ylabel: str = "", legend: bool = False) -> None:
        self.axis.setup(ax)
        ax.set_title(title, fontsize=10, pad=self.axis.title_pad)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, framealpha=0.7)

    def curves(self, ax, keys: dict[str, str], title: str, ylabel: str = "") -> bool:
        """Curves of plain keys ({label: key}); False (nothing drawn) when none of them ever changes."""
        return self.two_scales(ax, {label: self.series(key) for label, key in keys.items()}, None, title, ylabel)

    def two_scales(self, ax, left: dict[str, Series], right: tuple[str, Series] | None, title: str,
                   ylabel: str) -> bool:
        """Curves on the left axis and, optionally, one on a right axis of its own; False when none changes."""
        reason = self.empty(title, [*left.values(), *([right[1]] if right else [])])
        if reason:
            return self.leave_out(reason)
        for label, (xs, ys) in left.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        self.finish(ax, title, ylabel, legend=len(left) > 1)
        if right and right[1][0]:
            twin = ax.twinx()
            twin.plot(*right[1], color="gray", linestyle=":", marker="x", markersize=4)
            twin.set_ylabel(right[0], fontsize=8, color="gray")
        return True

    def layers(self, ax, metric: str, title: str, ylabel: str = "", emphasise_ends: bool = False) -> bool:
        """One curve per layer of `metric/L{l}`, in the layer's colour; False when no layer's curve changes."""
        layers = self.layered(metric)
        reason = self.empty(title, list(layers.values()))
        if reason:
            return self.leave_out(reason)
        for l, (xs, ys) in layers.items():
            wide = emphasise_ends and l in (0, self.n_layers - 1)
            ax.plot(xs, ys, marker="o", markersize=3, color=layer_color(l, self.n_layers), label=f"layer {l}",
                    linewidth=2.5 if wide else 1.2, alpha=1 if wide or not emphasise_ends else 0.6)
        self.finish(ax, title, ylabel, legend=True)
        return True

    def headline(self, ax, key: str) -> bool:
        """An analysis's headline curve: every layer of it when it is a per-layer key."""
        metric, _, layer = key.rpartition("/L")
        if layer.isdigit():
            return self.layers(ax, metric, metric)
        return self.curves(ax, {key: key}, key)

    def mark(self, ax, step: float | None, label: str) -> None:
        x = self.step_x(step)
        if x is not None:
            ax.axvline(x, color="crimson", linestyle="--", linewidth=1)
            # inside the axes, on the side of the line with room: a label past the right edge is cut off
            right_half = ax.transAxes.inverted().transform(ax.transData.transform((x, 0)))[0] > 0.5
            ax.text(x, 0.98, f" {label} ", transform=ax.get_xaxis_transform(), color="crimson", fontsize=7, va="top",
                    ha="right" if right_half else "left")

    @staticmethod
    def row(panels: list[Panel], width: float = 5.2, height: float = 3.8) -> Figure | None:
        """A row of the panels that have something to show (each is tried on a throwaway figure first)."""
        kept = [draw for draw in panels if draw(Figure().add_subplot())]
        if not kept:
            return None
        fig = Figure(figsize=(width * len(kept), height))
        for ax, draw in zip(fig.subplots(1, len(kept), squeeze=False).flat, kept, strict=True):
            draw(ax)
        fig.tight_layout()
        return fig
