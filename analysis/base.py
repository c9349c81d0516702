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

Summary events are onsets (`onsets.py`): an analysis declares its events in `events()`, and gives in
`Measurement.replicates` the values its conditions read, recomputed on bootstrap replicates of the probe
windows; `conclude()`, which the measurement routine calls after `compute()`, judges them and adds each
event's onset, bracket, interval and confidence to the summary, and the judgements to the carry and to the
`<name>/onsets` table, from which a merge of sharded replays rebuilds the same summary.

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

from dynascope.analysis.onsets import Event, judge, onsets_table, summarize
from dynascope.analysis.view import Cache, ModelShape, ModelView
from dynascope.core.errors import DynascopeError
from dynascope.core.records import Table
from dynascope.core.settings import check_named_options

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dynascope.analysis.figures import RunPlot

REGISTRY: dict[str, type[Analysis]] = {}
# Not hooks: an analysis that lists any in hook_names() finds the forward pass's next-token distribution in its
# cache, computed once per probe batch for every analysis that asks: PROBS, the softmax of the logits [B, T, V];
# LOGSUMEXP, their log-partition [B, T] (log p = logits − LOGSUMEXP), both fp32; and TOP1, the argmax token [B, T].
PROBS = "probs"
LOGSUMEXP = "logsumexp"
TOP1 = "top1"
HEAD = (PROBS, LOGSUMEXP, TOP1)


class Measurement:
    """What one analysis reports for one checkpoint (values, tables, summary events), what it carries to the
    next, and `replicates`: values its events read, recomputed on each bootstrap replicate of the probe set
    ({key: [value per replicate]}, see onsets.py). A plain class: torchmetrics' compute wrapper walks, copies
    and clones whatever dataclasses, lists and tensors it finds in what compute() returns, which for tables of
    hundreds of rows cost more than the analysis."""

    __slots__ = ("values", "tables", "summary", "carry", "replicates")

    def __init__(self, values: dict[str, float], tables: dict[str, Table] | None = None,
                 summary: dict[str, float | None] | None = None, carry: dict[str, Any] | None = None,
                 replicates: dict[str, list[float]] | None = None):
        self.values, self.tables, self.summary, self.carry = values, tables or {}, summary or {}, carry or {}
        self.replicates = replicates or {}


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
    paper_url: ClassVar[str] = ""
    expectation: ClassVar[str] = ""
    signature: ClassVar[str] = ""  # the paper's signature in words, which the event `signature_event` detects
    signature_event: ClassVar[str] = ""
    compare_keys: ClassVar[tuple[str, ...]] = ()
    reference_lines: ClassVar[dict[str, float]] = {}
    full_state_update = False

    view: ModelView | None  # the checkpoint being measured, bound by `bind`
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
        self.onset_history: dict[str, list] = {}  # each event's judgements so far (onsets.py)
        self.previous_values: dict[str, float] | None = None  # what the events compare with, and its replicates
        self.previous_replicates: dict[str, list[float]] | None = None

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

    def bind(self, view: ModelView | None, step: int) -> None:
        """The checkpoint to measure: set once per checkpoint, before the first `update` (None after the last
        `compute`, so that no analysis keeps a measured model alive)."""
        self.view, self.step = view, step

    def hook_names(self) -> list[str]:
        return []

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Measurement:
        raise NotImplementedError

    @property
    def carried(self) -> tuple[str, ...]:
        return (*self.carry, "onset_history", "previous_values", "previous_replicates")

    def advance(self, result: Measurement) -> None:
        """Adopt the result's carry as the state seen by the next checkpoint's `compute()`."""
        for name, value in result.carry.items():
            if name not in self.carried:
                raise KeyError(f"{self.name} carries {name!r}, which is not listed in its `carry`")
            setattr(self, name, value)

    def events(self) -> list[Event]:
        """The events this analysis declares (onsets.py); none by default."""
        return []

    def conclude(self, result: Measurement) -> Measurement:
        """`result` with the declared events judged at this checkpoint: their onsets in the summary, the
        judgements in the `<name>/onsets` table and in the carry. Pure, as compute()."""
        events = self.events()
        if not events:
            return result
        judged = judge(events, self.step, result.values, result.replicates, self.previous_values,
                       self.previous_replicates)
        history = self.onset_history | {name: [*self.onset_history.get(name, []), j] for name, j in judged.items()}
        summary = {k: v for e in events if e.name in history for k, v in summarize(e, history[e.name]).items()}
        carry = {"onset_history": history, "previous_values": result.values,
                 "previous_replicates": result.replicates}
        return Measurement(result.values, result.tables | {f"{self.name}/onsets": onsets_table(judged)},
                           result.summary | summary, result.carry | carry, result.replicates)

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

