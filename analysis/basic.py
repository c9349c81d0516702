"""`basic`: probe loss, per-layer residual-stream norm and unembedding row-norm statistics.

No paper behind it: it proves the plumbing (probe set, hooks, cross-rank sums, logging, offline
replay) and gives every run a loss curve on fixed held-out tokens.

Keys: `basic/probe_loss` (mean next-token cross-entropy in nats over all probe positions but the
last of each window), `basic/resid_norm/L{l}` (mean L2 norm of `blocks.{l}.hook_resid_post` over
probe positions), `basic/unembed_row_norm_mean|std|max` (L2 norms of the unembedding rows, the
tokens' output embeddings).
"""

from __future__ import annotations

import torch

from dynascope.analysis.base import LOGSUMEXP, Analysis, AnalysisContext, Measurement
from dynascope.analysis.view import Cache, ModelShape


class Basic(Analysis):
    name = "basic"
    headline = "basic/probe_loss"
    title = "Probe loss"
    expectation = "Mean next-token cross-entropy on the fixed held-out probe windows: it falls as the model learns."

    def __init__(self, shape: ModelShape, context: AnalysisContext):
        super().__init__(shape, context)
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_predictions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("resid_norm_sum", torch.zeros(shape.n_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_positions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def hook_names(self) -> list[str]:
        return [*self.resid_names(), LOGSUMEXP]

    def resid_names(self) -> list[str]:
        return [f"blocks.{l}.hook_resid_post" for l in range(self.shape.n_layers)]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        gold_logits = logits[:, :-1].float().gather(-1, tokens[:, 1:, None]).squeeze(-1)  # the last has no next token
        nll = cache[LOGSUMEXP][:, :-1] - gold_logits
        self.loss_sum += nll.sum().double()
        self.n_predictions += nll.numel()
        norms = torch.stack([cache[n].float().norm(dim=-1).sum() for n in self.resid_names()])
        self.resid_norm_sum += norms.double()
        self.n_positions += tokens.numel()

    def compute(self) -> Measurement:
        out = {"basic/probe_loss": (self.loss_sum / self.n_predictions).item()}
        for l, s in enumerate((self.resid_norm_sum / self.n_positions).tolist()):
            out[f"basic/resid_norm/L{l}"] = s
        rows = self.view.output_embeddings.detach().float().norm(dim=-1)
        out |= {"basic/unembed_row_norm_mean": rows.mean().item(), "basic/unembed_row_norm_std": rows.std().item(),
                "basic/unembed_row_norm_max": rows.max().item()}
        return Measurement(out)
