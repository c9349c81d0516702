"""Onsets: *when* an event happens during training, reported as a measurement.

An analysis declares its events (`Analysis.events()`), each an `Event`: a condition on the analysis's
values at one checkpoint (and the previous checkpoint's), a guard (a precondition under which the
condition may be judged at all: an event cannot fire where its guard fails, and a sustained event that
has fired is revised there), and whether it is *sustained* (the first checkpoint from which the condition
holds at every later one) or a *first crossing* (the first checkpoint at which it holds). A checkpoint
that lacks a value the event reads (a death count between judgements, say) does not judge it.

At every checkpoint each event is judged: whether the guard passed, whether the condition held, and
whether both held under each of `REPLICATES` bootstrap replicates of the probe set. The analysis gives,
in `Measurement.replicates`, the values its conditions read recomputed on resampled probe windows (the
same seeded resample b at every checkpoint, so replicate b is one consistent alternative probe set).
From the judgements so far (`summarize`):

- `<event>_step`: the onset, None while there is none;
- `_bracket_lo`, `_bracket_hi`: the last checkpoint at which it did not hold and the first from which it
  holds (lo None when it held from the first checkpoint judged);
- `_interval_lo`, `_interval_hi`: the 2.5th and 97.5th percentiles of the replicates' onsets, and
  `_confidence`: the share of replicates in which it happened at all;
- `_revisions`: how often it changed once first set (revised away, or set again later); `_guarded`: at how
  many checkpoints its guard failed.

The interval covers probe sampling only: another seed trains another model, which only runs with other
seeds cover (`dynascope compare`). A value an analysis does not resample (a weights-only quantity, the
training stream's death counts) is the same in every replicate: its interval is the point and its
confidence 0 or 1. Each analysis's docstring says what is resampled for each of its events. Every
checkpoint's judgements are also a table (`<analysis>/onsets`: event, guard, holds, replicates), from which
a merge of sharded replays, or any reader, rebuilds the same summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dynascope.core.records import Table

REPLICATES = 200
SEED = 20241204
COLUMNS = ["event", "guard", "holds", "replicates"]


def resample_counts(n: int, replicates: int = REPLICATES, seed: int = SEED) -> torch.Tensor:
    """[replicates, n] multinomial counts: how often each of n units (probe windows, held-out tokens) is drawn
    into each bootstrap replicate; the same at every checkpoint of a run."""
    draws = torch.randint(n, (replicates, n), generator=torch.Generator().manual_seed(seed + n))
    return torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones(replicates, n,
                                                                                              dtype=torch.float64))


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of `values` [n] under each row of `weights` [B, n] (the smallest value whose cumulative
    weight reaches q of the row's total): [B]."""
    order = values.argsort()
    return sorted_weighted_quantile(values[order], weights[:, order], q)


def sorted_weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> torch.Tensor:
    """`weighted_quantile` of `values` sorted ascending, `weights` [B, n] in their order."""
    cumulative = weights.cumsum(1)
    index = torch.searchsorted(cumulative, q * cumulative[:, -1:]).clamp_max(len(values) - 1)
    return values[index.squeeze(1)]


@dataclass(frozen=True)
class Event:
    """`name` (e.g. `outliers/emergence`) names the summary keys; `condition(values, previous)` and
    `guard(values)` read an analysis's values at one checkpoint (`previous`: the last checkpoint's, or None)."""

    name: str
    condition: Callable[[dict, dict | None], bool]
    guard: Callable[[dict], bool] = lambda values: True
    sustained: bool = True
    resampled: str = "nothing: it does not depend on the probe set"
    shown: str = ""  # the value (or per-layer metric) an onset card draws, with `threshold` as a line
    threshold: float | None = None


# A judgement of one event at one checkpoint: [step, guard, holds, replicates ("1" where both held)]; plain
# lists, so that a resume checkpoint holds them as it holds any carry.
Judgement = list


def _judged(event: Event, values: dict, previous: dict | None) -> tuple[bool, bool] | None:
    """(guard, guard and condition), or None where a value the event reads is missing (not judged here)."""
    try:
        guard = bool(event.guard(values))
        holds = guard and bool(event.condition(values, previous))
    except KeyError:
        return None
    return guard, holds


