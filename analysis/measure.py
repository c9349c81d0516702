"""One measurement of one checkpoint: the routine that training and offline replay share.

`measure` binds the checkpoint's view and step to every analysis, runs one no-grad forward pass per
probe batch with the union of the requested hooks (and its next-token distribution, once, for the analyses
that ask for `PROBS`, `LOGSUMEXP` or `TOP1`), feeds every analysis from it (with the batch's
global probe-window indices), then per analysis computes (a collective under torch.distributed;
analyses that read another's result come after it), judges its events (`Analysis.conclude`), advances its
carry and resets its states. It
returns one `CheckpointRecord`, which a `Recorder` (`dynascope.outputs`) writes everywhere, with each analysis's time
(its updates and its compute; the shared forward pass is nobody's), which training logs as
`dynamics/seconds/<analysis>`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from dynascope.analysis.base import HEAD, LOGSUMEXP, PROBS, TOP1, Analysis, Measurement
from dynascope.analysis.view import ModelView
from dynascope.core.records import CheckpointRecord


def probe_pass(view: ModelView, tokens: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
    """One forward pass: the logits and the activations at the hook `names`, with `PROBS`, `LOGSUMEXP` and `TOP1`
    among them when any is asked for."""
    logits, cache = view.run_with_cache(tokens, [n for n in names if n not in HEAD])
    if set(HEAD) & set(names):
        z = logits.float()
        probs = z.softmax(-1)
        top = z.max(-1)
        # log Σ exp z = z_top − log p_top (p_top ≥ 1/V keeps the log well conditioned): one pass, not logsumexp's three
        cache[LOGSUMEXP] = top.values - probs.gather(-1, top.indices[..., None]).squeeze(-1).log()
        cache[PROBS], cache[TOP1] = probs, top.indices
    return logits, cache


def stage_count(analyses: list[Analysis], windows: int, batch_size: int) -> int:
    """How many stages `measure` reports to its `progress`: one per probe batch, then one per analysis."""
    return math.ceil(windows / batch_size) + len(analyses)


def measure(view: ModelView, analyses: list[Analysis], probe: torch.Tensor, step: int,
            tokens_seen: float = math.nan, batch_size: int = 16, label: str = "", first_window: int = 0,
            progress: Callable[[str], None] = lambda stage: None) -> CheckpointRecord:
    """Measure `analyses` on this rank's `probe` windows (the probe set's windows from `first_window` on)
    at checkpoint `step`; `progress` hears each stage as it starts (`stage_count` of them, e.g. to show them
    in a progress bar)."""
    names = sorted({n for a in analyses for n in a.hook_names()})
    record = CheckpointRecord(step, tokens_seen, label or str(step), seconds={a.name: 0.0 for a in analyses})

    def timed(a: Analysis, fn: Callable[[], Measurement | None]) -> Measurement | None:
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
            logits, cache = probe_pass(view, batch, names)
            for a in analyses:
                timed(a, lambda: a.update(batch, logits, cache, windows))
        results: dict[str, Measurement] = {}
        for a in _in_reading_order(analyses):
            progress(a.name)
            a.peers = {name: results[name] for name in a.reads if name in results}
            results[a.name] = timed(a, lambda: a.conclude(a.compute()))
            a.advance(results[a.name])
            a.reset()
            record.values |= results[a.name].values
            record.tables |= results[a.name].tables
            record.summary |= results[a.name].summary
    for a in analyses:
        a.bind(None, step)
    return record


def _in_reading_order(analyses: list[Analysis]) -> list[Analysis]:
    """Every analysis after the analyses it reads (those that are measured at all)."""
    names = {a.name for a in analyses}
    ordered: list[Analysis] = []
    while len(ordered) < len(analyses):  # by name: a Metric's == builds a new metric
        done = {a.name for a in ordered}
        ordered += [a for a in analyses if a.name not in done and (set(a.reads) & names) <= done]
    return ordered
