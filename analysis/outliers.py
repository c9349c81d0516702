"""`outliers`: last-layer outlier dimensions (ODs) and how they push frequent tokens.

Macocco et al. 2025, "Outlier dimensions favor frequent tokens in language models" (definitions of
the authors' code, `imacocco/llms_outlier_dimensions`). The vector is the last-layer state after the
final norm (`ln_final.hook_normalized`, the input of the unembedding) at every *deep* probe position:
one with more than `skip_positions` (default 16) tokens of its own document before it in the window,
so neither a window's first positions nor the positions just after an end-of-document token inside
a window (massive activations there inflate the threshold), and not a window's last position (it has
no next token). With H the gathered [N, d] vectors:

    T   = 99th percentile of |H| over all N·d entries (exact, by top-k)
    m_d = median over positions of |H[:, d]|
    ODs = {d : m_d > T}, sorted by m_d

Keys: `outliers/count`, `outliers/score_max` (max m_d / T: > 1 iff there is an OD), `outliers/robust_z_max`
(max of (m_d − median m) / (1.4826·MAD m): the count is capped at 2% of d and ODs raise T themselves,
so this robust score still ranks planted dimensions first where the rule's count masks them),
`outliers/threshold` (T), `outliers/jaccard_prev` (OD sets of this and the previous checkpoint), the
tables `outliers/dims` (the ODs) and `outliers/medians` (the 32 largest m_d / T with their dimension).

The head's predictions (fp32, zero-ablation after the final norm, no renormalisation): for a set S
of removed dimensions the logits are z − H[:, S]·E[:, S]ᵀ (E the unembedding [V, d], z the full
logits). Conditions: `full` (nothing removed; logged at every checkpoint, a baseline before ODs
emerge; read off the forward pass's own distribution), `ablate` (S = the ODs), `only_od` (S = every
other dimension: the ODs alone), and the authors' two controls, each over 5 random sets of the ODs' size
drawn (fixed seed) from the dimensions that are neither ODs nor outlier dimensions of the unembedding
itself (the same rule on E, medians over the vocabulary: the authors' `rd_out`): `random` (a set ablated)
and `only_random` (a set kept alone), averaged over the sets, on a seeded subsample of at most
`control_positions` (512) positions: on the demo's OD checkpoints this moves `random_kl` by at most 4%
(2.7e-4 against 2.6e-4 at step 2) and `random_acc_drop`, a difference of accuracies near 0, by at most
0.002. KL(full ‖ condition) is computed without normalising the ablated distribution (Σ p·log p − p·z_S +
logsumexp z_S), its entropy only where it is logged. Per condition:

- `_kl` (mean KL(full ‖ condition)), `_entropy`, `_n_distinct` (distinct top-1 tokens),
  `acc_drop` (next-token accuracy, full minus condition: `ablate_acc_drop`, `random_acc_drop`);
- the frequency heuristic, over the tokens predicted at least once and seen in the corpus:
  `_slope` (the authors' `lin_coeff`: OLS slope of the prediction frequency on the corpus frequency,
  raw, unlogged; dominated by the most frequent tokens), `_loglog_slope` (the same on logs),
  `_spearman` (ties get their average rank), `_mean_logfreq` (mean log corpus frequency of the top-1
  token) and `_top10_share` (share of top-1 predictions among the corpus's 10 most frequent tokens:
  near 1 when predictions collapse onto them, as the paper reports for the ODs alone);
- `outliers/ablate_mean_logfreq_drop`: full minus ablated `_mean_logfreq` (positive when the ODs
  favour frequent tokens);
- the baselines of the ODs alone: `outliers/only_random_kl`, `_mean_logfreq`, `_top10_share`;
- table `outliers/prediction_frequency`: per token (the 1,000 predicted most often), its corpus
  frequency and its share of top-1 predictions under `full`, ablated and ODs only (paper A's figure).

The frequency keys need the corpus counts; the ablation conditions need ODs. The only-OD head's top-1
statistics that describe a distribution of predictions (`only_od_n_distinct`, `_slope`, `_loglog_slope`,
`_spearman`) need two ODs: from one dimension d the top-1 is the token with the largest or the smallest
E[w, d], so `n_distinct` ≤ 2 and the slope and rank correlation are undefined by construction. Slopes and
rank correlations are absent whenever fewer than 3 tokens are predicted.

Parameter diagnostics (the authors' notebook): `outliers/gain_z_mean` and `outliers/bias_z_mean` (mean
z-score of the final norm's γ and β at the ODs; β where the norm has one), `outliers/gain_spike_overlap`,
`outliers/bias_spike_overlap` (ODs among the 3σ spikes of γ, of β) and `outliers/svd_spike_overlap` (ODs
among the 3σ spikes of the top 15 left singular vectors of the last MLP's down-projection), each with a
`_pvalue`: the share of 1,000 random placements of an OD-sized set that meet at least as many spikes.

Emergence, the onset `outliers/emergence` (`analysis/onsets.py`): score_max > 1 at every checkpoint from
then on. Guard: `outliers/h_varying_share`, the share of Σ‖h‖² that varies across positions; below
`min_varying_share` (0.5) the state is near-constant, the rule would find ODs by construction, the OD set
is left empty and the checkpoint counts as guarded, not as a judgement.

Departures: the paper uses one position per passage (the 100th word) and scores whole words; we use
next tokens at many deep positions, so accuracies are not comparable with the paper's (spec pitfall
13). The robust z-score and `_top10_share` are ours (the paper's z-score definition was not
retrievable; its "collapse onto frequent tokens" is read off plots). The authors' `ablate_out` /
`only_out` conditions (the unembedding's outlier dimensions ablated, kept alone) are not measured.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import LOGSUMEXP, PROBS, TOP1, Analysis, AnalysisContext, Measurement, Table
from dynascope.analysis.figures import Panel, RunPlot, finite, time_colors
from dynascope.analysis.onsets import Event, resample_counts, sorted_weighted_quantile
from dynascope.analysis.view import Cache, ModelShape, ModelView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

N_RANDOM = 5
SINGULAR_VECTORS = 15  # the authors' notebook
SHAPE_OF_TOP1 = ("n_distinct", "slope", "loglog_slope", "spearman")  # of the only-OD head: need two ODs
FREQUENCY_TOKENS = 1000  # tokens kept in the `outliers/prediction_frequency` table, the most predicted first
N_MEDIANS = 32  # sorted medians kept in the `outliers/medians` table
CANDIDATES = 8  # dimensions whose medians the bootstrap replicates recompute


def outlier_dims(h: torch.Tensor, q: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's rule on [N, d] vectors: (OD indices sorted by median, medians m [d], threshold T)."""
    a = h.abs().float()
    k = max(1, int(round((1 - q) * a.numel())))
    T = a.flatten().topk(k).values.min()  # torch.quantile refuses more than 2**24 elements
    med = a.median(dim=0).values
    ods = torch.nonzero(med > T).flatten()
    return ods[med[ods].argsort(descending=True)], med, T