def judge(events: list[Event], step: int, values: dict, replicates: dict[str, list[float]],
          previous: dict | None, previous_replicates: dict[str, list[float]] | None) -> dict[str, Judgement]:
    """This checkpoint's judgement of each event it can judge."""
    n = len(next(iter(replicates.values()))) if replicates else REPLICATES

    def variant(point: dict | None, reps: dict[str, list[float]] | None, b: int) -> dict | None:
        return point if point is None or not reps else point | {k: v[b] for k, v in reps.items()}

    out = {}
    for event in events:
        point = _judged(event, values, previous)
        if point is None:
            continue
        each = [_judged(event, variant(values, replicates, b), variant(previous, previous_replicates, b))
                for b in range(n)]
        out[event.name] = [step, point[0], point[1], "".join("1" if e and e[1] else "0" for e in each)]
    return out


def onset_index(held: list[bool], sustained: bool) -> int | None:
    """The index of the event's checkpoint in a sequence of judgements, or None."""
    if not sustained:
        return next((i for i, h in enumerate(held) if h), None)
    if not held or not held[-1]:
        return None
    i = len(held)
    while i > 0 and held[i - 1]:
        i -= 1
    return i


def revisions(held: list[bool], sustained: bool) -> int:
    """How often the onset, as it stood after each checkpoint, changed once it was first set (revised away, or
    set again later)."""
    standing = [onset_index(held[:k], sustained) for k in range(1, len(held) + 1)]
    first = next((k for k, o in enumerate(standing) if o is not None), len(standing))
    return sum(1 for k in range(first + 1, len(standing)) if standing[k] != standing[k - 1])


def summarize(event: Event, judgements: list[Judgement]) -> dict[str, float | None]:
    """The summary keys of one event from its judgements in step order (see the module docstring)."""
    steps = [j[0] for j in judgements]
    held = [j[2] for j in judgements]
    i = onset_index(held, event.sustained)
    name = event.name
    out = {f"{name}_step": None if i is None else float(steps[i]),
           f"{name}_bracket_lo": None if i is None or i == 0 else float(steps[i - 1]),
           f"{name}_bracket_hi": None if i is None else float(steps[i]),
           f"{name}_revisions": float(revisions(held, event.sustained)),
           f"{name}_guarded": float(sum(not j[1] for j in judgements))}
    happened = [steps[k] for k in replicate_onsets(event, judgements) if k is not None]
    n = len(judgements[0][3]) if judgements else 0
    out[f"{name}_confidence"] = len(happened) / n if n else math.nan
    lo, hi = np.percentile(happened, [2.5, 97.5], method="inverted_cdf").tolist() if happened else (None, None)
    out[f"{name}_interval_lo"] = None if lo is None else float(lo)
    out[f"{name}_interval_hi"] = None if hi is None else float(hi)
    return out


def replicate_onsets(event: Event, judgements: list[Judgement]) -> list[int | None]:
    """Each replicate's onset (an index into the judgements, or None)."""
    n = len(judgements[0][3]) if judgements else 0
    return [onset_index([j[3][b] == "1" for j in judgements], event.sustained) for b in range(n)]


def onsets_table(judgements: dict[str, Judgement]) -> Table:
    """One checkpoint's judgements as the `<analysis>/onsets` table."""
    return Table(COLUMNS, [[name, j[1], j[2], j[3]] for name, j in judgements.items()])


def history_from_tables(entries: list[dict]) -> dict[str, list[Judgement]]:
    """{event: judgements in step order} from the entries of an `<analysis>/onsets` table file."""
    history: dict[str, list[Judgement]] = {}
    for entry in sorted(entries, key=lambda e: e["step"]):
        for name, guard, holds, reps in entry["rows"]:
            history.setdefault(name, []).append([entry["step"], guard, holds, reps])
    return history


def onset_distribution(event: Event, judgements: list[Judgement]) -> dict[int, float]:
    """{step: share of the replicates whose onset is that checkpoint}; replicates without the event left out."""
    onsets = replicate_onsets(event, judgements)
    shares: dict[int, float] = {}
    for k in onsets:
        if k is not None:
            shares[judgements[k][0]] = shares.get(judgements[k][0], 0.0) + 1 / len(onsets)
    return shares
