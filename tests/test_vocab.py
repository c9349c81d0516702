import pytest
import torch
from helpers import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.measure import measure
from dynascope.analysis.view import TransformerView
from dynascope.core.model import HookPoint, ModelConfig, Transformer

L, D = 4, 12  # layers; d_model = vocabulary = number of MLP units (identity unembedding and values)
A_TOK, B_TOK, K = 3, 7, 2  # the final top-1 is B_TOK from layer K on; A_TOK before


class Scripted(nn.Module):
    """Emits a hand-built residual stream and MLP coefficients at every position: layer l's (m, resid) from
    `layers(l)`."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.resid = nn.ModuleList(HookPoint() for _ in range(L))
        self.post = nn.ModuleList(HookPoint() for _ in range(L))

    def forward(self, tokens):
        B, T = tokens.shape
        for l in range(L):
            m, r = self.layers(l)
            self.post[l](m.expand(B, T, D))
            x = self.resid[l](r.expand(B, T, D))
        return x


def promoting(l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN at layer K promotes B_TOK by 4; before it, A_TOK leads (1 > 0.5), all else 0."""
    e = torch.eye(D)
    m = 4 * e[B_TOK] if l == K else torch.zeros(D)
    before = 0.5 * e[B_TOK] + e[A_TOK]
    return m, before + 4 * e[B_TOK] if l >= K else e[A_TOK] * 2


def scripted_view(layers=promoting) -> FakeView:
    model = Scripted(layers)
    points = {f"blocks.{l}.hook_resid_post": model.resid[l] for l in range(L)}
    points |= {f"blocks.{l}.mlp.hook_post": model.post[l] for l in range(L)}
    return FakeView(model, points, torch.eye(D), n_layers=L, context_length=16, values=torch.eye(D))


def test_saturation_layer_promotion_and_elimination_on_a_planted_stream():
    v = scripted_view()
    (a,) = build("vocab", v.shape, options={"vocab": {"position_stride": 4, "coherence_values": 4}})
    record = measure(v, [a], torch.zeros(3, 16, dtype=torch.long), step=0)
    out = record.values
    assert out["vocab/saturation_layer_mean"] == K
    assert out["vocab/oracle_exit_saving"] == pytest.approx(1 - (K + 1) / L) and "vocab/early_exit_saving" not in out
    assert [out[f"vocab/agree_final/L{l}"] for l in range(L - 1)] == [0, 0, 1]
    assert f"vocab/agree_final/L{L - 1}" not in out  # the last layer agrees with itself
    assert record.tables["vocab/saturation_hist"].rows[K] == [K, 1.0]
    # the saturation event at K: of the 10 dominant sub-updates, unit B_TOK scores m·(e_B·v_B) = 4 for the
    # promoted token and 0 for A_TOK, ranked above it before the FFN: elimination by promotion
    assert [out[f"vocab/promoted_{s}/L{K}"] for s in ("max", "mean", "min")] == pytest.approx([4.0, 0.4, 0.0])
    assert [out[f"vocab/eliminated_{s}/L{K}"] for s in ("max", "mean", "min")] == pytest.approx([0.0, 0.0, 0.0])
    # the layer's candidate is the top-1 before its FFN (A_TOK at layer K), not the outcome (B_TOK)
    # the baseline at the same events: 10 random sub-updates, of which unit B_TOK (1 in 12) scores 4; over 12
    # events the mean has a standard error of 0.1
    assert out[f"vocab/promoted_random_max/L{K}"] <= 4.0
    assert out[f"vocab/promoted_random_mean/L{K}"] == pytest.approx(4 / 12, abs=0.3)
    assert out[f"vocab/promoted_random_min/L{K}"] == 0.0
    assert out[f"vocab/promotion_max/L{K}"] == 0.0 and out[f"vocab/promotion_rate/L{K}"] == 0.0
    assert out["vocab/promotion_max/L0"] == 0.0 and out["vocab/promotion_rate/L0"] == 0.0  # no FFN signal at layer 0


def test_predictive_early_exit_is_fitted_on_even_windows_and_scored_on_odd_ones():
    # logit-lens confidence: p(A_TOK) = e²/(e² + 11) ≈ 0.40 before layer K, p(B_TOK) ≈ 0.88 from K on
    v = scripted_view()
    (a,) = build("vocab", v.shape, options={"vocab": {"position_stride": 4, "coherence_values": 4}})
    record = measure(v, [a], torch.zeros(3, 16, dtype=torch.long), step=0)
    out = record.values
    assert out["vocab/exit_threshold"] == 0.5  # τ ≤ 0.4 exits at layer 0 on A_TOK: wrong on the fit windows
    assert out["vocab/exit_accuracy"] == 1.0 and out["vocab/exit_saving"] == pytest.approx(1 - (K + 1) / L)
    curve = {row[0]: row[1:] for row in record.tables["vocab/exit_curve"].rows}
    assert curve[0.4] == [0.0, 0.0, pytest.approx(1 - 1 / L)] and curve[1.0] == [1.0, 1.0, 0.0]
    assert curve[0.0] == curve[0.4]  # τ = 0: every position exits at layer 0


