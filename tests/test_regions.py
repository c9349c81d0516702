import pytest
import torch
from helpers import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.measure import measure
from dynascope.analysis.view import ModelView, TransformerView
from dynascope.core.model import HookPoint, ModelConfig, Transformer


class Toy(nn.Module):
    """Embeds tokens; the "final norm output" is either the residual itself (linear) or a unit step
    on its first coordinate (a region boundary where that coordinate crosses zero)."""

    def __init__(self, step: bool, d: int = 4, vocab: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.step = step
        self.resid, self.normalized = HookPoint(), HookPoint()

    def forward(self, tokens):
        h = self.resid(self.embed(tokens))
        out = (h[..., :1] > 0).float() * torch.ones_like(h) if self.step else h
        return self.normalized(out) @ torch.eye(h.shape[-1])


def toy_windows(n: int = 3) -> torch.Tensor:
    """Windows of 40 tokens whose A prompts end in token 0 and B prompts in token 1."""
    w = torch.full((n, 40), 2)
    w[:, 9] = w[:, 19] = 0  # last tokens of the two A chunks (first half)
    w[:, 29] = w[:, 39] = 1  # last tokens of the two B chunks (second half)
    return w


def planted(step: bool) -> FakeView:
    model = Toy(step)
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[0] = torch.tensor([-1.0, 1.0, 0.0, 0.5])  # A's last token: coordinate 0 at -1
        model.embed.weight[1] = torch.tensor([1.0, 0.0, 2.0, 0.5])  # B's: +1, so the step is at α = 0.5
        model.embed.weight[4] = torch.tensor([-3.0, 1.0, 0.0, 0.5])  # from −3 to B's +1: the step is at α = 0.75
    return FakeView(model, {"blocks.0.hook_resid_post": model.resid, "ln_final.hook_normalized": model.normalized},
                    torch.eye(4), context_length=40, activation="gelu")


def test_step_function_gives_maximal_sharpness():
    v = planted(step=True)
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0]}})
    record = measure(v, [a], toy_windows(), step=0, batch_size=2)
    out = record.values
    assert out["regions/sharpness_median"] == pytest.approx(20.0)  # N − 1 with N = 21
    assert out["regions/dropped_pairs"] == 0
    curve = record.tables["regions/median_curve"].rows
    assert [row[1] for row in curve] == [0.0] * 11 + [1.0] * 10  # x0(α) = 2α − 1 > 0 only after α = 0.5


def test_linear_model_gives_sharpness_one():
    v = planted(step=False)
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0], "n_alpha": 11}})
    record = measure(v, [a], toy_windows(), step=0, batch_size=3)
    out = record.values
    assert out["regions/sharpness_median"] == pytest.approx(1.0, abs=1e-5)
    assert out["regions/sharpness_p75"] == pytest.approx(1.0, abs=1e-5)
    alphas, values = zip(*[(r[0], r[1]) for r in record.tables["regions/median_curve"].rows], strict=True)
    assert values == pytest.approx(alphas, abs=1e-6)


def test_pairs_that_do_not_move_the_output_are_dropped():
    v = planted(step=True)
    windows = toy_windows()
    windows[:, 29] = windows[:, 39] = 0  # B == A: d(1) = 0
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0]}})
    out = measure(v, [a], windows, step=0, batch_size=3).values
    assert out["regions/dropped_pairs"] == 6.0  # 3 windows × 2 pairs


def test_pairs_take_their_two_prompts_from_different_windows():
    windows = torch.full((4, 40), 2)
    for w in range(4):  # within a window A and B end in the same token (one document): no boundary between them
        windows[w, [9, 19, 29, 39]] = w % 2
    v = planted(step=True)
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0]}})
    out = measure(v, [a], windows, step=0, batch_size=4).values
    assert out["regions/dropped_pairs"] == 0  # each A meets its partner window's B, across the boundary
    assert out["regions/sharpness_median"] == pytest.approx(20.0)


