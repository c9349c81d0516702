"""`dynascope report`: one self-contained page with each analysis's figures, drawn from one run.

It reads what a run directory (or an `analyze --hf` output directory) holds: the metrics (the offline table
if `dynascope analyze` wrote one, merged with the rows logged online), the tables and the summary. It writes
`report/index.html` in that directory, every figure embedded as a PNG (also saved beside it), readable
without wandb. The sections are the registered analyses measured in the run, in registry order: each
analysis gives its title, paper, what the paper leads one to expect, and its figures (`Analysis.figures`).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from matplotlib.figure import Figure

from dynascope.analysis import REGISTRY
from dynascope.analysis.figures import RunPlot, finite
from dynascope.core.io import atomic_path, ensure_writable
from dynascope.core.records import RunHistory


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
    events = {k: v for k, v in history.summary.items() if k.endswith("_step")}
    if not events:
        return "<p>No emergence or convergence events yet.</p>"
    lines = []
    for key, step in sorted(events.items()):
        row = history.row_at(step)
        tokens = f"{row['tokens_seen']:,.0f}" if row and finite(row.get("tokens_seen")) else "—"
        revised = history.summary.get(key.replace("_step", "_revisions"), 0)
        lines.append(f"<tr><td>{html.escape(key)}</td><td>{'none (revised away)' if step is None else int(step)}"
                     f"</td><td>{tokens}</td><td>{revised:.0f}</td></tr>")
    return ("<table><tr><th>event</th><th>step</th><th>tokens seen</th><th>revisions</th></tr>"
            + "".join(lines) + "</table>")


def _header(history: RunHistory) -> str:
    first, last = history.rows[0], history.rows[-1]
    parts = [f"{len(history.rows)} checkpoints, steps {first['step']:.0f}–{last['step']:.0f}"]
    if finite(last.get("tokens_seen")):
        parts.append(f"{last['tokens_seen']:,.0f} tokens")
    if history.config:
        arch = history.config.get("model", {}).get("arch", {})
        parts.append(", ".join(f"{k}={arch[k]}" for k in ("n_layers", "d_model", "d_mlp", "activation", "norm")
                               if k in arch))
    elif any(r.get("label") for r in history.rows):
        parts.append("checkpoints: " + ", ".join(str(r["label"]) for r in history.rows))
    return " · ".join(html.escape(p) for p in parts)


def measured(history: RunHistory) -> list[str]:
    """The registered analyses with keys in the run's rows, in registry order."""
    return [name for name in REGISTRY if any(k.startswith(name + "/") for r in history.rows for k in r)]


def write_report(directory: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report page of a run directory or an `analyze --hf` output directory; returns its path."""
    history = RunHistory.load(directory)
    plot = RunPlot(history)
    out = ensure_writable(Path(out_dir) if out_dir else history.root.report)
    body = [f"<h1>{html.escape(history.name)}</h1><p class='meta'>{_header(history)}</p>",
            "<h2>Emergence and convergence</h2>", _events(history)]
    for name in measured(history):
        analysis = REGISTRY[name]
        paper = f"{analysis.paper}. " if analysis.paper else ""
        body.append(f"<h2>{html.escape(analysis.title or name)}</h2>"
                    f"<p class='paper'>{html.escape(paper + analysis.expectation)}</p>")
        body += [embed(fig, out / f"{name}_{i}.png") for i, fig in enumerate(analysis.figures(plot))]
    return write_page(out, f"dynascope report — {history.name}", body)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd} .meta{color:#555}
.paper{color:#444;max-width:70em} img{max-width:100%;display:block;margin:.6em 0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.3em .7em} th{background:#f4f4f4}"""
