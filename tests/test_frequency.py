import numpy as np
import pytest
import torch
from fakes import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.base import AnalysisContext
from dynascope.analysis.measure import measure
from dynascope.train.model import HookPoint

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


def planted(noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = (1e6 / np.arange(1, V + 1)).astype(np.int64)  # Zipf, all above min_count
    y = -torch.log(torch.as_tensor(counts / counts.sum()))
    a = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    E = (y.float() - y.float().mean())[:, None] * a + noise * torch.randn(V, D, generator=g)
    return E, a, AnalysisContext(counts=torch.from_numpy(counts))


def tokens():
    return torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(1))


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
    E, a, context = planted(noise=0.05)
    v = head_view(E, a)
    (f,) = build("frequency", v.shape, context)
    first = measure(v, [f], tokens(), step=0)
    assert "frequency/direction_cos_prev" not in first.values and first.summary == {}
    second = measure(head_view(E * 1.1, a), [f], tokens(), step=8)
    assert second.values["frequency/direction_cos_prev"] == pytest.approx(1.0, abs=1e-4)  # same direction, rescaled
    assert second.values["frequency/wu_rel_change"] == pytest.approx(0.1 / 1.1, rel=1e-4)
    assert second.summary == {"frequency/converged_step": 8.0}


def test_lm_head_bias_is_added_to_the_target():
    E, a, context = planted(noise=0.05)
    y = -torch.log(context.counts / context.counts.sum()).float()
    v = head_view(E, a, bias=-y)  # a head whose bias alone carries the frequency: y + b is constant
    out = measure(v, build("frequency", v.shape, context), tokens(), step=0).values
    assert out["frequency/r2_corpus"] < 0.5
