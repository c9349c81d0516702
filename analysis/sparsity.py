"""`sparsity`: MLP activation sparsity and neuron death per layer.

Wild & Anderson 2024, "Uncovering Layer-Dependent Activation Sparsity Patterns in ReLU
Transformers". A unit is *active* on a token when its pre-activation `blocks.{l}.mlp.hook_pre` is
> 0. For ReLU (and relu²) this is exactly a nonzero output, the paper's hard-zero criterion; for
GELU and other smooth activations (and the gate of SwiGLU) it is the pre-activation sign, which is
not comparable with the paper's numbers but keeps the analysis running.

Keys, per layer l:
- `sparsity/token_density_mean/L{l}` and `_p5`, `_p25`, `_p50`, `_p75`, `_p95`: fraction of units
  active per probe token.
- `sparsity/seq_usage_mean/L{l}`: fraction of units active at least once in a probe window.
- `sparsity/batch_usage/L{l}`: fraction of units active at least once on the whole probe set (the
  paper's Fig. 1 quantity, over `sparsity/batch_window_tokens` tokens: 8192 with the default 64
  windows of 128; an OR across ranks, never an average).
- `sparsity/always_on_frac/L{l}`: units active on ≥ 99% of probe tokens; `sparsity/freq_median/L{l}`.
- `sparsity/dead_frac/L{l}`, `sparsity/dead_count/L{l}`: units never active on the probe set.
- `sparsity/dead_since_init/L{l}`: dead at the first measured checkpoint and at every one since.
- `sparsity/turned_off/L{l}`, `sparsity/revived/L{l}`: units alive at the previous checkpoint and
  dead now, and the reverse (counts).
- `sparsity/dead_expected_chance/L{l}`: Σ_f (1 − p_f)^N over the units alive at the previous
  checkpoint, the number of them expected to fire on none of the N probe tokens if each fired
  independently with its previous frequency p_f; far fewer than `turned_off` means the units were
  turned off by training, not by chance.
- `sparsity/sleeping_frac/L{l}`: dead units whose maximum pre-activation is within `sleep_margin`
  (default 0.1) of zero, told apart from units far below; `sparsity/dead_margin_median/L{l}`.
- With `train_batches: true` (online only): `sparsity/train_dead_frac/L{l}`, units that fired on
  none of the training tokens since the previous checkpoint (an OR over ranks). This uses the
  base class's training stream (`training_hook_names`, `observe_training`).

Departure: the paper's exact percentiles and its test of "training-driven" death were not
retrievable; the percentiles and the chance null above are ours (spec §1.3).
"""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Result
from dynascope.analysis.view import Cache, ModelShape

PERCENTILES = (5, 25, 50, 75, 95)