def unembedding_outlier_dims(E: torch.Tensor) -> torch.Tensor:
    """The unembedding's own outlier dimensions (the authors' `rd_out`): the rule on E [V, d], medians over the
    vocabulary."""
    return outlier_dims(E.detach())[0]


def control_dims(d: int, ods: torch.Tensor, unembedding_ods: torch.Tensor) -> torch.Tensor:
    """The dimensions random control sets are drawn from: neither ODs nor outlier dimensions of the unembedding."""
    excluded = torch.zeros(d, dtype=torch.bool)
    excluded[ods.cpu()] = True
    excluded[unembedding_ods.cpu()] = True
    return torch.nonzero(~excluded).flatten()


def spike_overlap(values: torch.Tensor, ods: torch.Tensor, placements: torch.Tensor) -> tuple[float, float]:
    """ODs among the 3σ spikes of `values` ([d], or [d, k]: a spike in any column), and the permutation p-value:
    the share of random OD-sized `placements` [P, |ODs|] meeting at least as many spikes."""
    v = values.detach().float().reshape(len(values), -1).cpu()
    spikes = ((v - v.mean(0)).abs() > 3 * v.std(0)).any(dim=1)
    overlap = spikes[ods.cpu()].sum().item()
    return float(overlap), (spikes[placements].sum(-1) >= overlap).double().mean().item()


