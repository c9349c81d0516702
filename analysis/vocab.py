"""`vocab`: FFN sub-updates in vocabulary space and the logit lens.

Geva et al. 2022, "Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the
Vocabulary Space" (definitions of the paper and its code, `aviclu/ffn-values`). The FFN output of
layer l is Σ_i m_i v_i + b: coefficients m = `blocks.{l}.mlp.hook_post`, value vectors v_i (rows of
`view.mlp_values(l)`). Sub-update i changes the logit of token w by e_w·(m_i v_i) with e_w the
unembedding row of w.

At a fixed subsample of probe positions (every `position_stride`-th, default 8):
- Logit lens: each layer's prediction is argmax of final-norm(resid_post_l) @ Eᵀ (E the unembedding).
  `vocab/agree_final/L{l}`: fraction of positions whose layer-l top-1 is the final top-1. The
  saturation layer ℓ* is the first layer from which every later layer predicts the final top-1:
  `vocab/saturation_layer_mean`, its histogram (table `vocab/saturation_hist`), and the implied
  early-exit saving `vocab/early_exit_saving` = mean of 1 − (ℓ* + 1)/L.
- Dominant sub-updates: per position and layer the 10 largest by |m_i|·‖v_i‖. `vocab/promotion_max/L{l}`:
  mean over positions of their maximum score for the layer's top candidate (its logit-lens top-1);
  `vocab/promotion_rate/L{l}`: the fraction of them with a positive score for it; `vocab/random_max/L{l}`:
  the same maximum for 10 fixed random units (baseline). At saturation events (positions with ℓ* = l),
  `vocab/saturation_promoted_max/L{l}` for the promoted final token and `vocab/elimination_mean/L{l}`:
  the mean score for the eliminated tokens, those ranked above the promoted one before the FFN
  (final-norm of resid_post_l minus the FFN output), at most 10 of them.
- Value vectors in vocabulary space (weights only): top tokens of E·v_i for `table_values` values
  per layer (table `vocab/value_top_tokens`, decoded with the run's tokenizer), and a coherence proxy
  `vocab/value_coherence/L{l}`: mean pairwise cosine of the unembedding rows of each value's top-k
  tokens, averaged over `coherence_values` sampled values, against Gaussian vectors with the layer's
  per-coordinate value mean and std (`vocab/random_coherence/L{l}`).

Departures: positions are a fixed stride of the probe windows rather than the last position of
randomly cut sentences; values are projected with the raw unembedding (E·v_i, the lm-debugger
convention; the GPT-2 code applies the final norm first); a layer whose top-1 is the final top-1 at
ℓ* = 0 has no "before the FFN" at layer 0 other than the attention output, which is what is used.
With GELU, m_i can be negative, so scores keep their sign and |m_i| is used only for dominance.
"""

from __future__ import annotations

import torch

from dynascope.analysis.base import Analysis, AnalysisContext, Result, Table
from dynascope.analysis.view import Cache, ModelShape

TOP = 10


