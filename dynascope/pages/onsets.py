"""`dynascope onsets RUN`: a run's onsets in the terminal, one row per event, each with the zoom that would
resolve it (onsets.py in the analysis package defines the summary keys read here)."""

from __future__ import annotations

from pathlib import Path

from dynascope.core.io import read_json
from dynascope.core.runfiles import RunFiles

COLUMNS = ("event", "step", "bracket", "95% interval", "confidence", "guarded", "revised", "resolve with")


def onset_summary(directory: str | Path) -> dict:
    """The run's summary: the offline one (the zoom points included) over the one logged online."""
    run = RunFiles(directory)
    summary = {}
    for path in (run.summary, run.analysis.summary):
        summary |= read_json(path, "run summary") if path.exists() else {}
    return summary


def _steps(lo, hi, dash: str = "–") -> str:
    if hi is None:
        return "—"
    return f"{lo:.0f}{dash}{hi:.0f}" if lo is not None and lo != hi else f"{hi:.0f}" if lo is not None \
        else f"≤ {hi:.0f}"


def onset_rows(summary: dict, directory: str | Path) -> list[tuple[str, ...]]:
    """One row per event of a run's summary, in COLUMNS' order (`directory`: the run, for the zoom command)."""
    rows = []
    for key in sorted(k for k in summary if k.endswith("_step")):
        name = key.removesuffix("_step")
        step = summary[key]
        lo, hi = summary.get(f"{name}_bracket_lo"), summary.get(f"{name}_bracket_hi")
        confidence = summary.get(f"{name}_confidence")
        zoom = (f"dynascope zoom {directory} --onset {name} --every {max(1, int(hi - lo) // 16)}"
                if lo is not None and hi is not None and hi - lo > 1 else "—")
        rows.append((name, "none" if step is None else f"{step:.0f}", _steps(lo, hi),
                     _steps(summary.get(f"{name}_interval_lo"), summary.get(f"{name}_interval_hi")),
                     "—" if confidence is None else f"{confidence:.0%}",
                     f"{summary.get(f'{name}_guarded', 0):.0f}", f"{summary.get(f'{name}_revisions', 0):.0f}", zoom))
    return rows


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """An aligned text table with COLUMNS as its header."""
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)
