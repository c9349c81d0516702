"""`outliers`: last-layer outlier dimensions (ODs) and how they push frequent tokens.

Macocco et al. 2025, "Outlier dimensions favor frequent tokens in language models" (definitions of
the authors' code, `imacocco/llms_outlier_dimensions`). The vector is the last-layer state after the
final norm (`ln_final.hook_normalized`, the input of the unembedding) at every probe position except
the first `skip_positions` (default 16: massive activations there inflate the threshold) and the
last (it has no next token). With H the gathered [N, d] vectors:

    T   = 99th percentile of |H| over all N·d entries (exact, by top-k)
    m_d = median over positions of |H[:, d]|
    ODs = {d : m_d > T}, sorted by m_d

Keys: `outliers/count`, `outliers/score_max` (max m_d / T: > 1 iff there is an OD), `outliers/robust_z_max`
(max of (m_d − median m) / (1.4826·MAD m): the count is capped at 2% of d and ODs raise T themselves,
so this robust score still ranks planted dimensions first where the rule's count masks them),
`outliers/jaccard_prev` (OD sets of this and the previous checkpoint), the table `outliers/dims`.

Ablation on the probe positions (zero-ablation after the final norm, no renormalisation, fp32):
for S = the ODs and for 5 random equal-size sets of non-OD dimensions (fixed seed), the logits
z − H[:, S]·E[:, S]ᵀ (E the unembedding [V, d]) against the full logits z: `outliers/ablate_kl` and `outliers/random_kl`
(mean KL(full ‖ ablated)), `outliers/ablate_acc_drop` and `outliers/random_acc_drop` (next-token
accuracy, full minus ablated), `outliers/ablate_entropy` and `outliers/full_entropy`,
`outliers/ablate_n_distinct` and `outliers/full_n_distinct` (distinct top-1 tokens), the frequency
heuristic for the full and the OD-ablated head: `..._spearman` and `..._loglog_slope` (how often a token
is predicted against its corpus frequency, over predicted tokens seen in the corpus), and
`outliers/ablate_mean_logfreq_drop` (mean log corpus frequency of the top-1 token, full minus ablated:
positive when the ODs favour frequent tokens). Without ODs the ablation keys are absent.

Parameter diagnostics: `outliers/gain_z_mean` (z-score of the final-norm gain γ at the ODs),
`outliers/svd_spike_overlap` (ODs among the 3σ spikes of the top 4 left singular vectors of the last
MLP's output weight) with `outliers/svd_spike_pvalue` (1000 random placements of an OD-sized set).

Emergence: `outliers/emergence_step` in the summary is the first checkpoint from which count ≥ 1 has
held at every later checkpoint so far; it is revised (and the revision printed) when a later
checkpoint has none.

Departures: the paper uses one position per passage (the 100th word) and scores whole words; we use
next tokens at many positions, so accuracies are not comparable with the paper's (spec pitfall 13).
The robust z-score is ours (the paper's z-score definition was not retrievable).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Result, Table, onset, onset_summary
from dynascope.analysis.view import Cache, ModelShape, ModelView

N_RANDOM = 5


def outlier_dims(h: torch.Tensor, q: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's rule on [N, d] vectors: (OD indices sorted by median, medians m [d], threshold T)."""
    a = h.abs().float()
    k = max(1, int(round((1 - q) * a.numel())))
    T = a.flatten().topk(k).values.min()  # torch.quantile refuses more than 2**24 elements
    med = a.median(dim=0).values
    ods = torch.nonzero(med > T).flatten()
    return ods[med[ods].argsort(descending=True)], med, T


def robust_z(x: torch.Tensor) -> torch.Tensor:
    mad = (x - x.median()).abs().median()
    return (x - x.median()) / (1.4826 * mad).clamp_min(1e-12)


def rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) < 3:
        return float("nan")
    return torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1].item()


def ablation_metrics(view: ModelView, h: torch.Tensor, gold: torch.Tensor | None, removed: list[torch.Tensor],
                     counts: torch.Tensor | None = None, chunk: int = 1024) -> list[dict[str, Any]]:
    """For each set S of dimensions in `removed` (an empty set is the full head): the head's predictions
    from h with S zero-ablated, z − h[:, S]·E[:, S]ᵀ, against the full logits z, computed once per chunk."""
    W = view.output_embeddings.float()
    sums = [{"kl": 0.0, "entropy": 0.0, "correct": 0.0} for _ in removed]
    top1: list[list[torch.Tensor]] = [[] for _ in removed]
    for i in range(0, len(h), chunk):
        hc = h[i:i + chunk].float()
        z = view.unembed(hc)
        lp = z.log_softmax(-1)
        for S, acc, tops in zip(removed, sums, top1, strict=True):
            lq = (z - hc[:, S] @ W[:, S].T).log_softmax(-1)
            acc["kl"] += (lp.exp() * (lp - lq)).sum().item()
            acc["entropy"] += -(lq.exp() * lq).sum().item()
            t = lq.argmax(-1)
            if gold is not None:
                acc["correct"] += (t == gold[i:i + chunk]).sum().item()
            tops.append(t)
    return [_prediction_stats(acc, torch.cat(tops), len(h), counts) for acc, tops in zip(sums, top1, strict=True)]