class Vocab(Analysis):
    name = "vocab"
    headline = "vocab/saturation_layer_mean"

    def __init__(self, shape: ModelShape, context: AnalysisContext, position_stride: int = 8, table_values: int = 8,
                 top_k: int = 10, coherence_values: int = 64, seed: int = 0):
        super().__init__(shape, context)
        self.position_stride, self.table_values, self.top_k = position_stride, table_values, top_k
        self.coherence_values = coherence_values
        L = shape.n_layers
        g = torch.Generator().manual_seed(seed)
        self.random_units = torch.stack([torch.randperm(shape.d_mlp, generator=g)[:TOP] for _ in range(L)])
        self.sampled_values = torch.stack([torch.randperm(shape.d_mlp, generator=g)[:coherence_values]
                                           for _ in range(L)])
        self.seed = seed
        for state in ("agree", "promotion_max", "promotion_rate", "random_max", "saturation_promoted_max",
                      "elimination_mean", "n_events"):
            self.add_state(state, torch.zeros(L, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("saturation_hist", torch.zeros(L, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_positions", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def hook_names(self) -> list[str]:
        L = self.shape.n_layers
        return [f"blocks.{l}.hook_resid_post" for l in range(L)] + [f"blocks.{l}.mlp.hook_post" for l in range(L)]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        view = self.view
        pos = torch.arange(self.position_stride - 1, tokens.shape[1], self.position_stride, device=tokens.device)
        L, E = self.shape.n_layers, view.output_embeddings.float()
        resid = [cache[f"blocks.{l}.hook_resid_post"][:, pos].flatten(0, 1).float() for l in range(L)]
        preds = torch.stack([view.unembed(view.final_norm(r)).argmax(-1) for r in resid])  # [L, N]
        final = preds[-1]
        eq = preds == final
        sat = L - eq.flip(0).int().cumprod(0).sum(0)  # first layer of the trailing run of agreement
        self.agree += eq.double().sum(1)
        self.saturation_hist += torch.bincount(sat, minlength=L)[:L].double()
        self.n_positions += final.numel()
        for l in range(L):
            m = cache[f"blocks.{l}.mlp.hook_post"][:, pos].flatten(0, 1).float()  # [N, F]
            values = view.mlp_values(l).float()  # [F, d]
            top = (m.abs() * values.norm(dim=-1)).topk(min(TOP, m.shape[1]), dim=-1).indices  # [N, 10]
            score_top = self._scores(m, values, E[preds[l]], top)  # [N, 10]
            self.promotion_max[l] += score_top.amax(-1).double().sum()
            self.promotion_rate[l] += (score_top > 0).double().mean(-1).sum()
            rand = self.random_units[l].to(m.device).expand(len(m), -1)
            self.random_max[l] += self._scores(m, values, E[preds[l]], rand).amax(-1).double().sum()
            events = (sat == l).nonzero().flatten()
            if len(events):
                self._saturation(l, events, m, values, resid[l], final, top)

    @staticmethod
    def _scores(m: torch.Tensor, values: torch.Tensor, e: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """e_w · (m_i v_i) for each position's reference row e [N, d] and units [N, k]."""
        return m.gather(1, units) * torch.einsum("nd,nkd->nk", e, values[units])

    def _saturation(self, l: int, events: torch.Tensor, m: torch.Tensor, values: torch.Tensor,
                    resid: torch.Tensor, final: torch.Tensor, top: torch.Tensor) -> None:
        view = self.view
        E = view.output_embeddings.float()
        m, top, promoted = m[events], top[events], final[events]
        bias = view.mlp_out_bias(l)
        ffn_out = m @ values + (bias.float() if bias is not None else 0)
        before = view.unembed(view.final_norm(resid[events] - ffn_out))  # [n, V] the distribution before the FFN
        self.saturation_promoted_max[l] += self._scores(m, values, E[promoted], top).amax(-1).double().sum()
        above = before > before.gather(1, promoted[:, None])  # tokens ranked above the promoted one
        k = min(TOP, before.shape[1])
        ranked = before.masked_fill(~above, float("-inf")).topk(k, dim=-1)
        valid = ranked.values > float("-inf")  # [n, k] eliminated tokens of each event
        scores = m.gather(1, top)[:, None] * torch.einsum("nkd,ntd->nkt", E[ranked.indices], values[top])
        per_event = (scores.mean(-1) * valid).sum(-1) / valid.sum(-1).clamp_min(1)  # [n]
        has = valid.any(-1)
        self.elimination_mean[l] += per_event[has].double().sum()
        self.n_events[l] += has.double().sum()

    def compute(self) -> Result:
        L, n = self.shape.n_layers, self.n_positions
        layers = torch.arange(L, dtype=torch.float64, device=self.saturation_hist.device)
        hist = self.saturation_hist
        out = {"vocab/saturation_layer_mean": (hist * layers).sum().item() / n.item(),
               "vocab/early_exit_saving": (hist * (1 - (layers + 1) / L)).sum().item() / n.item()}
        events = hist.clamp_min(1)
        per = {"agree_final": self.agree / n, "promotion_max": self.promotion_max / n,
               "promotion_rate": self.promotion_rate / n, "random_max": self.random_max / n,
               "saturation_promoted_max": torch.where(hist > 0, self.saturation_promoted_max / events, torch.nan),
               "elimination_mean": torch.where(self.n_events > 0, self.elimination_mean / self.n_events.clamp_min(1),
                                               torch.nan)}
        for key, vals in per.items():
            out |= {f"vocab/{key}/L{l}": v for l, v in enumerate(vals.tolist())}
        for l in range(L):
            out[f"vocab/value_coherence/L{l}"], out[f"vocab/random_coherence/L{l}"] = self._coherence(l)
        rows = []
        for l in range(L):
            units = self.sampled_values[l][:self.table_values]
            for unit, ids in zip(units.tolist(), self.value_top_tokens(l, units, self.top_k).tolist(), strict=True):
                rows.append([l, unit, " | ".join(self.context.decode(ids))])
        tables = {"vocab/value_top_tokens": Table(["layer", "unit", "top tokens of E·v"], rows),
                  "vocab/saturation_hist": Table(["layer", "fraction of positions"],
                                                 [[l, f] for l, f in enumerate((hist / n).tolist())])}
        return Result(out, tables=tables)

    def value_top_tokens(self, layer: int, units: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k token ids of E·v_i for each unit i: [len(units), k]."""
        return self._top_tokens(self.view.mlp_values(layer).float()[units], k)

    def _top_tokens(self, vectors: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k token ids of the raw vocabulary projection E·v of each vector: [n, k]."""
        return (vectors @ self.view.output_embeddings.float().T).topk(k, dim=-1).indices

    def _coherence(self, layer: int) -> tuple[float, float]:
        values = self.view.mlp_values(layer).float()
        E = torch.nn.functional.normalize(self.view.output_embeddings.float(), dim=-1)
        g = torch.Generator().manual_seed(self.seed + layer)
        noise = torch.randn(len(self.sampled_values[layer]), values.shape[1], generator=g).to(values.device)
        random = values.mean(0) + noise * values.std(0)

        def coherence(vectors: torch.Tensor) -> float:
            emb = E[self._top_tokens(vectors, self.top_k)]  # [n, k, d]
            sims = emb @ emb.transpose(1, 2)  # [n, k, k]
            off = ~torch.eye(self.top_k, dtype=torch.bool, device=sims.device)
            return sims[:, off].mean().item()

        return coherence(values[self.sampled_values[layer].to(values.device)]), coherence(random)
