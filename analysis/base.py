"""The analysis base class, what it returns, what it reads besides the model, and the registry.

An analysis is a `torchmetrics.Metric`. It is built once per run from the model's `ModelShape`, an
`AnalysisContext` (corpus counts, tokenizer, end-of-document token) and its options. At each
checkpoint the measurement routine (`measure.py`) binds the checkpoint's view and step, feeds probe
batches to `update(tokens, logits, cache, windows)` (`windows`: the batch's global indices in the
probe set, the same under any sharding), which accumulates into states declared with
`add_state(..., dist_reduce_fx=...)` (so the same code reduces across data-parallel ranks and runs
offline in one process), and calls:

- `compute() -> Measurement`: pure. It reads the states, the bound view and what was carried from the
  previous checkpoint, and returns everything the analysis reports for this checkpoint: values
  (keys `<name>/<metric>` or `<name>/<metric>/L{l}`), tables, summary events, and the carry for the
  next checkpoint. Calling it twice gives the same result.
- `advance(result)`: the one step that changes what is carried (the attributes named in `carry`).

Summary events are onsets: `events(values, previous)` names conditions on a checkpoint's values (and
the previous checkpoint's), and the event step is the first checkpoint from which the condition has
held at every later one, revised when it fails. `compute()` reports them with `self.onsets(values)`,
and a merge of sharded replays recomputes them from the merged table with the same rules.

An analysis that uses another's result for the same checkpoint names it in `reads`; it is computed
after it and finds its `Measurement` in `self.peers`. Any analysis can also watch training between
checkpoints: it lists hook names in `training_hook_names()` and accumulates the training forward
passes' activations in `observe_training()`, and each optimizer step's loss and gradient norm in
`observe_step()`, into declared states, which are reduced over ranks at the checkpoint like every
other state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning_utilities import apply_to_collection  # torchmetrics' own dependency, not Lightning
from tokenizers import Tokenizer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.view import Cache, ModelShape, ModelView
from dynascope.core.errors import DynascopeError
from dynascope.core.records import Table
from dynascope.core.settings import check_named_options

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dynascope.analysis.figures import RunPlot

REGISTRY: dict[str, type[Analysis]] = {}
# Not a hook: an analysis that lists it in hook_names() finds the forward pass's log-probabilities [B, T, V]
# (fp32) in its cache, computed once per probe batch for every analysis that asks.
LOGPROBS = "logprobs"


class Measurement:
    """What one analysis reports for one checkpoint, and what it carries to the next. A plain class: torchmetrics'
    compute wrapper walks, copies and clones whatever dataclasses, lists and tensors it finds in what compute()
    returns, which for tables of hundreds of rows cost more than the analysis."""

    __slots__ = ("values", "tables", "summary", "carry")

    def __init__(self, values: dict[str, float], tables: dict[str, Table] | None = None,
                 summary: dict[str, float | None] | None = None, carry: dict[str, Any] | None = None):
        self.values, self.tables, self.summary, self.carry = values, tables or {}, summary or {}, carry or {}


@dataclass
class AnalysisContext:
    """What analyses read besides the model: the training split's per-token counts (for frequency
    targets), the tokenizer (to decode tokens in tables), the token that separates documents, and,
    offline, the final checkpoint's unembedding (for distances to the end of training). Any may be
    missing."""

    counts: torch.Tensor | None = None
    tokenizer: Tokenizer | None = None
    eos_id: int | None = None
    final_output_embeddings: torch.Tensor | None = None

    def decode(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) if self.tokenizer is not None else str(i) for i in ids]


def onset(previous: list, holds: bool, step: int) -> list:
    """An event that holds from some checkpoint on, as a list of (step, event step or None) revisions:
    the event step is the first checkpoint from which the condition has held at every later one; it is
    revised away (None) when the condition fails, and set again when it next holds."""
    current = previous[-1][1] if previous else None
    if holds and current is None:
        return [*previous, (step, step)]
    if not holds and current is not None:
        return [*previous, (step, None)]
    return previous


def onset_summary(key: str, revisions: list) -> dict[str, float | None]:
    """Summary keys of an onset: the event step (None while revised away) and how often it was revised."""
    if not revisions:
        return {}
    step = revisions[-1][1]
    return {key: None if step is None else float(step), key.replace("_step", "_revisions"): float(len(revisions) - 1)}


class Analysis(Metric):
    name: ClassVar[str]
    headline: ClassVar[str]  # the key drawn in the overview plot
    carry: ClassVar[tuple[str, ...]] = ()  # attributes kept across checkpoints, changed only by advance()
    reads: ClassVar[tuple[str, ...]] = ()  # analyses whose results of the same checkpoint compute() uses
    training_keys: ClassVar[tuple[str, ...]] = ()  # key prefixes measured on the training stream (online only)
    final_keys: ClassVar[tuple[str, ...]] = ()  # key prefixes measured against the final checkpoint (offline only)
    curve_tables: ClassVar[tuple[str, ...]] = ()  # tables (x column, then one series per column) to plot per step
    # what the pages show: the section's title, the paper followed and what it leads one to expect, the
    # curves the compare page overlays (default: the headline) and their reference lines
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    expectation: ClassVar[str] = ""
    compare_keys: ClassVar[tuple[str, ...]] = ()
    reference_lines: ClassVar[dict[str, float]] = {}
    full_state_update = False

    view: ModelView  # the checkpoint being measured, bound by `bind`
    step: int
    peers: dict[str, Measurement]  # results of the analyses named in `reads`, set before compute()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def __init__(self, shape: ModelShape, context: AnalysisContext):
        super().__init__(compute_with_cache=False)  # compute() is pure; recomputing must agree
        self.shape, self.context = shape, context
        self.list_states: set[str] = set()  # states reduced by concatenation ("cat"), kept as lists
        self.revisions: dict[str, list] = {}  # each event's onset revisions so far
        self.previous_values: dict[str, float] | None = None  # what the events compare with

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        """The report page's figures of this analysis, drawn from a run's history (default: the headline
        curve); a figure with nothing to show is left out."""
        return [fig for fig in [plot.row([lambda ax: plot.headline(ax, cls.headline)])] if fig is not None]

    @classmethod
    def compared(cls) -> tuple[str, ...]:
        """The metrics the compare page overlays (a per-layer metric without its `/L{l}`)."""
        return cls.compare_keys or (cls.headline.rpartition("/L")[0] if cls.headline.rpartition("/L")[2].isdigit()
                                    else cls.headline,)

    def add_state(self, name: str, default: torch.Tensor | list, dist_reduce_fx: str | None = None,
                  persistent: bool = False) -> None:
        super().add_state(name, default, dist_reduce_fx=dist_reduce_fx, persistent=persistent)
        if isinstance(default, list):
            self.list_states.add(name)

    def bind(self, view: ModelView, step: int) -> None:
        """The checkpoint to measure: set once per checkpoint, before the first `update`."""
        self.view, self.step = view, step

    def hook_names(self) -> list[str]:
        return []

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Measurement:
        raise NotImplementedError

    @property
    def carried(self) -> tuple[str, ...]:
        return (*self.carry, "revisions", "previous_values")

    def advance(self, result: Measurement) -> None:
        """Adopt the result's carry as the state seen by the next checkpoint's `compute()`."""
        for name, value in result.carry.items():
            if name not in self.carried:
                raise KeyError(f"{self.name} carries {name!r}, which is not listed in its `carry`")
            setattr(self, name, value)

    def events(self, values: dict[str, float], previous: dict[str, float] | None) -> dict[str, bool]:
        """{event key: whether its condition holds at this checkpoint}; none by default."""
        return {}

    def onsets(self, values: dict[str, float]) -> tuple[dict[str, float | None], dict[str, Any]]:
        """The summary of this checkpoint's events, and the carry that continues them."""
        holds = self.events(values, self.previous_values)
        revisions = {key: onset(self.revisions.get(key, []), h, self.step) for key, h in holds.items()}
        summary = {k: v for key, steps in revisions.items() for k, v in onset_summary(key, steps).items()}
        return summary, {"revisions": revisions, "previous_values": values} if holds else {}

    def training_hook_names(self) -> list[str]:
        """Hooks whose activations on training batches `observe_training` receives (online only)."""
        return []

    def observe_training(self, name: str, activation: torch.Tensor) -> None:
        """Accumulate one training forward pass's activation at hook `name` into declared states."""

    def observe_step(self, loss: float, grad_norm: float) -> None:
        """Accumulate one optimizer step's training loss (this rank's) and gradient norm (before clipping)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """The carry and the declared states, reduced over ranks (a collective), for a resume checkpoint.
        Between checkpoints only training-stream states hold data; probe states are empty."""
        with self.sync_context(should_sync=True):
            states = {name: _saved(value, as_list=name in self.list_states)
                      for name, value in self.metric_state.items()}
        return {"carry": {k: getattr(self, k) for k in self.carried}, "states": states}

    def load_checkpoint_state(self, state: dict[str, Any], with_states: bool = True) -> None:
        """Restore `checkpoint_state()` on this analysis's device. The reduced states go to one rank
        only (`with_states`), so the next reduction counts them once."""
        def here(value: Any) -> Any:
            return apply_to_collection(value, torch.Tensor, lambda t: t.to(self.device))

        for k, v in state.get("carry", {}).items():
            if k in self.carried:
                setattr(self, k, here(v))
        for k, v in (state.get("states", {}) if with_states else {}).items():
            if k in self.metric_state:
                setattr(self, k, here(v))


def _saved(value: torch.Tensor | list, as_list: bool) -> torch.Tensor | list:
    """A state on the CPU; a list state ("cat" reduction) as a list again after the reduction."""
    if not as_list:
        return value.detach().cpu().clone()
    value = dim_zero_cat(value) if isinstance(value, list) and value else value
    return [value.detach().cpu().clone()] if isinstance(value, torch.Tensor) and value.numel() else []


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


def check_options(options: dict[str, dict]) -> None:
    """Every analysis named in `options` is registered and takes each option given for it."""
    check_named_options(options, REGISTRY, "dynamics.options", "analyses", fixed=2)  # after the shape and context


def build(names: str | list[str], shape: ModelShape, context: AnalysisContext | None = None,
          options: dict[str, dict] | None = None, device: torch.device | str = "cpu") -> list[Analysis]:
    """Instantiate analyses; `options` maps an analysis name to keyword arguments of its constructor."""
    options = options or {}
    check_options(options)
    context = context or AnalysisContext()
    analyses = []
    for name in resolve(names):
        try:
            analyses.append(REGISTRY[name](shape, context, **options.get(name, {})).to(device))
        except (TypeError, ValueError) as e:
            raise DynascopeError(f"dynamics.options.{name}={options.get(name)}: {e}") from None
    return analyses