def deep_positions(tokens: torch.Tensor, skip: int, eos_id: int | None, need_next: bool = True,
                   stride: int = 1) -> torch.Tensor:
    """[B, T] mask of the positions with more than `skip` tokens of their own document before them in
    the window (an end-of-document token closes its document: it and the `skip` positions after it are
    left out), and, with `need_next`, not the last position; with `stride`, only every stride-th
    position from `skip` on. In windows shorter than `skip`, the last eligible position counts as deep."""
    T = tokens.shape[1]
    skip = min(skip, T - 1 - int(need_next))
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    boundary = tokens == eos_id if eos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
    last_eos = torch.where(boundary, pos, -1).cummax(dim=1).values  # the latest end-of-document at or before p
    context = torch.where(last_eos >= 0, pos - last_eos, pos + 1)  # tokens of p's document up to p
    keep = (context > skip) & ((pos - skip) % stride == 0)
    if need_next:
        keep[:, -1] = False
    return keep


def varying_share(h: torch.Tensor) -> float:
    """The share of Σ‖h‖² that varies across positions: Σ‖h − h̄‖² / Σ‖h‖² (0 for a constant state)."""
    h = h.double()
    return (1 - h.sum(0).square().sum() / (len(h) * h.square().sum())).item()


def resampled_scores(h: torch.Tensor, window: torch.Tensor, candidates: torch.Tensor,
                     chunk: int = 50) -> dict[str, list[float]]:
    """`outliers/score_max` and `outliers/h_varying_share` on each bootstrap replicate of the probe windows: T
    from the top 2% of |h|'s entries (the 99th percentile of a replicate lies among them), the medians of the
    `candidates` (the dimensions with the largest median / T)."""
    ids, position_window = torch.unique(window, return_inverse=True)
    counts = resample_counts(len(ids)).to(h.device)  # [R, windows]: a position weighs its window's count
    a, hd = h.abs().double(), h.double()
    top = a.flatten().topk(max(1, math.ceil(0.02 * a.numel())))
    top_windows = position_window[top.indices // a.shape[1]]
    columns = [a[:, c].sort() for c in candidates.tolist()]  # sorted once, weighed anew by each replicate

    def per_window(x: torch.Tensor) -> torch.Tensor:  # sums over each window's positions, which counts weigh
        return torch.zeros(len(ids), *x.shape[1:], dtype=torch.float64, device=h.device).index_add_(
            0, position_window, x)

    n, s1, s2 = per_window(torch.ones_like(hd[:, 0])), per_window(hd), per_window(hd.square().sum(1))
    score, share = [], []
    for i in range(0, len(counts), chunk):
        w = counts[i:i + chunk]
        total = w @ n  # [b] positions in each replicate
        # T: the value at which the weight counted from the top reaches 1% of all entries' weight
        from_top = w[:, top_windows].cumsum(1)
        k = torch.searchsorted(from_top, 0.01 * a.shape[1] * total[:, None]).clamp_max(len(top_windows) - 1)
        T = top.values[k.squeeze(1)]
        medians = torch.stack([sorted_weighted_quantile(c.values, w[:, position_window[c.indices]], 0.5)
                               for c in columns], 1)
        score += (medians.amax(1) / T).tolist()
        share += (1 - (w @ s1).square().sum(1) / (total * (w @ s2))).tolist()
    return {"outliers/score_max": score, "outliers/h_varying_share": share}


def robust_z(x: torch.Tensor) -> torch.Tensor:
    mad = (x - x.median()).abs().median()
    return (x - x.median()) / (1.4826 * mad).clamp_min(1e-12)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    values, order = x.sort()
    _, group, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = (ends - (counts.double() - 1) / 2)[group]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) < 3:
        return float("nan")
    return torch.corrcoef(torch.stack([average_ranks(x), average_ranks(y)]))[0, 1].item()


