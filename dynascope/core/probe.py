"""The probe set: a fixed, seeded set of held-out token windows, identical at every checkpoint.

The windows are drawn from the validation split, saved once in the run directory
(`RunFiles.probe`) and read back by the offline runner, so online and offline analyses see
exactly the same tokens. Under data parallelism each rank takes a contiguous, disjoint shard made
of whole probe batches, so every rank measures the same batches a single process would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dynascope.core.errors import DynascopeError
from dynascope.core.io import atomic_path


def sample_probe(val_tokens: np.ndarray, n_windows: int, length: int, seed: int = 0) -> torch.Tensor:
    """`n_windows` windows of `length` tokens at seeded random offsets of the validation split."""
    if len(val_tokens) < length:
        raise DynascopeError(f"the validation split has {len(val_tokens)} tokens, fewer than one probe window "
                             f"of {length}; add text or raise data.val_fraction")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val_tokens) - length + 1, size=n_windows)
    return torch.from_numpy(np.stack([val_tokens[s:s + length] for s in starts]).astype(np.int64))


def save_probe(path: str | Path, tokens: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens.contiguous()}, str(tmp))


def load_probe(path: str | Path) -> torch.Tensor:
    if not Path(path).is_file():
        raise DynascopeError(f"probe set {path} not found; it is written by the first analysis of `dynascope fit`")
    try:
        return load_file(str(path))["tokens"]
    except Exception as e:  # safetensors raises several types for bad headers and truncation
        raise DynascopeError(f"probe set {path} cannot be read ({e}); restore it from a copy of the run, or "
                             "delete it to draw a new one (offline values will then differ)") from None


def load_counts(path: str | Path, option: str = "counts") -> np.ndarray:
    """A run's per-token counts of its training split (counts.npy), given as `option`."""
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DynascopeError(f"{option} {path} cannot be read ({e}); give a run's counts.npy") from None


def shard(tokens: torch.Tensor, rank: int, world_size: int, unit: int = 1) -> tuple[torch.Tensor, int]:
    """This rank's contiguous part of the probe set in whole units of `unit` windows (a probe batch), and
    the index of its first window; the shards of all ranks are disjoint and cover the set."""
    starts = torch.tensor_split(torch.arange(0, len(tokens), unit), world_size)[rank]
    if len(starts) == 0:
        return tokens[:0], len(tokens)
    first, last = int(starts[0]), min(int(starts[-1]) + unit, len(tokens))
    return tokens[first:last], first
