"""`dynascope report`: one self-contained page with each analysis's figures, drawn from one run.

It reads what a run directory (or an `analyze --hf` output directory) holds: the metrics (the offline table
if `dynascope analyze` wrote one, merged with the rows logged online), the training log, the tables, the
summary and the config. It writes `report/index.html` in that directory (the one page of the run, which
`fit`, `analyze` and `report` each redraw), every figure embedded as a PNG (also saved beside it), readable
without wandb. At the top: the dynascope version, the wandb run, the config, the training loss, and per
phenomenon one verdict: whether this run shows the paper's signature (`Analysis.signature`, detected by its
`signature_event`), does not show it (the run is complete and the event never held), or cannot yet show it
(the run is still short of its last step, or the value was not measured), with the number that decides it.
Then the integrity record, the onsets and the analyses' sections, in registry order: each gives its title,
paper (linked), what the paper leads one to expect, and its figures (`Analysis.figures`).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from dynascope.analysis import REGISTRY, Analysis, build
from dynascope.analysis.figures import RunPlot, finite
from dynascope.analysis.integrity import read_integrity
from dynascope.analysis.onsets import Event, history_from_tables, onset_distribution
from dynascope.analysis.view import ModelShape
from dynascope.core.io import atomic_path, ensure_writable, read_json
from dynascope.core.model import ModelConfig
from dynascope.core.records import DIVERGED_KEY, STEP_KEY, RunHistory
from dynascope.core.version import __version__
from dynascope.pages.onsets import COLUMNS, onset_rows
from dynascope.pages.plots import measured


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def embed(fig: Figure, path: Path) -> str:
    """The figure as an <img> embedded in the page (and saved as a PNG at `path`)."""
    data = png(fig)
    path.write_bytes(data)
    return f"<img src='data:image/png;base64,{base64.b64encode(data).decode()}' alt='{html.escape(path.stem)}'>"


def write_page(out: Path, title: str, body: list[str], style: str = "") -> Path:
    """Write `out`/index.html: one self-contained page; returns its path."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}{style}</style></head><body>{''.join(body)}</body></html>")
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(page)
    return index


def _events(history: RunHistory) -> str:
    """The onsets table: each event's step (and tokens seen), bracket, interval, confidence and guard."""
    rows = onset_rows(history.summary, history.root.root)
    if not rows:
        return "<p>No onsets yet.</p>"
    lines = []
    for name, step, *rest in rows:
        row = history.row_at(None if step == "none" else float(step))
        tokens = f"{row['tokens_seen']:,.0f}" if row and finite(row.get("tokens_seen")) else "—"
        cells = [name, step, tokens, *rest[:-1], f"<code>{html.escape(rest[-1])}</code>"]
        lines.append("<tr>" + "".join(f"<td>{c if c.startswith('<code>') else html.escape(c)}</td>"
                                      for c in cells) + "</tr>")
    head = [*COLUMNS[:2], "tokens seen", *COLUMNS[2:]]
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(lines) + "</table>"


def _integrity(history: RunHistory) -> str:
    """Whether each checkpoint measured is what its step claims (integrity.csv): the flagged ones, or none."""
    rows = read_integrity(history.files)
    if not rows:
        return (f"<p>Not checked: <code>dynascope verify {html.escape(str(history.root.root))}</code> (or "
                "<code>dynascope analyze</code>) writes the integrity record.</p>")
    bad = [r for r in rows if r["flags"]]
    verdict = (f"{len(bad)} flagged, left out of the onsets (unless analysed with --keep_flagged)" if bad
               else "none flagged")
    text = (f"<p>{len(rows)} checkpoints fingerprinted and placed by their distances to the first and last "
            f"(integrity.csv): {verdict}.</p>")
    if bad:
        text += "<table><tr><th>checkpoint</th><th>step</th><th>flags</th></tr>" + "".join(
            f"<tr><td>{html.escape(r['label'])}</td><td>{r['step']}</td><td>{html.escape(r['flags'])}</td></tr>"
            for r in bad) + "</table>"
    return text


def _about(history: RunHistory) -> str:
    """The version that drew the page, where the wandb run is, and the run's config (folded)."""
    run = history.root
    parts = [f"drawn by dynascope {html.escape(__version__)}"]
    if run.wandb_url.exists():
        url = html.escape(run.wandb_url.read_text().strip())
        parts.append(f"wandb run: <a href='{url}'>{url}</a>")
    elif run.wandb_id.exists():
        parts.append(f"wandb run {html.escape(run.wandb_id.read_text().strip())} (offline; upload it with "
                     f"<code>wandb sync {html.escape(str(run.root))}/wandb/offline-run-*</code>)")
    text = "<p class='meta'>" + " · ".join(parts) + "</p>"
    if history.config:
        config = html.escape(yaml.safe_dump(history.config, sort_keys=False))
        text += f"<details><summary>config</summary><pre>{config}</pre></details>"
    return text


