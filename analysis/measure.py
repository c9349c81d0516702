"""One measurement of one checkpoint: the routine that training and offline replay share.

`measure` binds the checkpoint's view and step to every analysis, runs one no-grad forward pass per
probe batch with the union of the requested hooks, feeds every analysis from it, then per analysis
computes (a collective under torch.distributed), advances its carry and resets its states. It
returns one `Record`, which a `Recorder` (records.py) writes everywhere.
"""

from __future__ import annotations

import math
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

    def add(self, result: Result) -> None:
        self.values |= result.values
        self.tables |= result.tables
        self.summary |= result.summary


def measure(view: ModelView, analyses: list[Analysis], probe: torch.Tensor, step: int,
            tokens_seen: float = math.nan, batch_size: int = 16, label: str = "") -> Record:
    """Measure `analyses` on this rank's `probe` windows at checkpoint `step`."""
    names = sorted({n for a in analyses for n in a.hook_names()})
    for a in analyses:
        a.bind(view, step)
    with torch.no_grad():
        for batch in probe.split(batch_size):
            batch = batch.to(view.device)
            logits, cache = view.run_with_cache(batch, names)
            for a in analyses:
                a.update(batch, logits, cache)
        record = Record(step, tokens_seen, label or str(step))
        for a in analyses:
            result = a.compute()
            a.advance(result)
            a.reset()
            record.add(result)
    return record
