import math

import numpy as np
import pytest
import torch
from helpers import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.base import AnalysisContext
from dynascope.analysis.frequency import deletion_kls
from dynascope.analysis.measure import measure
from dynascope.analysis.view import TransformerView
from dynascope.core.model import HookPoint, ModelConfig, Transformer

V, D = 3000, 32


class Head(nn.Module):
    """Final-norm output h = −s·a + small noise at every position, logits h·Eᵀ."""

    def __init__(self, E: torch.Tensor, a: torch.Tensor, s: float = 1.0):
        super().__init__()
        self.E, self.a, self.s = E, a, s
        self.normalized = HookPoint()

    def forward(self, tokens):
        g = torch.Generator().manual_seed(int(tokens.sum()))
        h = -self.s * self.a + 0.01 * torch.randn(*tokens.shape, D, generator=g)
        return self.normalized(h) @ self.E.T


def head_view(E: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None = None) -> FakeView:
    model = Head(E, a)
    return FakeView(model, {"ln_final.hook_normalized": model.normalized}, E, context_length=16, bias=bias)


def planted(noise: float, seed: int = 0, a: torch.Tensor | None = None):
    """An unembedding that encodes −log frequency along direction a, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    counts = (1e6 / np.arange(1, V + 1)).astype(np.int64)  # Zipf, all above min_count
    y = -torch.log(torch.as_tensor(counts / counts.sum()))
    a = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0) if a is None else a
    E = (y.float() - y.float().mean())[:, None] * a + noise * torch.randn(V, D, generator=g)
    return E, a, AnalysisContext(counts=torch.from_numpy(counts))


def rotation(degrees: float) -> torch.Tensor:
    """[D, D]: a rotation by `degrees` in the plane of the first two coordinates."""
    t = math.radians(degrees)
    R = torch.eye(D)
    R[:2, :2] = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return R


def tokens(windows: int = 8):
    return torch.randint(0, V, (windows, 16), generator=torch.Generator().manual_seed(1))


def test_planted_frequency_direction_is_recovered():
    E, a, context = planted(noise=0.05)
    v = head_view(E, a)
    (f,) = build("frequency", v.shape, context)
    out = measure(v, [f], tokens(), step=0).values
    assert out["frequency/r2_corpus"] > 0.99 and out["frequency/spearman_corpus"] > 0.99
    assert abs(torch.cosine_similarity(f.prev_A, a, dim=0).item()) > 0.98  # A parallel to the planted direction
    assert out["frequency/r2_output"] > 0.99  # h ≈ −a: −log α is linear in E·a as well
    assert out["frequency/cos_A_mean_h"] > 0.99  # A ≈ −h̄, the link to constant (outlier-like) directions
    assert 0 <= out["frequency/deletable_frac_0.01"] <= out["frequency/deletable_frac_0.1"] <= 0.95


def test_pure_noise_unembedding_encodes_no_frequency():
    _, a, context = planted(noise=1.0)
    E = torch.randn(V, D, generator=torch.Generator().manual_seed(7))
    v = head_view(E, a)
    out = measure(v, build("frequency", v.shape, context), tokens(), step=0).values
    assert out["frequency/r2_corpus"] < 0.1


def test_convergence_compares_direction_and_weights_across_checkpoints():
    E, a, context = planted(noise=0.05, a=torch.eye(D)[0])  # the code in the plane `rotation` turns
    v = head_view(E, a)
    (f,) = build("frequency", v.shape, context)
    first = measure(v, [f], tokens(), step=0)
    assert "frequency/direction_turn_per_step" not in first.values and first.summary["frequency/converged_step"] is None
    second = measure(head_view(E * 1.1, a), [f], tokens(), step=8)
    assert second.values["frequency/direction_turn_per_step"] == pytest.approx(0.0, abs=0.05)  # same direction
    assert second.values["frequency/wu_change_per_step"] == pytest.approx(0.1 / 1.1 / 8, rel=1e-4)  # per step
    turned = head_view(E @ rotation(30.0), a)  # the code turned by 30° over 20 steps
    third = measure(turned, [f], tokens(), step=28)
    assert third.values["frequency/direction_turn_per_step"] == pytest.approx(30.0 / 20, rel=0.02)


def test_converged_step_is_a_stability_onset_revised_when_it_stops_holding():
    E, a, context = planted(noise=0.05, a=torch.eye(D)[0])
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    # degrees turned per step since the previous checkpoint: fast, slow from step 8 (≤ 0.2), 1°/step up to 32
    per_step = [None, 10.0, 5.0, 2.0, 0.1, 0.1, 1.0, 0.1, 0.0]
    (f,) = build("frequency", head_view(E, a).shape, context)
    angle, summary = 0.0, []
    for i, step in enumerate(steps):
        angle += per_step[i] * (step - steps[i - 1]) if i else 0.0
        record = measure(head_view(E @ rotation(angle), a), [f], tokens(), step=step)
        if i:
            assert record.values["frequency/direction_turn_per_step"] == pytest.approx(per_step[i], rel=0.05, abs=0.01)
        summary.append(record.summary.get("frequency/converged_step"))
    assert summary[:4] == [None] * 4  # R² is high throughout; the direction still turns
    assert summary[4:6] == [8.0, 8.0]  # the first checkpoint from which A turns by at most 0.2° per step
    assert summary[6] is None  # revised by the turn between 16 and 32
    assert summary[7:] == [64.0, 64.0]
    assert record.summary["frequency/converged_revisions"] == 2.0  # revised away at 32, set again at 64


def test_distance_to_the_final_checkpoint_offline():
    E, a, context = planted(noise=0.05)
    final = E * 1.5 + 0.1
    context.final_output_embeddings = final
    out = measure(head_view(E, a), build("frequency", head_view(E, a).shape, context), tokens(), step=0).values
    assert out["frequency/dist_to_final"] == pytest.approx(((E - final).norm() / final.norm()).item(), rel=1e-6)


def test_r2_output_reads_near_zero_at_random_init_and_near_one_when_predictions_follow_frequency():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=500, context_length=32)
    v = TransformerView(Transformer(cfg).eval())
    counts = torch.from_numpy((1e5 / np.arange(1, 501)).astype(np.int64))
    out = measure(v, build("frequency", v.shape, AnalysisContext(counts=counts)),
                  torch.randint(0, 500, (16, 32), generator=torch.Generator().manual_seed(1)), step=0).values
    assert out["frequency/r2_output"] < 0.2  # random init: the mean prediction does not follow frequency
    E, a, context = planted(noise=0.05)  # h = −a: logits −(y − ȳ), so α follows frequency exactly
    assert measure(head_view(E, a), build("frequency", head_view(E, a).shape, context), tokens(),
                   step=0).values["frequency/r2_output"] > 0.99


def test_padded_and_rare_rows_are_not_fitted():
    E, a, context = planted(noise=0.05)
    out = measure(head_view(E, a), build("frequency", head_view(E, a).shape, context), tokens(), step=0).values
    padded = torch.cat([E, 5 * torch.randn(100, D, generator=torch.Generator().manual_seed(2))])  # 100 rows beyond
    v = head_view(padded, a)
    padded_out = measure(v, build("frequency", v.shape, context), tokens(), step=0).values
    for key in ("frequency/r2_corpus", "frequency/spearman_corpus"):
        assert padded_out[key] == pytest.approx(out[key], rel=1e-9), key
    # α itself is the model's output distribution, over the padded rows too; they only move its normaliser
    assert padded_out["frequency/r2_output"] == pytest.approx(out["frequency/r2_output"], rel=1e-5)


def test_deletion_curve_in_abs_a_order_beats_a_random_order():
    first_random = int(torch.randperm(D, generator=torch.Generator().manual_seed(0))[0])  # the analysis's seed
    a = torch.zeros(D)
    a[first_random] = 1.0  # the whole code lives in the dimension a random order deletes first
    E, _, context = planted(noise=0.01, a=a)
    v = head_view(E, a)
    # one deep position per window: 10 positions, 2 for each of the 5 random orders
    record = measure(v, build("frequency", v.shape, context), tokens(windows=10), step=0)
    curve = record.tables["frequency/deletion_curve"].rows
    assert [row[0] for row in curve] == pytest.approx([0.1 * i for i in range(1, 10)])
    assert max(row[1] for row in curve) < 0.01  # deleting up to 90% of the small-|A| dimensions keeps the code
    # the first of the 5 random orders deletes it at 10%, a second one by 30%: the mean over the positions, each
    # deleted in one order, is then a fifth and two fifths of deleting it everywhere (up to the noise in h, which
    # makes the two orders' positions differ by about 1%)
    assert 0.2 < curve[0][3] < curve[4][3] < curve[8][3]
    assert curve[0][3] == pytest.approx(record.values["frequency/deletion_kl_random_0.3"] / 2, rel=0.03)
    assert record.values["frequency/deletion_kl_0.3"] == pytest.approx(curve[2][1])
    assert record.values["frequency/deletable_frac_0.01"] == 0.95


def test_od_overlap_comes_from_the_outliers_analysis():
    from test_outliers import planted_view, windows

    view = planted_view(offsets={7: 6.0, 40: -8.0})
    counts = torch.arange(40, 0, -1) ** 2
    alone = measure(view, build("frequency", view.shape, AnalysisContext(counts=counts)), windows(), step=0)
    assert "frequency/od_overlap" not in alone.values  # no outliers analysis measured
    frequency, outliers = build("frequency,outliers", view.shape, AnalysisContext(counts=counts))
    record = measure(view, [frequency, outliers], windows(), step=0)
    ods = {dim for _, dim in record.tables["outliers/dims"].rows}
    top = set(frequency.prev_A.abs().topk(len(ods)).indices.tolist())
    assert ods == {7, 40} and record.values["frequency/od_overlap"] == len(top & ods) / 2
    plain = planted_view()
    frequency, outliers = build("frequency,outliers", plain.shape, AnalysisContext(counts=counts))
    assert "frequency/od_overlap" not in measure(plain, [frequency, outliers], windows(), step=0).values


def test_lm_head_bias_is_added_to_the_target():
    E, a, context = planted(noise=0.05)
    y = -torch.log(context.counts / context.counts.sum()).float()
    v = head_view(E, a, bias=-y)  # a head whose bias alone carries the frequency: y + b is constant
    out = measure(v, build("frequency", v.shape, context), tokens(), step=0).values
    assert out["frequency/r2_corpus"] < 0.5


def test_incremental_deletion_kl_equals_ablating_each_set_from_scratch():
    torch.manual_seed(1)
    E, h = torch.randn(40, 8), torch.randn(30, 8) * 2
    view = head_view(E, torch.ones(8))
    order, fractions = torch.randperm(8), [0.25, 0.5, 0.875]
    kls = deletion_kls(view, h, [(order, fractions), (order.flip(0), [0.5])], chunk=7)
    p = (h @ E.T).log_softmax(-1)

    def kl(removed: torch.Tensor) -> float:
        q = (h.index_fill(1, removed, 0.0) @ E.T).log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    assert kls[0] == pytest.approx([kl(order[:int(f * 8)]) for f in fractions], rel=1e-4)
    assert kls[1] == pytest.approx([kl(order.flip(0)[:4])], rel=1e-4)
    assert kls[0][-1] > kls[0][0] > 0


def test_deletion_follows_the_fit_of_the_models_own_output_probabilities():
    """Paper B ranks dimensions by |A| of the fit of −log α (the model's mean output probability), not by the
    corpus-frequency fit: a head whose predictions live in dimension 1 while the corpus code lives in dimension 0
    keeps its predictions when deleted in the paper's order, and loses them in the corpus fit's."""
    E, _, context = planted(noise=0.01, a=torch.eye(D)[0])
    E[:, 1] = 3 * torch.randn(V, generator=torch.Generator().manual_seed(4))  # what the head reads
    v = head_view(E, torch.eye(D)[1])  # h ≈ −e_1
    record = measure(v, build("frequency", v.shape, context), tokens(), step=0)
    columns = record.tables["frequency/deletion_curve"].columns
    curve = {c: [row[i] for row in record.tables["frequency/deletion_curve"].rows] for i, c in enumerate(columns)}
    paper, corpus = curve["KL, smallest |A| of −log α first"], curve["KL, smallest |A| of −log f first"]
    assert max(paper) < 0.01 and corpus[-1] > 1.0
    assert record.values["frequency/deletion_kl_0.3"] == pytest.approx(paper[2])
    assert record.values["frequency/deletion_kl_corpus_0.3"] == pytest.approx(corpus[2])
    assert record.values["frequency/deletable_frac_0.01"] == 0.95