def training_loss(history: RunHistory) -> Figure | None:
    """The training loss of each logged step, with the probe loss of each measured checkpoint."""
    logged = [(r[STEP_KEY], r["train/loss"]) for r in history.logged if finite(r.get("train/loss"))]
    probe = [(r["step"], r["basic/probe_loss"]) for r in history.rows if finite(r.get("basic/probe_loss"))]
    if not logged and not probe:
        return None
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    if logged:
        ax.plot(*zip(*logged, strict=True), linewidth=0.8, label="training loss (its step's batch)")
    if probe:
        ax.plot(*zip(*probe, strict=True), marker="o", markersize=3, label="probe loss (held-out windows)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _value(history: RunHistory, row: dict | None, key: str) -> str:
    """A key's value in a row, or the range over its layers for a per-layer metric."""
    if row is None:
        return "—"
    if finite(row.get(key)):
        return f"{row[key]:.3g}"
    layers = [row[k] for l in range(history.n_layers) if finite(row.get(k := f"{key}/L{l}"))]
    return f"{min(layers):.3g}–{max(layers):.3g} over the layers" if layers else "—"


def verdict(analysis: type[Analysis], history: RunHistory, events: dict[str, tuple[Event, list]]) -> str | None:
    """Whether this run shows the paper's signature: "shows", "does not show" or "cannot yet show", with the
    number that decides it; None for an analysis without a signature."""
    name = analysis.signature_event
    if not name:
        return None
    event = events.get(name, (None, []))[0]
    last = history.rows[-1]
    if event is None:
        return f"This run cannot yet show it: {name} was not judged here (its values were not measured)."
    measure = f"{event.shown}" + (f" (threshold {event.threshold:g})" if event.threshold is not None else "")
    step = history.summary.get(f"{name}_step")
    if step is not None:
        return (f"This run shows it: {name} at step {step:.0f}, where {measure} is "
                f"{_value(history, history.row_at(step), event.shown)}.")
    max_steps = ((history.config or {}).get("trainer") or {}).get("max_steps")
    at_last = f"{measure} is {_value(history, last, event.shown)} at the last checkpoint, step {last['step']:.0f}"
    if max_steps and last["step"] < max_steps:
        return f"This run cannot yet show it: {at_last}, short of the run's {max_steps} steps."
    return f"This run does not show it: {at_last}, and no onset in its {len(history.rows)} checkpoints."


def _header(history: RunHistory) -> str:
    first, last = history.rows[0], history.rows[-1]
    parts = [f"{len(history.rows)} checkpoints, steps {first['step']:.0f}–{last['step']:.0f}"]
    if history.summary.get(DIVERGED_KEY) is not None:
        parts.append(f"diverged at step {history.summary[DIVERGED_KEY]:.0f} (a non-finite training loss; "
                     "later snapshots with non-finite weights are not measured)")
    if finite(last.get("tokens_seen")):
        parts.append(f"{last['tokens_seen']:,.0f} tokens")
    if history.config:
        arch = history.config.get("model", {}).get("arch", {})
        parts.append(", ".join(f"{k}={arch[k]}" for k in ("n_layers", "d_model", "d_mlp", "activation", "norm")
                               if k in arch))
    elif any(r.get("label") for r in history.rows):
        parts.append("checkpoints: " + ", ".join(str(r["label"]) for r in history.rows))
    return " · ".join(html.escape(p) for p in parts)


def run_events(history: RunHistory) -> dict[str, tuple[Event, list]]:
    """{event name: (its Event, its judgements)} of the analyses measured in a run, built as its replay built them
    (the run's shape and analysis options), with the judgements of its onsets tables; empty when the shape is
    unknown."""
    config = history.config or {}
    if "model" in config:
        shape = ModelShape.of(ModelConfig(**config["model"]["arch"]))
    elif history.files.shape.exists():
        shape = ModelShape(**read_json(history.files.shape, "model shape"))
    else:
        return {}
    analyses = build(measured(history), shape, None, (config.get("dynamics") or {}).get("options"))
    out = {}
    for a in analyses:
        judged = history_from_tables(history.table(f"{a.name}/onsets"))
        out |= {e.name: (e, judged[e.name]) for e in a.events() if e.name in judged}
    return out


def _span(ax, plot: RunPlot, lo: float | None, hi: float | None, color: str, label: str) -> None:
    """Shade the checkpoints lo..hi (from the left edge when lo is None)."""
    right = plot.step_x(hi)
    if right is not None:
        left = plot.step_x(lo) if lo is not None else ax.get_xlim()[0]
        ax.axvspan(left, right, color=color, alpha=0.2, label=label, linewidth=0)


def card_title(summary: dict, name: str) -> str:
    """An onset in words: its step, bracket, interval and confidence, as far as the summary has them."""
    step, confidence = summary.get(f"{name}_step"), summary.get(f"{name}_confidence")
    lo, hi = summary.get(f"{name}_bracket_lo"), summary.get(f"{name}_bracket_hi")
    ilo, ihi = summary.get(f"{name}_interval_lo"), summary.get(f"{name}_interval_hi")
    title = [f"{name}: " + ("none yet" if step is None else f"step {step:.0f}")]
    if hi is not None:
        title.append(f"between {'the start' if lo is None else f'{lo:.0f}'} and {hi:.0f}")
    if ihi is not None:
        title.append(f"95% interval {ilo:.0f}–{ihi:.0f}")
    if confidence is not None:
        title.append(f"confidence {confidence:.0%}")
    return "; ".join(title)


def onset_card(plot: RunPlot, event: Event, judgements: list) -> Figure | None:
    """One event: the value that decides it around the onset, the bracket and the interval shaded, zoom points
    marked; beside it, where the bootstrap replicates put the onset."""
    summary, name = plot.history.summary, event.name
    lo, hi = summary.get(f"{name}_bracket_lo"), summary.get(f"{name}_bracket_hi")
    ilo, ihi = summary.get(f"{name}_interval_lo"), summary.get(f"{name}_interval_hi")

    def curve(ax) -> bool:
        drawn = plot.layers(ax, event.shown, event.shown) if plot.layered(event.shown) else \
            plot.curves(ax, {event.shown: event.shown}, event.shown)
        if not drawn:
            return False
        if event.threshold is not None:
            ax.axhline(event.threshold, color="crimson", linewidth=0.8, linestyle="--")
        _span(ax, plot, ilo, ihi, "tab:blue", "95% interval")
        _span(ax, plot, lo, hi, "tab:orange", "bracket")
        zoom = [plot.axis.x(r) for r in plot.history.rows if str(r.get("label", "")).startswith("zoom")]
        if zoom:
            ax.plot(zoom, [ax.get_ylim()[0]] * len(zoom), "|", color="black", markersize=10, label="zoom points")
        ax.legend(fontsize=7)
        return True

    def distribution(ax) -> bool:
        shares = onset_distribution(event, judgements)
        if not shares:
            return False
        steps = sorted(shares)
        ax.bar([str(s) for s in steps], [shares[s] for s in steps], color="tab:blue")
        ax.set(xlabel="onset step", ylabel="share of replicates")
        resampled = textwrap.fill(f"resampled: {event.resampled.split(':')[0]}", 60)
        ax.set_title(f"the onset in {len(judgements[0][3])} bootstrap replicates\n{resampled}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        return True

    fig = RunPlot.row([curve, distribution])
    if fig is not None:
        fig.suptitle(card_title(summary, name), fontsize=10, fontweight="bold")
        fig.tight_layout(rect=(0, 0, 1, 0.93))  # the panels' titles below the card's
    return fig


def _paper(analysis: type[Analysis]) -> str:
    """The analysis's paper, linked."""
    name = html.escape(analysis.paper or analysis.name)
    return f"<a href='{html.escape(analysis.paper_url)}'>{name}</a>" if analysis.paper_url else name


def write_report(directory: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report page of a run directory or an `analyze --hf` output directory; returns its path."""
    history = RunHistory.load(directory)
    plot = RunPlot(history)
    out = ensure_writable(Path(out_dir) if out_dir else history.root.report)
    events = run_events(history)
    body = [f"<h1>{html.escape(history.name)}</h1><p class='meta'>{_header(history)}</p>", _about(history),
            "<h2>Training</h2>"]
    loss = training_loss(history)
    body.append(embed(loss, out / "training_loss.png") if loss else "<p>No loss logged.</p>")
    names = measured(history)
    verdicts = [(REGISTRY[name], line) for name in names if (line := verdict(REGISTRY[name], history, events))]
    if verdicts:
        body.append("<h2>The papers' signatures</h2><table><tr><th>paper</th><th>its signature</th>"
                    "<th>in this run</th></tr>" + "".join(
                        f"<tr><td>{_paper(a)}</td><td>{html.escape(a.signature)}</td><td>{html.escape(line)}</td></tr>"
                        for a, line in verdicts) + "</table>")
    body += ["<h2>Integrity</h2>", _integrity(history), "<h2>Onsets</h2>", _events(history)]
    for i, (event, judgements) in enumerate(events.values()):
        fig = onset_card(plot, event, judgements)
        if fig is not None:
            body.append(embed(fig, out / f"onset_{i}.png"))
    for name in names:
        analysis = REGISTRY[name]
        paper = f"{_paper(analysis)}. " if analysis.paper else ""
        body.append(f"<h2>{html.escape(analysis.title or name)}</h2>"
                    f"<p class='paper'>{paper}{html.escape(analysis.expectation)}</p>")
        plot.left_out.clear()
        body += [embed(fig, out / f"{name}_{i}.png") for i, fig in enumerate(analysis.figures(plot))]
        if plot.left_out:
            body.append("<p class='note'>Left out: " + "; ".join(html.escape(r) for r in plot.left_out) + ".</p>")
    return write_page(out, f"dynascope report — {history.name}", body)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd} .meta{color:#555}
.paper{color:#444;max-width:70em} .note{color:#777;font-size:.9em;max-width:70em}
pre{background:#f7f7f7;padding:.6em;max-height:30em;overflow:auto;font-size:.85em}
img{max-width:100%;display:block;margin:.6em 0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.3em .7em} th{background:#f4f4f4}"""
