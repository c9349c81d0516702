"""`vocab`: FFN sub-updates in vocabulary space and the logit lens.

Geva et al. 2022, "Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the
Vocabulary Space" (definitions of the paper and its code, `aviclu/ffn-values`). The FFN output of
layer l is Σ_i m_i v_i + b: coefficients m = `blocks.{l}.mlp.hook_post`, value vectors v_i (rows of
`view.mlp_values(l)`). Sub-update i changes the logit of token w by e_w·(m_i v_i) with e_w the
unembedding row of w. The *dominant* sub-updates at a position are the 10 largest by |m_i|·‖v_i‖.

At a fixed subsample of probe positions (every `position_stride`-th, default 8):
- Logit lens on the layer outputs: each layer's prediction is argmax of final-norm(resid_post_l) @ Eᵀ
  (the last layer's: the model's own logits, the same product). `vocab/agree_final/L{l}`: fraction of
  positions whose layer-l top-1 is the final top-1 (every layer but the last, which agrees with itself).
  The saturation layer ℓ* is the first layer from which every later layer predicts the final top-1:
  `vocab/saturation_layer_mean` and its histogram (table `vocab/saturation_hist`).
- Early exit. `vocab/oracle_exit_saving` = mean of 1 − (ℓ* + 1)/L is the saving of an *oracle* that
  exits at the known saturation layer (100% accurate by construction: an upper bound, not the paper's
  ~20%). The predictive rule: exit at the first layer whose logit-lens top-1 probability reaches a
  threshold τ. τ is the smallest of {0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, …,
  0.9, 0.95, 0.99, 1} whose exit accuracy (exit top-1 = final top-1) on the even-numbered probe windows
  reaches `exit_target_accuracy` (0.95); τ = 0 exits every position at layer 0, so a slack target is
  met at the rule's true bound, not at the bottom of the grid (the grid used to stop at 0.1); the
  odd-numbered (held-out) windows give `vocab/exit_accuracy`, `vocab/exit_saving` (mean share of
  layers skipped) and `vocab/exit_threshold` (τ); table `vocab/exit_curve` has every τ.
- Promotion, per layer l, for the layer's top candidate w^l: the top-1 of the distribution *before*
  the FFN, final-norm(resid_post_l − FFN output) @ Eᵀ (the spec's pre-FFN p^l). `vocab/promotion_max`,
  `_mean`, `_min` `/L{l}`: the max, mean and min of the 10 dominant sub-updates' scores for w^l,
  averaged over positions; `vocab/promotion_rate/L{l}` the fraction of them with a positive score;
  `vocab/random_max`, `_mean`, `_min` `/L{l}`: the same for 10 random sub-updates of the layer, drawn
  anew at every position (seeded by the probe window, so they do not depend on sharding).
- Saturation events (positions with ℓ* = l), on equal footing: `vocab/promoted_max`, `_mean`, `_min`
  `/L{l}`: the dominant sub-updates' scores for the promoted final token; `vocab/eliminated_max`,
  `_mean`, `_min` `/L{l}`: their scores for each eliminated token (ranked above the promoted one before
  the FFN, at most 10), averaged over the eliminated tokens of an event; `vocab/promoted_random_max`,
  `_mean`, `_min` `/L{l}`: the promoted token's scores from 10 random sub-updates at the same events
  (the baseline of `promoted_*`: `random_*` is over all positions, another population). The paper:
  promoted tokens score far above eliminated ones, whose mean is ≈ 0 (elimination by promotion).
- Value vectors in vocabulary space (weights only): top tokens of E·v_i for `table_values` values
  per layer (table `vocab/value_top_tokens`, decoded with the run's tokenizer), and a coherence proxy
  `vocab/value_coherence/L{l}`: mean pairwise cosine of the unembedding rows of each value's top-k
  tokens, averaged over `coherence_values` sampled values, against Gaussian vectors with the layer's
  per-coordinate value mean and std (`vocab/random_coherence/L{l}`).

Departures: positions are a fixed stride of the probe windows rather than the last position of
randomly cut sentences; values are projected with the raw unembedding (E·v_i, the lm-debugger
convention; the GPT-2 code applies the final norm first); the predictive early-exit rule is a
confidence threshold, simpler than the paper's cluster matching of dominant sub-updates (§3.2); random
sub-updates are drawn with replacement. With GELU, m_i can be negative, so scores keep their sign and
|m_i| is used only for dominance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Measurement, Table
from dynascope.analysis.figures import RunPlot, finite
from dynascope.analysis.onsets import Event, resample_counts
from dynascope.analysis.view import Cache, ModelShape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOP = 10
# exit thresholds τ: down to 0 (every position exits at layer 0), so that a slack accuracy target is not capped
THRESHOLDS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
              0.99, 1.0)
SCORE_KINDS = ("promotion", "random", "promoted", "promoted_random", "eliminated")


class Vocab(Analysis):
    name = "vocab"
    headline = "vocab/saturation_layer_mean"
    title = "FFN sub-updates in vocabulary space"
    paper = "Geva et al. 2022"
    paper_url = "https://arxiv.org/abs/2203.14680"
    signature = ("the prediction settles before the last layer, as FFN sub-updates promote its token (an oracle exit "
                 "saves a share of the layers above its threshold)")
    signature_event = "vocab/saturation"
    expectation = ("Scores e_w · m_i v_i of the 10 dominant FFN sub-updates. The paper: the promoted token scores far "
                   "above the eliminated ones, whose mean is ≈ 0, and random sub-updates score ≈ 0; an early exit "
                   "rule saves ~20% of layers at ~95% accuracy.")
    compare_keys = ("vocab/saturation_layer_mean", "vocab/exit_saving")

    def __init__(self, shape: ModelShape, context: AnalysisContext, position_stride: int = 8, table_values: int = 8,
                 top_k: int = 10, coherence_values: int = 64, exit_target_accuracy: float = 0.95,
                 saturated: float = 0.3, seed: int = 0):
        super().__init__(shape, context)
        self.position_stride, self.table_values, self.top_k = position_stride, table_values, top_k
        self.coherence_values, self.exit_target_accuracy, self.seed = coherence_values, exit_target_accuracy, seed
        self.saturated = saturated
        L = shape.n_layers
        g = torch.Generator().manual_seed(seed)
        self.sampled_values = torch.stack([torch.randperm(shape.d_mlp, generator=g)[:coherence_values]
                                           for _ in range(L)])
        for kind in SCORE_KINDS:  # sums of the max, mean and min score over positions (or events)
            self.add_state(f"{kind}_scores", torch.zeros(3, L, dtype=torch.float64), dist_reduce_fx="sum")
        for state in ("agree", "promotion_rate", "saturation_hist", "n_eliminated"):
            self.add_state(state, torch.zeros(L, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_positions", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("saving", default=[], dist_reduce_fx="cat")  # each position's oracle saving, and window
        self.add_state("saving_window", default=[], dist_reduce_fx="cat")
        # early exit per threshold, on [fit, held-out] windows: correct exits, layers saved, positions
        self.add_state("exit_correct", torch.zeros(2, len(THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exit_saved", torch.zeros(2, len(THRESHOLDS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exit_n", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")

    def hook_names(self) -> list[str]:
        L = self.shape.n_layers
        return [f"blocks.{l}.hook_resid_post" for l in range(L)] + [f"blocks.{l}.mlp.hook_post" for l in range(L)]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        view, L = self.view, self.shape.n_layers
        pos = torch.arange(self.position_stride - 1, tokens.shape[1], self.position_stride, device=tokens.device)
        window = windows.repeat_interleave(len(pos))  # each position's probe window
        E = view.output_embeddings.float()
        resid = [cache[f"blocks.{l}.hook_resid_post"][:, pos].flatten(0, 1).float() for l in range(L)]
        # each layer's logit lens [N, V]; the last layer's is the model's own output when that is fp32 (the same
        # product), recomputed in fp32 for a half-precision model, whose rounding would break ties differently
        lens = [view.unembed(view.final_norm(r)) for r in resid[:-1]]
        output = logits[:, pos].flatten(0, 1)
        lens.append(output if output.dtype == torch.float32 else view.unembed(view.final_norm(resid[-1])))
        tops = [z.max(-1) for z in lens]
        preds = torch.stack([t.indices for t in tops])  # [L, N]
        # each layer's top-1 probability; the last layer, the model's own output, exits at any threshold
        confidence = [(t.values - z.logsumexp(-1)).exp() for t, z in zip(tops[:-1], lens[:-1], strict=True)]
        confidence = torch.stack([*confidence, torch.ones_like(tops[-1].values)])
        final = preds[-1]
        eq = preds == final
        sat = L - eq.flip(0).int().cumprod(0).sum(0)  # first layer of the trailing run of agreement
        self.agree += eq.double().sum(1)
        self.saturation_hist += torch.bincount(sat, minlength=L)[:L].double()
        self.saving.append(1 - (sat + 1).double() / L)
        self.saving_window.append(window)
        self.n_positions += final.numel()
        self._early_exit(confidence, preds, final, window % 2)
        random_units = self._random_units(windows, len(pos))  # [L, N, TOP]
        for l in range(L):
            m = cache[f"blocks.{l}.mlp.hook_post"][:, pos].flatten(0, 1).float()  # [N, F]
            values = view.mlp_values(l).float()  # [F, d]
            bias = view.mlp_out_bias(l)
            ffn_out = m @ values + (bias.float() if bias is not None else 0)
            before = view.unembed(view.final_norm(resid[l] - ffn_out))  # [N, V] the distribution before the FFN
            candidate = before.argmax(-1)
            top = (m.abs() * values.norm(dim=-1)).topk(min(TOP, m.shape[1]), dim=-1).indices  # [N, 10] dominant
            scores = _scores(m, values, E[candidate], top)
            self._add("promotion", l, scores)
            self.promotion_rate[l] += (scores > 0).double().mean(-1).sum()
            self._add("random", l, _scores(m, values, E[candidate], random_units[l]))
            events = (sat == l).nonzero().flatten()
            if len(events):
                self._saturation(l, m[events], values, before[events], final[events], top[events],
                                 random_units[l][events])

    def _early_exit(self, confidence: torch.Tensor, preds: torch.Tensor, final: torch.Tensor,
                    split: torch.Tensor) -> None:
        L = self.shape.n_layers
        tau = torch.tensor(THRESHOLDS, device=confidence.device)
        reach = confidence[None] >= tau[:, None, None]  # [G, L, N]; every position reaches τ ≤ 1 at the last layer
        exit_layer = reach.int().argmax(dim=1)  # first layer that reaches τ: [G, N]
        correct = (preds.gather(0, exit_layer) == final).double()
        saved = 1 - (exit_layer + 1).double() / L
        for s in (0, 1):
            mine = split == s
            self.exit_correct[s] += correct[:, mine].sum(-1)
            self.exit_saved[s] += saved[:, mine].sum(-1)
            self.exit_n[s] += mine.sum()

    def _random_units(self, windows: torch.Tensor, per_window: int) -> torch.Tensor:
        """10 random units per layer and position, [L, N, 10], drawn from a generator seeded by the window."""
        L, F = self.shape.n_layers, self.shape.d_mlp
        draws = [torch.randint(F, (L, per_window, TOP), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + int(w))) for w in windows.tolist()]
        return torch.cat(draws, dim=1).to(windows.device)

    def _add(self, kind: str, layer: int, scores: torch.Tensor) -> None:
        """Sums over positions (or events) of the max, mean and min score of each row's sub-updates."""
        state = getattr(self, f"{kind}_scores")
        state[:, layer] += torch.stack([scores.amax(-1), scores.mean(-1), scores.amin(-1)]).double().sum(-1)

    def _saturation(self, l: int, m: torch.Tensor, values: torch.Tensor, before: torch.Tensor, promoted: torch.Tensor,
                    top: torch.Tensor, random_units: torch.Tensor) -> None:
        E = self.view.output_embeddings.float()
        self._add("promoted", l, _scores(m, values, E[promoted], top))
        self._add("promoted_random", l, _scores(m, values, E[promoted], random_units))
        above = before > before.gather(1, promoted[:, None])  # tokens ranked above the promoted one
        ranked = before.masked_fill(~above, float("-inf")).topk(min(TOP, before.shape[1]), dim=-1)
        valid = ranked.values > float("-inf")  # [n, k] the eliminated tokens of each event
        scores = m.gather(1, top)[:, None] * torch.einsum("nkd,ntd->nkt", E[ranked.indices], values[top])  # [n, k, 10]
        has = valid.any(-1)
        if has.any():
            per_token = torch.stack([scores.amax(-1), scores.mean(-1), scores.amin(-1)])  # [3, n, k]
            per_event = (per_token * valid).sum(-1) / valid.sum(-1).clamp_min(1)  # [3, n] mean over eliminated tokens
            self.eliminated_scores[:, l] += per_event[:, has].double().sum(-1)
            self.n_eliminated[l] += has.double().sum()

    def compute(self) -> Measurement:
        L, n = self.shape.n_layers, self.n_positions
        layers = torch.arange(L, dtype=torch.float64, device=self.saturation_hist.device)
        hist = self.saturation_hist
        out = {"vocab/saturation_layer_mean": (hist * layers).sum().item() / n.item(),
               "vocab/oracle_exit_saving": (hist * (1 - (layers + 1) / L)).sum().item() / n.item()}
        accuracy = self.exit_correct / self.exit_n[:, None].clamp_min(1)  # [2, G]
        saving = self.exit_saved / self.exit_n[:, None].clamp_min(1)
        chosen = int((accuracy[0] >= self.exit_target_accuracy).nonzero()[0])  # τ = 1 always qualifies
        out |= {"vocab/exit_threshold": THRESHOLDS[chosen], "vocab/exit_accuracy": accuracy[1, chosen].item(),
                "vocab/exit_saving": saving[1, chosen].item()}
        per = {"agree_final": self.agree / n, "promotion_rate": self.promotion_rate / n}
        counts = {"promotion": n, "random": n, "promoted": hist, "promoted_random": hist,
                  "eliminated": self.n_eliminated}
        for kind in SCORE_KINDS:
            c = counts[kind]
            mean = torch.where(c > 0, getattr(self, f"{kind}_scores") / c.clamp_min(1), torch.nan)
            per |= {f"{kind}_{stat}": mean[i] for i, stat in enumerate(("max", "mean", "min"))}
        for key, vals in per.items():
            out |= {f"vocab/{key}/L{l}": v for l, v in enumerate(vals.tolist())}
        del out[f"vocab/agree_final/L{L - 1}"]  # the last layer agrees with itself
        unit_rows = torch.nn.functional.normalize(self.view.output_embeddings.float(), dim=-1)
        for l in range(L):
            out[f"vocab/value_coherence/L{l}"], out[f"vocab/random_coherence/L{l}"] = self._coherence(l, unit_rows)
        rows = []
        for l in range(L):
            units = self.sampled_values[l][:self.table_values]
            for unit, ids in zip(units.tolist(), self.value_top_tokens(l, units, self.top_k).tolist(), strict=True):
                rows.append([l, unit, " | ".join(self.context.decode(ids))])
        tables = {"vocab/value_top_tokens": Table(["layer", "unit", "top tokens of E·v"], rows),
                  "vocab/saturation_hist": Table(["layer", "fraction of positions"],
                                                 [[l, f] for l, f in enumerate((hist / n).tolist())]),
                  "vocab/exit_curve": Table(["threshold", "fit accuracy", "held-out accuracy", "held-out saving"],
                                            [[t, *vals] for t, vals in zip(THRESHOLDS, torch.stack(
                                                [accuracy[0], accuracy[1], saving[1]], 1).tolist(), strict=True)])}
        saving, window = dim_zero_cat(self.saving), dim_zero_cat(self.saving_window)
        ids, position_window = torch.unique(window, return_inverse=True)
        w = resample_counts(len(ids)).to(saving.device)[:, position_window]
        replicates = {"vocab/oracle_exit_saving": (w @ saving / w.sum(1)).tolist()}
        return Measurement(out, tables=tables, replicates=replicates)

    def events(self) -> list[Event]:
        """Saturation: from then on, an oracle exiting at the saturation layer saves at least `saturated` (0.3) of
        the layers (≈ 0.1 at initialisation). Resampled: the probe windows of the positions."""
        return [Event("vocab/saturation", lambda values, previous: values["vocab/oracle_exit_saving"] >= self.saturated,
                      resampled="the probe windows of the positions", shown="vocab/oracle_exit_saving",
                      threshold=self.saturated)]

    def value_top_tokens(self, layer: int, units: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k token ids of E·v_i for each unit i: [len(units), k]."""
        return self._top_tokens(self.view.mlp_values(layer).float()[units], k)

    def _top_tokens(self, vectors: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k token ids of the raw vocabulary projection E·v of each vector: [n, k]."""
        return (vectors @ self.view.output_embeddings.float().T).topk(k, dim=-1).indices

    def _coherence(self, layer: int, E: torch.Tensor) -> tuple[float, float]:
        """Coherence of the layer's sampled values and of matched Gaussian vectors; E: the unit-norm rows of the
        unembedding."""
        values = self.view.mlp_values(layer).float()
        g = torch.Generator().manual_seed(self.seed + layer)
        noise = torch.randn(len(self.sampled_values[layer]), values.shape[1], generator=g).to(values.device)
        random = values.mean(0) + noise * values.std(0)

        def coherence(vectors: torch.Tensor) -> float:
            emb = E[self._top_tokens(vectors, self.top_k)]  # [n, k, d]
            sims = emb @ emb.transpose(1, 2)  # [n, k, k]
            off = ~torch.eye(self.top_k, dtype=torch.bool, device=sims.device)
            return sims[:, off].mean().item()

        return coherence(values[self.sampled_values[layer].to(values.device)]), coherence(random)

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        history = plot.history

        def scores(ax) -> bool:
            layers = list(range(plot.n_layers))
            drawn = False
            for key, label, style in (("promoted_max", "promoted token, max", "-o"),
                                      ("eliminated_max", "eliminated tokens, max", "-s"),
                                      ("eliminated_mean", "eliminated tokens, mean", ":s"),
                                      ("promoted_random_max", "10 random sub-updates, max (same events)", "--x")):
                ys = [history.last(f"vocab/{key}/L{l}") for l in layers]
                if any(finite(y) for y in ys):
                    ax.plot(layers, ys, style, label=label)
                    drawn = True
            ax.axhline(0, color="gray", linewidth=0.5)
            ax.set(xlabel="layer", ylabel="e_w · m_i v_i")
            ax.set_xticks(layers)
            ax.set_title(f"dominant sub-updates at saturation events (step {history.rows[-1]['step']:.0f})",
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            return drawn

        def exits(ax) -> bool:
            return plot.curves(ax, {"accuracy (held-out)": "vocab/exit_accuracy",
                                    "layers saved (held-out)": "vocab/exit_saving",
                                    "layers saved by an oracle": "vocab/oracle_exit_saving"},
                               "early exit: predictive rule vs oracle", "fraction")

        return [fig for fig in [plot.row([scores, exits])] if fig is not None]


def _scores(m: torch.Tensor, values: torch.Tensor, e: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """e_w · (m_i v_i) for each position's reference row e [N, d] and units [N, k]."""
    return m.gather(1, units) * torch.einsum("nd,nkd->nk", e, values[units])
