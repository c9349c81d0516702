import numpy as np
import pytest
import torch
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.base import measure
from dynascope.analysis.view import ModelView
from dynascope.train.model import HookPoint

V, D = 3000, 32


class Head(nn.Module):
    """Final-norm output h = −s·a + small noise at every position, logits h·W_Uᵀ."""

    def __init__(self, W: torch.Tensor, a: torch.Tensor, s: float = 1.0):
        super().__init__()
        self.W, self.a, self.s = W, a, s
        self.normalized = HookPoint()

    def forward(self, tokens):
        g = torch.Generator().manual_seed(int(tokens.sum()))
        h = -self.s * self.a + 0.01 * torch.randn(*tokens.shape, D, generator=g)
        return self.normalized(h) @ self.W.T


class HeadView(ModelView):
    def __init__(self, W, a, counts, s=1.0):
        self.model = Head(W, a, s)
        self.n_layers, self.d_model, self.d_mlp, self.vocab_size, self.context_length = 1, D, D, V, 16
        self.activation, self.counts = "relu", counts
        self.points = {"ln_final.hook_normalized": (self.model.normalized, "out")}

    def forward(self, tokens):
        return self.model(tokens)

    @property
    def W_U(self):
        return self.model.W


def planted(noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = (1e6 / np.arange(1, V + 1)).astype(np.int64)  # Zipf, all above min_count
    y = -torch.log(torch.as_tensor(counts / counts.sum()))
    a = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    W = (y.float() - y.float().mean())[:, None] * a + noise * torch.randn(V, D, generator=g)
    return W, a, counts


def tokens():
    return torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(1))


def test_planted_frequency_direction_is_recovered():
    W, a, counts = planted(noise=0.05)
    v = HeadView(W, a, counts)
    (f,) = build("frequency", v)
    out = measure(v, [f], tokens())
    assert out["frequency/r2_corpus"] > 0.99 and out["frequency/spearman_corpus"] > 0.99
    assert abs(torch.cosine_similarity(f.prev_A, a, dim=0).item()) > 0.98  # A parallel to the planted direction
    assert out["frequency/r2_output"] > 0.99  # h ≈ −a: −log α is linear in W_U·a as well
    assert out["frequency/cos_A_mean_h"] > 0.99  # A ≈ −h̄, the link to constant (outlier-like) directions
    assert 0 <= out["frequency/deletable_frac_0.01"] <= out["frequency/deletable_frac_0.1"] <= 0.95


def test_pure_noise_unembedding_encodes_no_frequency():
    W, a, counts = planted(noise=1.0)
    W = torch.randn(V, D, generator=torch.Generator().manual_seed(7))
    v = HeadView(W, a, counts)
    out = measure(v, build("frequency", v), tokens())
    assert out["frequency/r2_corpus"] < 0.1


def test_convergence_compares_direction_and_weights_across_checkpoints():
    W, a, counts = planted(noise=0.05)
    v = HeadView(W, a, counts)
    (f,) = build("frequency", v)
    first = measure(v, [f], tokens())
    assert "frequency/direction_cos_prev" not in first and f.summary() == {}
    f.step = 8
    moved = HeadView(W * 1.1, a, counts)
    second = measure(moved, [f], tokens())
    assert second["frequency/direction_cos_prev"] == pytest.approx(1.0, abs=1e-4)  # same direction (rescaled A)
    assert second["frequency/wu_rel_change"] == pytest.approx(0.1 / 1.1, rel=1e-4)
    assert f.summary() == {"frequency/converged_step": 8.0}


def test_lm_head_bias_is_added_to_the_target():
    W, a, counts = planted(noise=0.05)
    y = -torch.log(torch.as_tensor(counts / counts.sum())).float()
    v = HeadView(W, a, counts)
    bias = -y  # a head whose bias alone carries the frequency: y + b is constant, no linear code left
    v.__class__ = type("BiasedHeadView", (HeadView,), {"b_U": property(lambda self: bias)})
    out = measure(v, build("frequency", v), tokens())
    assert out["frequency/r2_corpus"] < 0.5