class Sparsity(Analysis):
    name = "sparsity"
    headline = "sparsity/batch_usage/L0"  # the overview draws every layer of this metric
    carry = ("prev_alive", "prev_freq", "init_dead")

    def __init__(self, shape: ModelShape, context: AnalysisContext, sleep_margin: float = 0.1,
                 train_batches: bool = False):
        super().__init__(shape, context)
        self.sleep_margin, self.train_batches = sleep_margin, train_batches
        L, F = shape.n_layers, shape.d_mlp
        self.add_state("density", default=[], dist_reduce_fx="cat")  # [tokens, L]
        self.add_state("seq_usage", default=[], dist_reduce_fx="cat")  # [windows, L]
        self.add_state("fired", torch.zeros(L, F, dtype=torch.uint8), dist_reduce_fx="max")  # OR over ranks
        self.add_state("counts", torch.zeros(L, F, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("zmax", torch.full((L, F), float("-inf")), dist_reduce_fx="max")
        self.add_state("n_tokens", torch.tensor(0), dist_reduce_fx="sum")
        # the training stream between checkpoints (online, with train_batches)
        self.add_state("train_fired", torch.zeros(L, F, dtype=torch.uint8), dist_reduce_fx="max")
        self.add_state("train_tokens", torch.tensor(0), dist_reduce_fx="sum")
        self.prev_alive: torch.Tensor | None = None
        self.prev_freq: torch.Tensor | None = None
        self.init_dead: torch.Tensor | None = None

    def hook_names(self) -> list[str]:
        return [f"blocks.{l}.mlp.hook_pre" for l in range(self.shape.n_layers)]

    def training_hook_names(self) -> list[str]:
        return self.hook_names() if self.train_batches else []

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        z = torch.stack([cache[n] for n in self.hook_names()], dim=2).float()  # [B, T, L, F]
        on = z > 0
        self.density.append(on.float().mean(-1).flatten(0, 1))
        self.seq_usage.append(on.any(dim=1).float().mean(-1))
        self.fired |= on.flatten(0, 1).any(dim=0).to(torch.uint8)
        self.counts += on.flatten(0, 1).sum(dim=0)
        self.zmax = torch.maximum(self.zmax, z.flatten(0, 1).amax(dim=0))
        self.n_tokens += on.shape[0] * on.shape[1]

    def observe_training(self, name: str, activation: torch.Tensor) -> None:
        """Streaming OR of the units that fire on training tokens (called from the training forward pass)."""
        layer = int(name.split(".")[1])
        on = (activation.detach() > 0).flatten(0, -2)
        self.train_fired[layer] |= on.any(dim=0).to(torch.uint8)
        if layer == 0:
            self.train_tokens += on.shape[0]

    def compute(self) -> Result:
        density, seq = dim_zero_cat(self.density), dim_zero_cat(self.seq_usage)
        q = torch.tensor([p / 100 for p in PERCENTILES], device=density.device)
        dq = density.quantile(q, dim=0)  # [P, L]
        alive = self.fired.bool()
        freq = self.counts.double() / self.n_tokens
        dead = ~alive
        n = int(self.n_tokens)
        out: dict[str, float] = {"sparsity/batch_window_tokens": float(n)}
        init_dead = dead.clone() if self.init_dead is None else self.init_dead.to(dead.device) & dead
        expected = (((1 - self.prev_freq) ** n * self.prev_alive).sum(-1) if self.prev_freq is not None
                    else torch.full((self.shape.n_layers,), float("nan"), dtype=torch.float64))
        for l in range(self.shape.n_layers):
            per = {"token_density_mean": density[:, l].mean().item(), "seq_usage_mean": seq[:, l].mean().item(),
                   "batch_usage": alive[l].float().mean().item(), "dead_frac": dead[l].float().mean().item(),
                   "dead_count": float(dead[l].sum()), "dead_since_init": float(init_dead[l].sum()),
                   "always_on_frac": (freq[l] >= 0.99).float().mean().item(), "freq_median": freq[l].median().item(),
                   "dead_expected_chance": expected[l].item()}
            per |= {f"token_density_p{p}": dq[i, l].item() for i, p in enumerate(PERCENTILES)}
            margins = self.zmax[l][dead[l]]
            per["sleeping_frac"] = (margins > -self.sleep_margin).float().mean().item() if len(margins) else 0.0
            per["dead_margin_median"] = margins.median().item() if len(margins) else float("nan")
            if self.prev_alive is not None:
                per["turned_off"] = float((self.prev_alive[l] & dead[l]).sum())
                per["revived"] = float((~self.prev_alive[l] & alive[l]).sum())
            out |= {f"sparsity/{k}/L{l}": v for k, v in per.items()}
        if self.train_tokens > 0:
            out |= {f"sparsity/train_dead_frac/L{l}": (self.train_fired[l] == 0).float().mean().item()
                    for l in range(self.shape.n_layers)}
        return Result(out, carry={"prev_alive": alive.clone(), "prev_freq": freq.clone(), "init_dead": init_dead})