def test_median_curve_is_stored_with_its_interquartile_band():
    windows = toy_windows(4)
    windows[1::2, [9, 19]] = 4  # odd windows' A prompts start further away: half of the pairs step at 0.75
    v = planted(step=True)
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0]}})
    table = measure(v, [a], windows, step=0, batch_size=4).tables["regions/median_curve"]
    assert table.columns == ["alpha", "L0", "L0 p25", "L0 p75"]
    for alpha, median, p25, p75 in table.rows:
        # d̃ is 0 or 1 per pair; 4 of the 8 curves have stepped for α in (0.5, 0.75], all of them after
        expected = (0, 0, 0) if alpha <= 0.5 + 1e-6 else (0, 0, 1) if alpha <= 0.75 + 1e-6 else (1, 1, 1)
        assert (median, p25, p75) == expected, alpha


def test_random_init_model_has_no_sharp_boundaries():
    torch.manual_seed(0)
    v = TransformerView(Transformer(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, vocab_size=300,
                                                context_length=40)).eval())
    (a,) = build("regions", v.shape)
    out = measure(v, [a], torch.randint(0, 300, (16, 40)), step=0, batch_size=8).values
    assert a.write_layers == [0, 1]
    # measured 1.10–1.18 over 8 seeds for models of this size; a boundary would give several units more
    for w in (0, 1):
        assert 1.0 <= out[f"regions/sharpness_median/L{w}"] < 1.3
    assert 0 < out["regions/relu_flips_mean"] <= out["regions/relu_flips_path_mean"]


@pytest.mark.parametrize("activation,layer", [("relu", 0), ("gelu", 1), ("relu", 2)])
def test_last_position_recompute_equals_full_patched_passes(activation, layer):
    """The view's shortcut (only the last position, from the patched block on, over the prefix's keys and
    values) gives what patching full forward passes gives."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=3, d_model=32, n_heads=4, d_mlp=64, vocab_size=50, context_length=16,
                      activation=activation)
    view = TransformerView(Transformer(cfg).eval())
    tokens, vectors = torch.randint(0, 50, (3, 10)), torch.randn(3, 5, 32)
    names = ["ln_final.hook_normalized", "blocks.2.mlp.hook_pre"]
    with torch.no_grad():
        fast = view.patch_last_position(tokens, layer, vectors, names)
        full = ModelView.patch_last_position(view, tokens, layer, vectors, names)
    assert fast["ln_final.hook_normalized"].shape == (3, 5, 32)
    for name in names:
        assert fast[name].shape == full[name].shape
        assert (fast[name] - full[name]).abs().max() < 1e-5


class Folded(Toy):
    """A ReLU "last MLP" of two units reading the first coordinate x of the patched residual: unit 0's
    pre-activation is x² − 0.25 (on at both ends of a path from x = −1 to x = +1, off in the middle), unit 1's is
    x (off at A, on at B)."""

    def __init__(self):
        super().__init__(step=False)
        self.pre = HookPoint()

    def forward(self, tokens):
        h = self.resid(self.embed(tokens))
        x = h[..., 0]
        self.pre(torch.stack([x ** 2 - 0.25, x], dim=-1))
        return self.normalized(h) @ torch.eye(h.shape[-1])


def test_relu_flips_compare_the_endpoints_as_the_authors_do_and_the_path_separately():
    model = Folded()
    with torch.no_grad():
        model.embed.weight.copy_(planted(step=False).model.embed.weight)
    v = FakeView(model, {"blocks.0.hook_resid_post": model.resid, "ln_final.hook_normalized": model.normalized,
                         "blocks.0.mlp.hook_pre": model.pre}, torch.eye(4), context_length=40, activation="relu")
    (a,) = build("regions", v.shape, options={"regions": {"write_layers": [0]}})
    out = measure(v, [a], toy_windows(), step=0, batch_size=3).values
    assert out["regions/relu_flips_mean"] == 1.0  # unit 1: off at A, on at B; unit 0 is on at both ends
    assert out["regions/relu_flips_path_mean"] == 2.0  # unit 0 turns off and on again along the way
