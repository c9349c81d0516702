"""One measurement of one checkpoint: the routine that training and offline replay share.

`measure` binds the checkpoint's view and step to every analysis, runs one no-grad forward pass per
probe batch with the union of the requested hooks, feeds every analysis from it (with the batch's
global probe-window indices), then per analysis computes (a collective under torch.distributed;
analyses that read another's result come after it), advances its carry and resets its states. It
returns one `Record`, which a `Recorder` (records.py) writes everywhere, with each analysis's time
(its updates and its compute; the shared forward pass is nobody's), which training logs as
`dynamics/seconds/<analysis>`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dynascope.analysis.base import Analysis, Result, Table
from dynascope.analysis.view import ModelView


@dataclass
class Record:
    """Everything measured at one checkpoint: values, tables and summary events of every analysis."""

    step: int
    tokens_seen: float = math.nan
    label: str = ""  # the checkpoint's name offline (e.g. a Hugging Face directory); the step otherwise
    values: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    summary: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each analysis's time (its updates and compute)

    def add(self, result: Result) -> None:
        self.values |= result.values
        self.tables |= result.tables
        self.summary |= result.summary


def measure(view: ModelView, analyses: list[Analysis], probe: torch.Tensor, step: int,
            tokens_seen: float = math.nan, batch_size: int = 16, label: str = "", first_window: int = 0,
            progress: Callable[[str], None] = lambda stage: None) -> Record:
    """Measure `analyses` on this rank's `probe` windows (the probe set's windows from `first_window` on)
    at checkpoint `step`; `progress` hears what is running (e.g. to show it in a progress bar)."""
    names = sorted({n for a in analyses for n in a.hook_names()})
    record = Record(step, tokens_seen, label or str(step), seconds={a.name: 0.0 for a in analyses})

    def timed(a: Analysis, fn: Callable[[], Result | None]) -> Result | None:
        start = time.perf_counter()
        out = fn()
        record.seconds[a.name] += time.perf_counter() - start
        return out

    for a in analyses:
        a.bind(view, step)
    with torch.no_grad():
        for start in range(0, len(probe), batch_size):
            progress(f"probe batch {start // batch_size + 1}/{math.ceil(len(probe) / batch_size)}")
            batch = probe[start:start + batch_size].to(view.device)
            windows = torch.arange(len(batch), device=view.device) + first_window + start
            logits, cache = view.run_with_cache(batch, names)
            for a in analyses:
                timed(a, lambda: a.update(batch, logits, cache, windows))
        results: dict[str, Result] = {}
        for a in _in_reading_order(analyses):
            progress(a.name)
            a.peers = {name: results[name] for name in a.reads if name in results}
            results[a.name] = timed(a, a.compute)
            a.advance(results[a.name])
            a.reset()
            record.add(results[a.name])
    return record


def _in_reading_order(analyses: list[Analysis]) -> list[Analysis]:
    """Every analysis after the analyses it reads (those that are measured at all)."""
    names = {a.name for a in analyses}
    ordered: list[Analysis] = []
    while len(ordered) < len(analyses):  # by name: a Metric's == builds a new metric
        done = {a.name for a in ordered}
        ordered += [a for a in analyses if a.name not in done and (set(a.reads) & names) <= done]
    return ordered