def ablation_metrics(view: ModelView, h: torch.Tensor, gold: torch.Tensor | None, removed: dict[str, torch.Tensor],
                     entropy: set[str] = frozenset(), chunk: int = 1024) -> dict[str, dict[str, Any]]:
    """For each set S of dimensions in `removed` ({condition: S}): the head's predictions from h [n, d] with S
    zero-ablated, z_S = z − h[:, S]·E[:, S]ᵀ, against the full logits z, computed once per chunk. No ablated
    distribution is normalised: KL(full ‖ ablated) = Σ p·log p − p·z_S + logsumexp(z_S), with p·z_S = p·z −
    Σ_{j∈S} h_j (p·E)_j; its entropy, logsumexp(z_S) − q·z_S, only for the conditions in `entropy`.
    Per condition: kl, acc and the top-1 tokens (and entropy), as sums over the positions."""
    W = view.output_embeddings.float()
    sums = {name: {"kl": 0.0, "entropy": 0.0, "correct": 0.0, "top1": []} for name in removed}
    for i in range(0, len(h), chunk):
        hc = h[i:i + chunk].float()
        z = view.unembed(hc)
        lp = z.log_softmax(-1)
        p = lp.exp()
        plp, pz, pW = (p * lp).sum(-1), (p * z).sum(-1), p @ W
        for name, S in removed.items():
            zs = _ablated(view, z, hc, W, S)
            lse = zs.logsumexp(-1)
            acc = sums[name]
            acc["kl"] += (plp - pz + (hc[:, S] * pW[:, S]).sum(-1) + lse).sum().item()
            if name in entropy:
                acc["entropy"] += (lse - ((zs - lse[:, None]).exp() * zs).sum(-1)).sum().item()
            top1 = zs.argmax(-1)
            if gold is not None:
                acc["correct"] += (top1 == gold[i:i + chunk]).sum().item()
            acc["top1"].append(top1)
    return {name: {**acc, "top1": torch.cat(acc["top1"])} for name, acc in sums.items()}


