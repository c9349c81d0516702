import pytest
import torch
from helpers import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.base import AnalysisContext
from dynascope.analysis.measure import measure
from dynascope.analysis.outliers import control_dims, outlier_dims, robust_z, spearman, unembedding_outlier_dims
from dynascope.core.model import HookPoint
from dynascope.core.probe import shard


class Planted(nn.Module):
    """Final-norm output: Gaussian noise per (window, position) plus constant offsets on chosen dims."""

    def __init__(self, d: int, offsets: dict[int, float], vocab: int = 40, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(vocab, d, generator=g) / d ** 0.5
        self.d, self.offsets, self.seed = d, offsets, seed
        self.normalized = HookPoint()

    def forward(self, tokens):
        g = torch.Generator().manual_seed(self.seed + 1)
        noise = torch.randn(64, tokens.shape[1], self.d, generator=g)
        h = noise[tokens[:, 0]]  # each window's first token picks its noise, so shards see the same vectors
        for dim, off in self.offsets.items():
            h[..., dim] += off
        return self.normalized(h) @ self.E.T


def planted_view(d: int = 512, offsets: dict[int, float] | None = None) -> FakeView:
    model = Planted(d, offsets or {})
    return FakeView(model, {"ln_final.hook_normalized": model.normalized}, model.E, d_mlp=2 * d, context_length=40,
                    gain=torch.linspace(0.5, 1.5, d),
                    values=torch.randn(2 * d, d, generator=torch.Generator().manual_seed(3)))


def windows(n=32, length=40):
    w = torch.randint(0, 40, (n, length), generator=torch.Generator().manual_seed(5))
    w[:, 0] = torch.arange(n)
    return w


def test_planted_offset_dimensions_are_found_in_order():
    v = planted_view(offsets={7: 6.0, 40: -8.0, 12: 5.0})
    (a,) = build("outliers", v.shape, AnalysisContext(counts=torch.arange(1, 41) ** 2))
    record = measure(v, [a], windows(), step=0)
    out = record.values
    assert out["outliers/count"] == 3
    assert [row[1] for row in record.tables["outliers/dims"].rows] == [40, 7, 12]  # by median |h|
    medians = record.tables["outliers/medians"].rows  # the sorted medians against the threshold, for the report
    assert [row[1] for row in medians[:3]] == [40, 7, 12] and medians[2][2] > 1 > medians[3][2]
    assert out["outliers/score_max"] > 1 and out["outliers/robust_z_max"] > 10
    assert out["outliers/ablate_kl"] > 10 * out["outliers/random_kl"]
    assert {"outliers/full_spearman", "outliers/ablate_mean_logfreq_drop"} <= set(out)
    assert record.summary["outliers/emergence_step"] == 0.0 and record.summary["outliers/emergence_revisions"] == 0
    assert out["outliers/h_varying_share"] > 0.5  # a varying state: the guard lets the emergence fire


def test_no_planted_dimensions_gives_none_and_revises_emergence():
    v = planted_view(offsets={3: 8.0})
    (a,) = build("outliers", v.shape)
    measure(v, [a], windows(), step=0)
    record = measure(planted_view(), [a], windows(), step=4)
    out = record.values
    assert out["outliers/count"] == 0 and out["outliers/score_max"] < 1 and "outliers/ablate_kl" not in out
    assert out["outliers/jaccard_prev"] == 0.0
    assert record.summary["outliers/emergence_step"] is None and record.summary["outliers/emergence_revisions"] == 1
    assert [j[:3] for j in a.onset_history["outliers/emergence"]] == [[0, True, True], [4, True, False]]


def test_self_masking_is_caught_by_the_robust_score():
    planted = {10 * i + 3: 3.0 + 0.5 * i for i in range(6)}  # 6 dims of d = 256: above 2% of d/2
    v = planted_view(d=256, offsets=planted)
    (a,) = build("outliers", v.shape)
    out = measure(v, [a], windows(64), step=0).values
    assert out["outliers/count"] < 6  # the dims raise the 99th percentile above their own medians
    _, cache = v.run_with_cache(windows(64), ["ln_final.hook_normalized"])
    _, med, _ = outlier_dims(cache["ln_final.hook_normalized"][:, 16:-1].flatten(0, 1))
    assert set(robust_z(med).topk(6).indices.tolist()) == set(planted)


def test_ablation_matches_direct_computation():
    v = planted_view(offsets={5: 7.0, 9: -7.0})
    (a,) = build("outliers", v.shape)
    tokens = windows(8)
    out = measure(v, [a], tokens, step=0).values
    _, cache = v.run_with_cache(tokens, ["ln_final.hook_normalized"])
    h = cache["ln_final.hook_normalized"][:, 16:-1].flatten(0, 1)
    gold = tokens[:, 17:].flatten()
    E = v.output_embeddings
    z = h @ E.T
    hz = h.clone()
    hz[:, [5, 9]] = 0
    lp, lq = z.log_softmax(-1), (hz @ E.T).log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert out["outliers/ablate_kl"] == pytest.approx(kl, rel=1e-5)
    acc_drop = (z.argmax(-1) == gold).float().mean() - (lq.argmax(-1) == gold).float().mean()
    assert out["outliers/ablate_acc_drop"] == pytest.approx(acc_drop.item(), abs=1e-6)
    assert out["outliers/ablate_n_distinct"] == lq.argmax(-1).unique().numel()


def _rank_main(rank: int) -> dict:
    v = planted_view(offsets={7: 6.0, 40: -8.0})
    mine, first = shard(windows(), rank, 2)
    return measure(v, build("outliers", v.shape), mine, step=0, first_window=first).values


def test_two_ranks_give_the_single_process_values(two_ranks):
    results = two_ranks(_rank_main)
    v = planted_view(offsets={7: 6.0, 40: -8.0})
    single = measure(v, build("outliers", v.shape), windows(), step=0).values
    for rank in (0, 1):
        assert results[rank] == pytest.approx(single, rel=1e-6, nan_ok=True)


class Boundary(Planted):
    """Planted ODs, plus massive activations on 40 dimensions at an end-of-document token (position 20)
    and the 16 positions after it, as a new document's first positions have in trained models."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalized.register_forward_hook(lambda m, i, h: h + self.massive(h))

    @staticmethod
    def massive(h):
        extra = torch.zeros_like(h)
        extra[:, 20:37, :40] = 30.0
        return extra


EOS = 39


def test_positions_after_a_document_boundary_are_left_out():
    model = Boundary(512, {7: 6.0})
    v = FakeView(model, {"ln_final.hook_normalized": model.normalized}, model.E, d_mlp=1024, context_length=40,
                 values=torch.randn(1024, 512, generator=torch.Generator().manual_seed(3)))
    tokens = windows()
    tokens[tokens == EOS] = 0
    tokens[:, 20] = EOS  # a document ends at position 20 of every window
    (a,) = build("outliers", v.shape, AnalysisContext(eos_id=EOS))
    record = measure(v, [a], tokens, step=0)
    # kept: positions 16-19 (17-20 tokens of context) and 37-38 (17-18 tokens after the end of document)
    assert record.values["outliers/count"] == 1 and record.tables["outliers/dims"].rows == [[0, 7]]
    _, cache = v.run_with_cache(tokens, ["ln_final.hook_normalized"])
    kept = cache["ln_final.hook_normalized"][:, [16, 17, 18, 19, 37, 38]].flatten(0, 1)
    assert record.values["outliers/threshold"] == pytest.approx(outlier_dims(kept)[2].item())


def frequent_view() -> tuple[FakeView, AnalysisContext]:
    """ODs 7 and 40 whose unembedding columns favour the 10 most frequent tokens (ids 0-9)."""
    view = planted_view(offsets={7: 6.0, 40: -8.0})
    view.E[:10, 7], view.E[:10, 40] = 2.0, -2.0
    return view, AnalysisContext(counts=torch.arange(40, 0, -1) ** 2)


def test_only_the_ods_collapse_predictions_onto_the_most_frequent_tokens():
    v, context = frequent_view()
    (a,) = build("outliers", v.shape, context)
    out = measure(v, [a], windows(), step=0).values
    assert out["outliers/only_od_top10_share"] == 1.0 and out["outliers/only_od_n_distinct"] <= 10
    assert out["outliers/ablate_top10_share"] < 0.5  # without them predictions spread over the vocabulary
    assert out["outliers/only_od_mean_logfreq"] > out["outliers/ablate_mean_logfreq"]


def test_frequency_heuristic_is_logged_without_ods_with_the_authors_raw_slope():
    v = planted_view()
    context = AnalysisContext(counts=torch.arange(40, 0, -1) ** 2)
    (a,) = build("outliers", v.shape, context)
    out = measure(v, [a], windows(), step=0).values
    assert out["outliers/count"] == 0 and "outliers/ablate_kl" not in out and "outliers/only_od_kl" not in out
    _, cache = v.run_with_cache(windows(), ["ln_final.hook_normalized"])
    top1 = (cache["ln_final.hook_normalized"][:, 16:-1].flatten(0, 1) @ v.E.T).argmax(-1)
    pred = torch.bincount(top1, minlength=40).double() / len(top1)
    corp = context.counts.double() / context.counts.sum()
    seen = pred > 0
    slope = torch.cov(torch.stack([corp[seen], pred[seen]]))[0, 1] / corp[seen].var()  # OLS on raw frequencies
    assert out["outliers/full_slope"] == pytest.approx(slope.item(), rel=1e-6)
    assert {"outliers/full_spearman", "outliers/full_loglog_slope", "outliers/full_top10_share",
            "outliers/full_entropy", "outliers/full_n_distinct"} <= set(out)


def test_spearman_gives_ties_their_average_rank():
    # ranks of x with the tie averaged: 1.5, 1.5, 3, 4; Pearson against 1, 2, 3, 4 = 4.5 / sqrt(4.5 · 5)
    assert spearman(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        4.5 / (4.5 * 5) ** 0.5)


def test_the_only_random_control_keeps_random_dimensions_that_are_not_unembedding_outliers():
    v, context = frequent_view()
    v.E[:, 100] += 3.0  # an outlier dimension of the unembedding itself: never a random control dimension
    (a,) = build("outliers", v.shape, context)
    out = measure(v, [a], windows(), step=0).values
    assert out["outliers/only_od_top10_share"] == 1.0
    assert out["outliers/only_random_top10_share"] < 0.6  # two random dimensions do not collapse onto them
    assert out["outliers/only_random_kl"] > 10 * out["outliers/random_kl"]  # keeping 2 of 512 loses a lot
    assert unembedding_outlier_dims(v.E).tolist() == [100]
    eligible = control_dims(512, torch.tensor([7, 40]), unembedding_outlier_dims(v.E))
    assert len(eligible) == 509 and not {7, 40, 100} & set(eligible.tolist())


def test_the_only_od_top1_statistics_need_two_ods():
    v = planted_view(offsets={3: 8.0})
    (a,) = build("outliers", v.shape, AnalysisContext(counts=torch.arange(40, 0, -1) ** 2))
    out = measure(v, [a], windows(), step=0).values
    assert out["outliers/count"] == 1 and out["outliers/only_od_kl"] > 0  # what one OD carries is still measured
    # one dimension's top-1 is the token with the largest or the smallest E[w, d]: 1 or 2 distinct tokens
    assert not {f"outliers/only_od_{k}" for k in ("n_distinct", "slope", "loglog_slope", "spearman")} & set(out)
    assert "outliers/only_od_top10_share" in out and "outliers/ablate_n_distinct" in out


def test_gain_bias_and_down_projection_spikes_at_the_ods_are_found():
    d, f = 512, 1024
    v = planted_view(offsets={7: 6.0, 40: -8.0})
    v.gain = torch.ones(d)
    v.gain[7] = 3.0  # a γ spike at one OD
    v.norm_bias = torch.zeros(d)
    v.norm_bias[[7, 40]] = torch.tensor([2.0, -2.0])  # β spikes at both
    # W_down = Σ_k s_k e_{i_k} v_kᵀ: its k-th left singular vector is one-hot at i_k, a 3σ spike there
    order = torch.randperm(d, generator=torch.Generator().manual_seed(1))
    order = order[(order != 7) & (order != 40)]
    order = torch.cat([order[:9], torch.tensor([7]), order[9:11], torch.tensor([40]), order[11:]])  # 10th, 13th
    right = torch.linalg.qr(torch.randn(f, 20, generator=torch.Generator().manual_seed(2))).Q  # [f, 20]
    w_down = torch.zeros(d, f)
    for k in range(20):
        w_down[order[k]] = (20 - k) * right[:, k]
    v.values = w_down.T
    (a,) = build("outliers", v.shape)
    out = measure(v, [a], windows(), step=0).values
    assert out["outliers/gain_spike_overlap"] == 1 and out["outliers/bias_spike_overlap"] == 2
    assert out["outliers/bias_spike_pvalue"] < 0.01 and out["outliers/bias_z_mean"] == pytest.approx(0.0, abs=0.01)
    assert out["outliers/svd_spike_overlap"] == 2  # among the top 15 singular vectors (the top 4 hold neither)
    assert out["outliers/svd_spike_pvalue"] < 0.01
