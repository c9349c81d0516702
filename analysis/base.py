"""The analysis base class and the registry that names analyses by string.

An analysis is a `torchmetrics.Metric`: it declares the hook names it needs, accumulates probe
batches in `update(view, tokens, logits, cache)` into states declared with `add_state(...,
dist_reduce_fx=...)` (so the same code syncs across data-parallel ranks and runs offline in one
process), and returns a flat `dict[str, float]` from `compute()` with keys `<name>/<metric>` or
`<name>/<metric>/L{l}`. State that must survive from one checkpoint to the next lives in plain
attributes listed in `carry`, saved by the callback's `state_dict`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from dynascope.analysis.view import Cache, ModelView
from dynascope.train.errors import DynascopeError

REGISTRY: dict[str, type[Analysis]] = {}


class Analysis(Metric):
    name: ClassVar[str]
    headline: ClassVar[str]  # the key drawn in the overview plot
    carry: ClassVar[tuple[str, ...]] = ()  # attributes kept across checkpoints
    curve_tables: ClassVar[tuple[str, ...]] = ()  # tables (x column, then one series per column) to plot per step
    full_state_update = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, view: ModelView, **kwargs: Any):
        super().__init__(**kwargs)
        self.view = view
        self.step = 0

    def hook_names(self) -> list[str]:
        return []

    def update(self, view: ModelView, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache) -> None:
        raise NotImplementedError

    def observe_training(self, name: str, activation: torch.Tensor) -> None:
        """Sees the training forward pass's activation at each of `hook_names()` when `train_batches`
        is set (online only); a no-op by default."""

    def summary(self) -> dict[str, float | None]:
        """One-off events for the run summary (e.g. an emergence step; None once revised away)."""
        return {}

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """Small tables `{key: (columns, rows)}` for wandb and the run directory; empty by default."""
        return {}

    def carry_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.carry}

    def load_carry_state(self, state: dict[str, Any]) -> None:
        for k in self.carry:
            if k in state:
                setattr(self, k, state[k])


def resolve(names: str | list[str]) -> list[str]:
    """`"all"`, a comma-separated string or a list of registered analysis names."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names == ["all"]:
        return list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise DynascopeError(f"unknown analyses {unknown}; registered: {', '.join(REGISTRY)} (or all)")
    return names


def build(names: str | list[str], view: ModelView, options: dict[str, dict] | None = None) -> list[Analysis]:
    """Instantiate analyses; `options` maps an analysis name to keyword arguments of its constructor."""
    options = options or {}
    unknown = sorted(set(options) - set(REGISTRY))
    if unknown:
        raise DynascopeError(f"options given for unknown analyses {unknown}; registered: {', '.join(REGISTRY)}")
    try:
        return [REGISTRY[n](view, **options.get(n, {})).to(view.device) for n in resolve(names)]
    except TypeError as e:
        raise DynascopeError(f"bad analysis options {options}: {e}") from None


def measure(view: ModelView, analyses: list[Analysis], tokens: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """One forward pass per probe batch with the union of requested hooks; every analysis is updated
    from it, then computed (a collective on all ranks when torch.distributed is initialised)."""
    names = sorted({n for a in analyses for n in a.hook_names()})
    for a in analyses:
        a.reset()
        a.view = view
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            batch = batch.to(view.device)
            logits, cache = view.run_with_cache(batch, names)
            for a in analyses:
                a.update(view, batch, logits, cache)
    values: dict[str, float] = {}
    for a in analyses:
        values |= a.compute()
    return values