def test_the_threshold_grid_reaches_below_a_slack_target():
    # every layer's logit lens predicts B_TOK, at layer 0 with probability e^0.1/(e^0.1 + 11) ≈ 0.091
    v = scripted_view(lambda l: (torch.zeros(D), (0.1 + 3 * l) * torch.eye(D)[B_TOK]))
    (a,) = build("vocab", v.shape, options={"vocab": {"position_stride": 4, "coherence_values": 4}})
    out = measure(v, [a], torch.zeros(3, 16, dtype=torch.long), step=0).values
    # layer 0 is already right at 9% confidence: a grid that stops at τ = 0.1 would exit one layer later
    assert out["vocab/exit_threshold"] < 0.09 and out["vocab/exit_accuracy"] == 1.0
    assert out["vocab/exit_saving"] == pytest.approx(1 - 1 / L)


class OneUnit(nn.Module):
    """One layer of 100 MLP units, each with coefficient 1; only unit 0 writes (100·e_C), so it alone
    scores for the candidate C: 100 where the others score 0."""

    C = 5

    def __init__(self):
        super().__init__()
        self.resid, self.post = HookPoint(), HookPoint()

    def forward(self, tokens):
        B, T = tokens.shape
        self.post(torch.ones(B, T, 100))
        return self.resid(101 * torch.eye(D)[self.C].expand(B, T, D))


def test_random_baseline_is_drawn_anew_at_every_position():
    model = OneUnit()
    values = torch.zeros(100, D)
    values[0, OneUnit.C] = 100.0
    v = FakeView(model, {"blocks.0.hook_resid_post": model.resid, "blocks.0.mlp.hook_post": model.post},
                 torch.eye(D), d_mlp=100, values=values)
    (a,) = build("vocab", v.shape, options={"vocab": {"coherence_values": 4}})
    out = measure(v, [a], torch.zeros(64, 64, dtype=torch.long), step=0).values
    # 10 draws of 100 units hit unit 0 with probability 1 − 0.99^10 ≈ 0.096: max ≈ 9.6, mean ≈ 100 × 0.01
    assert 5 < out["vocab/random_max/L0"] < 14 and out["vocab/random_mean/L0"] == pytest.approx(1.0, abs=0.3)
    assert out["vocab/promotion_max/L0"] == 100.0  # the dominant sub-updates include unit 0 everywhere


def test_value_vector_set_to_an_unembedding_row_ranks_that_token_first():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=50, context_length=16))
    v = TransformerView(model.eval())
    with torch.no_grad():
        model.blocks[1].mlp.fc_out.weight[:, 5] = model.unembed.weight[42]
    (a,) = build("vocab", v.shape)
    a.bind(v, 0)
    assert a.value_top_tokens(1, torch.tensor([5]), 3)[0, 0].item() == 42
    out = measure(v, [a], torch.randint(0, 50, (4, 16)), step=0).values
    assert 0 <= out["vocab/saturation_layer_mean"] <= 1
    assert -1 < out["vocab/random_coherence/L0"] < 1 and -1 < out["vocab/value_coherence/L1"] < 1


def test_coherent_values_score_above_random_ones():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, vocab_size=60, context_length=16))
    v = TransformerView(model.eval())
    with torch.no_grad():
        # 4 clusters of 5 near-identical unit-norm unembedding rows, 40 unrelated rows of norm 1.5;
        # every value vector points at a cluster centre, so its top 5 tokens are one cluster
        centers = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
        rows = torch.cat([centers.repeat_interleave(5, 0) + 0.01 * torch.randn(20, 16),
                          1.5 * torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)])
        model.unembed.weight.copy_(rows)
        model.blocks[0].mlp.fc_out.weight.copy_(centers[torch.arange(32) % 4].T)
    (a,) = build("vocab", v.shape, options={"vocab": {"coherence_values": 32, "top_k": 5}})
    out = measure(v, [a], torch.randint(0, 60, (2, 16)), step=0).values
    assert out["vocab/value_coherence/L0"] > 0.99
    assert out["vocab/random_coherence/L0"] < 0.6