def _prediction_stats(sums: dict[str, float], top1: torch.Tensor, n: int,
                      counts: torch.Tensor | None) -> dict[str, Any]:
    out = {"kl": sums["kl"] / n, "entropy": sums["entropy"] / n, "acc": sums["correct"] / n,
           "n_distinct": float(top1.unique().numel())}
    if counts is not None:
        freq = counts.double() / counts.sum()
        pred = torch.bincount(top1, minlength=len(freq))[:len(freq)].double() / n
        seen = (pred > 0) & (freq > 0)
        lp_, lf = pred[seen].log(), freq[seen].log()
        out["spearman"] = spearman(pred[seen], freq[seen])
        enough = seen.sum() > 2
        out["loglog_slope"] = (torch.cov(torch.stack([lf, lp_]))[0, 1] / lf.var()).item() if enough else float("nan")
        valid = top1 < len(freq)
        out["mean_logfreq"] = freq[top1[valid]].clamp_min(1e-12).log().mean().item()
    return out


class Outliers(Analysis):
    name = "outliers"
    headline = "outliers/score_max"
    carry = ("prev_ods", "emergence")

    def __init__(self, shape: ModelShape, context: AnalysisContext, skip_positions: int = 16, seed: int = 0):
        super().__init__(shape, context)
        self.skip_positions, self.seed = skip_positions, seed
        self.add_state("h", default=[], dist_reduce_fx="cat")
        self.add_state("gold", default=[], dist_reduce_fx="cat")
        self.prev_ods: list[int] | None = None
        self.emergence: list = []  # onset revisions of "≥ 1 OD"

    def hook_names(self) -> list[str]:
        return ["ln_final.hook_normalized"]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        start = min(self.skip_positions, tokens.shape[1] - 2)
        self.h.append(cache["ln_final.hook_normalized"][:, start:-1].flatten(0, 1).float())
        self.gold.append(tokens[:, start + 1:].flatten())

    def compute(self) -> Result:
        h, gold = dim_zero_cat(self.h), dim_zero_cat(self.gold)
        ods, med, T = outlier_dims(h)
        d = h.shape[1]
        z = robust_z(med)
        od_list = ods.tolist()
        out = {"outliers/count": float(len(ods)), "outliers/score_max": (med / T).max().item(),
               "outliers/robust_z_max": z.max().item(), "outliers/threshold": T.item()}
        if self.prev_ods is not None:
            union = set(self.prev_ods) | set(od_list)
            out["outliers/jaccard_prev"] = len(set(self.prev_ods) & set(od_list)) / len(union) if union else 1.0
        if len(ods):
            out |= self._ablations(h, gold, ods, d) | self._parameter_diagnostics(ods, d)
        emergence = onset(self.emergence, len(ods) > 0, self.step)
        return Result(out, tables={"outliers/dims": Table(["rank", "dimension"], [[i, dim] for i, dim in
                                                                                   enumerate(od_list)])},
                      summary=onset_summary("outliers/emergence_step", emergence),
                      carry={"prev_ods": od_list, "emergence": emergence})

    def _ablations(self, h: torch.Tensor, gold: torch.Tensor, ods: torch.Tensor, d: int) -> dict[str, float]:
        counts = self.context.counts
        counts = None if counts is None else counts.to(h.device)
        others = np.setdiff1d(np.arange(d), ods.cpu().numpy())
        rng = np.random.default_rng(self.seed)
        random_sets = [torch.as_tensor(rng.choice(others, size=min(len(ods), len(others)), replace=False),
                                       device=h.device) for _ in range(N_RANDOM)]
        full, ablated, *randoms = ablation_metrics(self.view, h, gold, [ods[:0], ods, *random_sets], counts)
        out = {"outliers/ablate_kl": ablated["kl"], "outliers/random_kl": float(np.mean([r["kl"] for r in randoms])),
               "outliers/ablate_acc_drop": full["acc"] - ablated["acc"],
               "outliers/random_acc_drop": full["acc"] - float(np.mean([r["acc"] for r in randoms])),
               "outliers/full_entropy": full["entropy"], "outliers/ablate_entropy": ablated["entropy"],
               "outliers/full_n_distinct": full["n_distinct"], "outliers/ablate_n_distinct": ablated["n_distinct"]}
        if counts is not None:
            for name, m in (("full", full), ("ablate", ablated)):
                out[f"outliers/{name}_spearman"] = m["spearman"]
                out[f"outliers/{name}_loglog_slope"] = m["loglog_slope"]
            out["outliers/ablate_mean_logfreq_drop"] = full["mean_logfreq"] - ablated["mean_logfreq"]
        return out

    def _parameter_diagnostics(self, ods: torch.Tensor, d: int) -> dict[str, float]:
        gain = self.view.final_norm_gain().detach().float()
        out = {"outliers/gain_z_mean": ((gain[ods] - gain.mean()) / gain.std()).mean().item()}
        w_down = self.view.mlp_values(self.shape.n_layers - 1).detach().float().T  # [d, d_mlp]
        U = torch.linalg.svd(w_down, full_matrices=False).U[:, :4]  # top left singular vectors
        spikes = ((U - U.mean(0)).abs() > 3 * U.std(0)).any(dim=1)  # [d]
        overlap = spikes[ods].sum().item()
        g = torch.Generator().manual_seed(self.seed)
        placements = torch.stack([torch.randperm(d, generator=g)[:len(ods)] for _ in range(1000)])
        random_overlap = spikes.cpu()[placements].sum(-1)  # random OD-sized sets against the spikes
        out["outliers/svd_spike_overlap"] = float(overlap)
        out["outliers/svd_spike_pvalue"] = (random_overlap >= overlap).double().mean().item()
        return out
