"""The notebook API: `dynascope.measure` and `dynascope.load_run` (re-exported by the package).

`measure` runs the same `measure` routine as training and replay on models held in memory: dynascope's own
`Transformer`, a Hugging Face causal LM (`transformers`) or a TransformerLens `HookedTransformer`, one
checkpoint or several in training order (analyses with a carry, e.g. the unembedding's change per step,
compare each with the one before). `load_run` reads a run directory (or an `analyze --hf` output directory) back as
DataFrames.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from dynascope.analysis import build, resolve
from dynascope.analysis.base import AnalysisContext
from dynascope.analysis.measure import measure as measure_checkpoint
from dynascope.analysis.view import ModelView, view_of
from dynascope.core.errors import DynascopeError
from dynascope.core.probe import load_counts, load_probe
from dynascope.core.records import RunHistory
from dynascope.pages.onsets import COLUMNS, onset_rows

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def _tokens(probe: torch.Tensor | np.ndarray | str | Path) -> torch.Tensor:
    if isinstance(probe, str | Path):
        return load_probe(probe)
    tokens = torch.as_tensor(probe)
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise DynascopeError(f"probe: give token ids [windows, positions] (got {tuple(tokens.shape)} "
                             f"{tokens.dtype}), or a probe.safetensors path")
    return tokens.long()


def _counts(counts: torch.Tensor | np.ndarray | str | Path | None) -> torch.Tensor | None:
    if isinstance(counts, str | Path):
        counts = load_counts(counts)
    return None if counts is None else torch.as_tensor(counts)


def measure(models: nn.Module | ModelView | Mapping[int, nn.Module | ModelView], probe: torch.Tensor | str | Path,
            analyses: str | list[str] = "all", counts: torch.Tensor | np.ndarray | str | Path | None = None,
            options: dict[str, dict] | None = None, batch_size: int = 16, tokenizer: Tokenizer | None = None,
            eos_id: int | None = None) -> pd.DataFrame:
    """Measure `analyses` on a model, or on checkpoints {step: model} in training order; one row per step.

    Args:
        models: dynascope's `Transformer`, a `transformers` causal LM (GPT-2, GPT-NeoX, Llama family), a
            TransformerLens `HookedTransformer`, or a dict of them by training step.
        probe: token ids [windows, positions] (or a run's probe.safetensors).
        analyses: names (`dynascope.analysis.REGISTRY`), comma-separated or a list, or "all".
        counts: the training split's count of each token id (a run's counts.npy); `frequency` needs them.
        options: per-analysis constructor options, e.g. {"regions": {"n_alpha": 31}}.
        tokenizer, eos_id: decode tokens in tables; leave windows' document boundaries out.

    Returns the values as a DataFrame indexed by step, one column per key (as metrics.csv).
    """
    checkpoints = dict(models) if isinstance(models, Mapping) else {0: models}
    views = {step: view_of(model) for step, model in checkpoints.items()}
    names = resolve(analyses)
    if "frequency" in names and counts is None:
        raise DynascopeError("analyses: frequency needs counts=, each token id's count in the training split (e.g. "
                             "np.load('RUN/counts.npy')); give them, or leave frequency out of analyses")
    tokens = _tokens(probe)
    first = next(iter(views.values()))
    if tokens.shape[1] > first.shape.context_length:
        raise DynascopeError(f"probe: windows of {tokens.shape[1]} tokens are longer than the model's context "
                             f"({first.shape.context_length}); cut them, e.g. probe[:, :{first.shape.context_length}]")
    context = AnalysisContext(_counts(counts), tokenizer, eos_id)
    measured = build(names, first.shape, context, options, first.device)
    rows = {}
    for step, view in views.items():
        record = measure_checkpoint(view, measured, tokens, step, batch_size=batch_size)
        rows[step] = record.values
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "step"
    return frame


class Run(NamedTuple):
    """A run's record: its measurements by step, its summary (onsets and events) and its onsets table."""

    metrics: pd.DataFrame
    summary: dict
    onsets: pd.DataFrame


def load_run(directory: str | Path) -> Run:
    """A run directory (or an `analyze --hf` output directory) as `Run(metrics, summary, onsets)`: the rows logged
    online merged with those `dynascope analyze` measured, indexed by step."""
    history = RunHistory.load(directory)
    metrics = pd.DataFrame(history.rows).set_index("step")
    metrics.index = metrics.index.astype(int)
    onsets = pd.DataFrame(onset_rows(history.summary, directory), columns=list(COLUMNS))
    return Run(metrics, history.summary, onsets.set_index("event"))


__all__ = ["Run", "load_run", "measure"]