def _ablated(view: ModelView, z: torch.Tensor, h: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The logits z of h with the dimensions S zeroed, through whichever is the smaller product: the
    removed dimensions' (subtracted from z) or the kept ones'."""
    if 2 * len(S) <= h.shape[1]:
        return z - h[:, S] @ W[:, S].T
    kept = complement(S, h.shape[1])
    logits = h[:, kept] @ W[:, kept].T
    return logits if view.output_bias is None else logits + view.output_bias.float()


def prediction_stats(sums: dict[str, Any], n: int, counts: torch.Tensor | None) -> dict[str, Any]:
    """A condition's means over its n positions (kl, entropy, acc), its distinct top-1 tokens and, with the corpus
    counts, the frequency heuristic of its top-1 predictions."""
    top1 = sums["top1"]
    out = {"kl": sums["kl"] / n, "entropy": sums["entropy"] / n, "acc": sums["correct"] / n,
           "n_distinct": float(top1.unique().numel())}
    if counts is not None:
        freq = counts.double() / counts.sum()
        pred = torch.bincount(top1, minlength=len(freq))[:len(freq)].double() / n
        seen = (pred > 0) & (freq > 0)
        f, p = freq[seen], pred[seen]
        if int(seen.sum()) > 2:  # a slope and a rank correlation need three tokens
            out["spearman"] = spearman(p, f)
            out["slope"] = (torch.cov(torch.stack([f, p]))[0, 1] / f.var()).item()
            out["loglog_slope"] = (torch.cov(torch.stack([f.log(), p.log()]))[0, 1] / f.log().var()).item()
        valid = top1 < len(freq)
        out["mean_logfreq"] = freq[top1[valid]].clamp_min(1e-12).log().mean().item()
        out["top10_share"] = torch.isin(top1, freq.topk(min(10, len(freq))).indices).double().mean().item()
    return out


def complement(S: torch.Tensor, d: int) -> torch.Tensor:
    """The dimensions of 0 … d − 1 not in S."""
    kept = torch.ones(d, dtype=torch.bool, device=S.device)
    kept[S] = False
    return torch.nonzero(kept).flatten()


def prediction_frequency(top1: dict[str, torch.Tensor], counts: torch.Tensor) -> Table:
    """How often each token is the top-1 prediction under each condition ({label: top-1 tokens}), beside its
    corpus frequency: the `FREQUENCY_TOKENS` tokens predicted most often over all conditions, seen in the corpus."""
    V = len(counts)
    freq = counts.double() / counts.sum()
    preds = torch.stack([torch.bincount(t[t < V], minlength=V)[:V].double() / len(t) for t in top1.values()])
    ids = torch.nonzero((preds.sum(0) > 0) & (freq > 0)).flatten()
    ids = ids[preds[:, ids].sum(0).argsort(descending=True)[:FREQUENCY_TOKENS]]
    rows = torch.cat([ids[:, None].double(), freq[ids, None], preds[:, ids].T], 1).tolist()
    return Table(["token", "corpus frequency", *top1], [[int(r[0]), *r[1:]] for r in rows])


class Outliers(Analysis):
    name = "outliers"
    headline = "outliers/score_max"
    carry = ("prev_ods",)
    title = "Outlier dimensions"
    paper = "Macocco et al. 2025"
    paper_url = "https://arxiv.org/abs/2503.21718"
    signature = "last-layer outlier dimensions emerge (an OD score above 1)"
    signature_event = "outliers/emergence"
    expectation = ("Last-layer dimensions whose median |h_d| exceeds the 99th percentile of all |h| (the threshold). "
                   "Expect none early, then a few after warmup; ablating them should cost far more than ablating "
                   "random dimensions, and push predictions away from frequent tokens.")
    compare_keys = ("outliers/count", "outliers/score_max")
    reference_lines = {"outliers/score_max": 1.0}  # > 1: an OD

    def __init__(self, shape: ModelShape, context: AnalysisContext, skip_positions: int = 16,
                 control_positions: int = 512, min_varying_share: float = 0.5, seed: int = 0):
        super().__init__(shape, context)
        self.skip_positions, self.control_positions, self.seed = skip_positions, control_positions, seed
        self.min_varying_share = min_varying_share
        self.add_state("h", default=[], dist_reduce_fx="cat")
        self.add_state("gold", default=[], dist_reduce_fx="cat")
        self.add_state("window", default=[], dist_reduce_fx="cat")  # each position's probe window
        # the full head at the same positions, from the forward pass's distribution
        self.add_state("top1", default=[], dist_reduce_fx="cat")
        self.add_state("entropy_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.prev_ods: list[int] | None = None

    def hook_names(self) -> list[str]:
        return ["ln_final.hook_normalized", PROBS, LOGSUMEXP, TOP1]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        keep = deep_positions(tokens, self.skip_positions, self.context.eos_id)
        gold, top1 = tokens.roll(-1, dims=1)[keep], cache[TOP1][keep]
        self.h.append(cache["ln_final.hook_normalized"][keep].float())
        self.gold.append(gold)
        self.window.append(windows[:, None].expand_as(keep)[keep])
        self.top1.append(top1)
        mean_logit = torch.einsum("btv,btv->bt", cache[PROBS], logits.float())  # Σ p·z: a batched dot, no [B, T, V]
        self.entropy_sum += (cache[LOGSUMEXP] - mean_logit)[keep].sum().double()  # H = logsumexp − Σ p·z
        self.correct += (top1 == gold).sum()

    def compute(self) -> Measurement:
        h, gold, window = dim_zero_cat(self.h), dim_zero_cat(self.gold), dim_zero_cat(self.window)
        ods, med, T = outlier_dims(h)
        share = varying_share(h)
        if share < self.min_varying_share:  # a near-constant state: the rule would find ODs by construction
            ods = ods[:0]
        d = h.shape[1]
        od_list = ods.tolist()
        out = {"outliers/count": float(len(ods)), "outliers/score_max": (med / T).max().item(),
               "outliers/robust_z_max": robust_z(med).max().item(), "outliers/threshold": T.item(),
               "outliers/h_varying_share": share}
        if self.prev_ods is not None:
            union = set(self.prev_ods) | set(od_list)
            out["outliers/jaccard_prev"] = len(set(self.prev_ods) & set(od_list)) / len(union) if union else 1.0
        predictions, tables = self._predictions(h, gold, ods, d)
        out |= predictions
        if len(ods):
            out |= self._parameter_diagnostics(ods, d)
        top = (med / T).topk(min(N_MEDIANS, d))
        tables |= {"outliers/dims": Table(["rank", "dimension"], [[i, dim] for i, dim in enumerate(od_list)]),
                  "outliers/medians": Table(["rank", "dimension", "median / threshold"],
                                            [[i, dim, v] for i, (dim, v) in
                                             enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True))])}
        return Measurement(out, tables, carry={"prev_ods": od_list},
                           replicates=resampled_scores(h, window, top.indices[:CANDIDATES]))

    def events(self) -> list[Event]:
        return [Event("outliers/emergence", lambda values, previous: values["outliers/score_max"] > 1,
                      guard=lambda values: values["outliers/h_varying_share"] >= self.min_varying_share,
                      resampled="the probe windows: the medians of the 8 dimensions with the largest median / T, "
                                "T itself, and the varying share of the last-layer state",
                      shown="outliers/score_max", threshold=1.0)]

    def _predictions(self, h: torch.Tensor, gold: torch.Tensor, ods: torch.Tensor,
                     d: int) -> tuple[dict[str, float], dict[str, Table]]:
        """The full head, and with ODs the ablated conditions, their random controls and the table of how often
        each token is predicted under each."""
        counts = self.context.counts
        counts = None if counts is None else counts.to(h.device)
        full = {"kl": 0.0, "entropy": self.entropy_sum.item(), "correct": self.correct.item(),
                "top1": dim_zero_cat(self.top1)}
        stats = {"full": prediction_stats(full, len(h), counts)}
        out: dict[str, float] = {}
        tables: dict[str, Table] = {}
        if len(ods):
            conditions = {"ablate": ods, "only_od": complement(ods, d)}  # the dimensions each removes
            sums = ablation_metrics(self.view, h, gold, conditions, entropy=set(conditions))
            stats |= {name: prediction_stats(acc, len(h), counts) for name, acc in sums.items()}
            eligible = control_dims(d, ods, unembedding_outlier_dims(self.view.output_embeddings))
            out = self._random_controls(h, gold, eligible.numpy(), len(ods), counts)
            if counts is not None:
                tables["outliers/prediction_frequency"] = prediction_frequency(
                    {"full": full["top1"], "ODs ablated": sums["ablate"]["top1"],
                     "ODs only": sums["only_od"]["top1"]}, counts)
        for name, m in stats.items():
            for key in ("kl", "entropy", "n_distinct", "spearman", "slope", "loglog_slope", "mean_logfreq",
                        "top10_share"):
                if key in m and not (name == "full" and key == "kl") \
                        and not (name == "only_od" and len(ods) < 2 and key in SHAPE_OF_TOP1):
                    out[f"outliers/{name}_{key}"] = m[key]
            if name == "ablate":
                out[f"outliers/{name}_acc_drop"] = stats["full"]["acc"] - m["acc"]
        if "ablate" in stats and "mean_logfreq" in stats["full"]:
            out["outliers/ablate_mean_logfreq_drop"] = stats["full"]["mean_logfreq"] - stats["ablate"]["mean_logfreq"]
        return out, tables

    def _random_controls(self, h: torch.Tensor, gold: torch.Tensor, eligible: np.ndarray, size: int,
                         counts: torch.Tensor | None) -> dict[str, float]:
        """`N_RANDOM` random sets of the ODs' size, drawn from the `eligible` dimensions, each ablated and each
        kept alone, on a seeded subsample of at most `control_positions` positions: the mean KL and accuracy cost
        of the ablations, and the mean KL and frequency statistics of the heads kept to one set."""
        sample = torch.randperm(len(h), generator=torch.Generator().manual_seed(self.seed))
        sample = sample[:self.control_positions].to(h.device)
        rng = np.random.default_rng(self.seed)
        sets = [torch.as_tensor(rng.choice(eligible, size=min(size, len(eligible)), replace=False), device=h.device)
                for _ in range(N_RANDOM)]
        d = h.shape[1]
        removed = {f"ablate{i}": S for i, S in enumerate(sets)} | {f"only{i}": complement(S, d)
                                                                    for i, S in enumerate(sets)}
        sums = ablation_metrics(self.view, h[sample], gold[sample], removed)
        n = len(sample)
        full_acc = (dim_zero_cat(self.top1)[sample] == gold[sample]).double().mean().item()
        ablated = [sums[f"ablate{i}"] for i in range(N_RANDOM)]
        kept = [prediction_stats(sums[f"only{i}"], n, counts) for i in range(N_RANDOM)]
        out = {"outliers/random_kl": float(np.mean([a["kl"] for a in ablated])) / n,
               "outliers/random_acc_drop": full_acc - float(np.mean([a["correct"] for a in ablated])) / n,
               "outliers/only_random_kl": float(np.mean([k["kl"] for k in kept]))}
        if counts is not None:
            out |= {f"outliers/only_random_{key}": float(np.mean([k[key] for k in kept]))
                    for key in ("mean_logfreq", "top10_share")}
        return out

    def _parameter_diagnostics(self, ods: torch.Tensor, d: int) -> dict[str, float]:
        """The final norm's γ and β (z-scores at the ODs, and ODs among their 3σ spikes) and the last MLP's
        down-projection (ODs among the spikes of its top left singular vectors), each with the p-value of 1,000
        random OD-sized placements."""
        g = torch.Generator().manual_seed(self.seed)
        placements = torch.stack([torch.randperm(d, generator=g)[:len(ods)] for _ in range(1000)])
        out: dict[str, float] = {}
        for name, values in (("gain", self.view.final_norm_gain()), ("bias", self.view.final_norm_bias())):
            if values is not None:
                values = values.detach().float()
                out[f"outliers/{name}_z_mean"] = ((values[ods] - values.mean()) / values.std().clamp_min(1e-12)
                                                  ).mean().item()
                out[f"outliers/{name}_spike_overlap"], out[f"outliers/{name}_spike_pvalue"] = spike_overlap(
                    values, ods, placements)
        w_down = self.view.mlp_values(self.shape.n_layers - 1).detach().float().T  # [d, d_mlp]
        U = torch.linalg.svd(w_down, full_matrices=False).U[:, :SINGULAR_VECTORS]
        out["outliers/svd_spike_overlap"], out["outliers/svd_spike_pvalue"] = spike_overlap(U, ods, placements)
        return out

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        history = plot.history

        def medians(ax) -> bool:
            entries = history.table("outliers/medians")
            if not entries:
                return False
            picks = sorted({entries[0]["step"], entries[len(entries) // 2]["step"], entries[-1]["step"]})
            for color, entry in zip(time_colors(len(picks)), [e for e in entries if e["step"] in picks], strict=True):
                values = [row[2] for row in entry["rows"]]
                ax.plot(range(len(values)), values, marker="o", markersize=3, color=color,
                        label=f"step {entry['step']}")
            for row in entries[-1]["rows"]:
                if row[2] > 1:
                    ax.annotate(f"d{row[1]}", (row[0], row[2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.axhline(1.0, color="crimson", linewidth=1)
            ax.text(len(values) - 1, 1.0, "threshold T", color="crimson", fontsize=7, ha="right", va="bottom")
            ax.set_xlabel("dimensions, by median |h_d|")
            ax.set_ylabel("median |h_d| / T")
            ax.set_title("outlier dimensions: sorted medians against the threshold", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            return True

        def count(ax) -> bool:
            drawn = plot.two_scales(ax, {"OD count": plot.series("outliers/count")},
                                    ("max median / T (> 1: an OD)", plot.series("outliers/score_max")),
                                    "OD count over training", "ODs")
            plot.mark(ax, history.summary.get("outliers/emergence_step"), "emergence")
            return drawn

        def ablation(ax) -> bool:
            kl = {"ODs ablated": "outliers/ablate_kl", "random dims ablated": "outliers/random_kl"}
            return plot.curves(ax, kl, "KL(full ‖ ablated): ODs vs random dimensions", "nats")

        rows = [plot.row([medians, count, ablation])]
        entries = history.table("outliers/prediction_frequency")
        if entries:  # paper A's headline figure: the ODs carry the frequent tokens
            rows.append(plot.row([prediction_panel(plot, entries, column, condition) for column, condition in
                                  (("full", "full"), ("ODs ablated", "ablate"), ("ODs only", "only_od"))]))
        else:
            plot.leave_out("predictions vs corpus frequency with the ODs ablated and alone: no checkpoint had an OD")
        return [fig for fig in rows if fig is not None]


def prediction_panel(plot: RunPlot, entries: list[dict], column: str, condition: str) -> Panel:
    """Paper A's headline panel for one condition: each token's share of top-1 predictions against its corpus
    frequency (log-log), at up to three checkpoints with ODs, with the authors' raw-frequency slope."""
    def panel(ax) -> bool:
        picks = [entries[round(i * (len(entries) - 1) / 2)] for i in range(3)] if len(entries) > 3 else entries
        for color, entry in zip(time_colors(len(picks)), picks, strict=True):
            j = entry["columns"].index(column)
            points = [(row[1], row[j]) for row in entry["rows"] if row[j] > 0]
            row = plot.history.row_at(entry["step"]) or {}
            slope = row.get(f"outliers/{condition}_slope")
            why = "one OD" if row.get("outliers/count") == 1 else "fewer than 3 tokens predicted"
            ax.scatter(*zip(*points, strict=True), s=8, alpha=0.6, color=color,
                       label=f"step {entry['step']}: slope {slope:.2f}" if finite(slope)
                       else f"step {entry['step']}: slope — ({why})")
        lo = min(row[1] for entry in picks for row in entry["rows"])
        ax.plot([lo, 1], [lo, 1], color="gray", linewidth=0.5, linestyle=":")
        ax.set(xscale="log", yscale="log", xlabel="corpus frequency", ylabel="share of top-1 predictions")
        ax.set_title(f"{column}: predictions vs corpus frequency", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.7)
        return True
    return panel
