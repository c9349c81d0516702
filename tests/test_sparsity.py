import pytest
import torch
from helpers import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.measure import measure
from dynascope.analysis.view import TransformerView
from dynascope.core.model import HookPoint, ModelConfig, Transformer
from dynascope.core.probe import shard


class OneHot(nn.Module):
    """One MLP layer whose unit f is active exactly on token f (pre-activation +1, else −1)."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        self.vocab = vocab
        self.pre = HookPoint()

    def forward(self, tokens):
        self.pre(2 * nn.functional.one_hot(tokens, self.vocab).float() - 1)
        return torch.zeros(*tokens.shape, self.vocab)


def one_hot_view() -> FakeView:
    model = OneHot()
    return FakeView(model, {"blocks.0.mlp.hook_pre": model.pre}, torch.eye(12), context_length=8)


def fire(units: list[int]) -> torch.Tensor:
    """Pre-activations of the one-hot layer on training tokens `units`: [1, len(units), 12]."""
    return 2 * nn.functional.one_hot(torch.tensor([units]), 12).float() - 1


def test_usage_and_density_on_planted_firing():
    v = one_hot_view()
    tokens = torch.tensor([[0, 0, 1, 1], [2, 3, 3, 3], [4, 4, 4, 4]])
    (a,) = build("sparsity", v.shape, options={"sparsity": {"dead_source": "probe", "dead_min_tokens": 12}})
    out = measure(v, [a], tokens, step=0, batch_size=2).values
    assert out["sparsity/token_density_mean/L0"] == pytest.approx(1 / 12)  # one unit per token
    assert out["sparsity/seq_usage_mean/L0"] == pytest.approx((2 + 2 + 1) / 3 / 12)
    assert out["sparsity/batch_usage/L0"] == pytest.approx(5 / 12) and out["sparsity/batch_window_tokens"] == 12
    assert out["sparsity/always_on_frac/L0"] == 0
    # death judged over the whole probe set (12 tokens, enough here)
    assert out["sparsity/dead_count/L0"] == 7 and out["sparsity/dead_window_tokens"] == 12
    assert out["sparsity/sleeping_frac/L0"] == 0 and out["sparsity/dead_margin_median/L0"] == -1
    assert "sparsity/dead_fire_on_probe/L0" not in out  # judged on the probe set itself: it would read 0


def test_a_layer_without_dead_units_has_no_dead_unit_statistics():
    v = one_hot_view()
    (a,) = build("sparsity", v.shape, options={"sparsity": {"dead_source": "probe", "dead_min_tokens": 12}})
    out = measure(v, [a], torch.arange(12)[None], step=0).values  # every unit fires once
    assert out["sparsity/dead_count/L0"] == 0
    assert not {"sparsity/sleeping_frac/L0", "sparsity/dead_margin_median/L0"} & set(out)


def test_batch_usage_is_a_fixed_token_window_whatever_the_context_length():
    v = one_hot_view()
    tokens = torch.zeros(16, 1024, dtype=torch.long)  # 16 windows of 1024 tokens
    tokens[8:] = 5  # unit 5 fires only after the first 8192 tokens
    out = measure(v, build("sparsity", v.shape), tokens, step=0).values
    assert out["sparsity/batch_window_tokens"] == 8192 and out["sparsity/batch_usage/L0"] == pytest.approx(1 / 12)
    assert out["sparsity/freq_median/L0"] == 0 and out["sparsity/token_density_mean/L0"] == pytest.approx(1 / 12)


def test_death_is_judged_on_the_training_stream_over_enough_tokens():
    v = one_hot_view()
    (a,) = build("sparsity", v.shape, options={"sparsity": {"dead_min_tokens": 100}})
    assert a.training_hook_names() == ["blocks.0.mlp.hook_pre"]
    probe = torch.tensor([[2, 3]])
    a.observe_training("blocks.0.mlp.hook_pre", fire([0, 1] * 30))
    first = measure(v, [a], probe, step=1).values
    assert "sparsity/dead_count/L0" not in first  # 60 training tokens are too few to judge
    a.observe_training("blocks.0.mlp.hook_pre", fire([1, 2] * 30))
    second = measure(v, [a], probe, step=2).values  # 120 tokens since the start: units 0, 1, 2 fired
    assert second["sparsity/dead_count/L0"] == 9 and second["sparsity/dead_window_tokens"] == 120
    assert "sparsity/turned_off/L0" not in second  # the first judgement
    assert second["sparsity/dead_fire_on_probe/L0"] == 1  # unit 3: dead on training tokens, fires on the probe
    for loss, grad_norm in ((3.0, 1.0), (2.9, 2.0), (5.0, 9.0), (2.8, 1.0)):
        a.observe_step(loss, grad_norm)
    a.observe_training("blocks.0.mlp.hook_pre", fire([1] * 119 + [3]))
    third = measure(v, [a], probe, step=4).values
    assert third["sparsity/turned_off/L0"] == 2 and third["sparsity/revived/L0"] == 1  # 0 and 2 off, 3 back
    assert third["sparsity/never_fired/L0"] == 8  # on no training token since the start: all but 0, 1, 2, 3
    assert third["sparsity/dead_fire_on_probe/L0"] == 1  # unit 2 turned off on training tokens, fires on the probe
    assert third["sparsity/interval_grad_norm_max"] == 9.0
    assert third["sparsity/interval_loss_jump_max"] == pytest.approx(2.1)


def test_dead_units_turned_off_and_revived_on_a_real_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=50,
                                    context_length=16)).eval()
    v = TransformerView(model)
    tokens = torch.randint(0, 50, (8, 16))
    (a,) = build("sparsity", v.shape, options={"sparsity": {"dead_source": "probe", "dead_min_tokens": 128}})
    bias = model.blocks[0].mlp.fc_in.bias
    with torch.no_grad():
        bias[[1, 2]] = -100.0
    first = measure(v, [a], tokens, step=0).values
    assert first["sparsity/dead_count/L0"] == 2 and first["sparsity/dead_count/L1"] == 0
    assert "sparsity/turned_off/L0" not in first  # no previous judgement yet
    with torch.no_grad():
        bias[1] = 0.0
        bias[3] = -100.0
    second = measure(v, [a], tokens, step=1).values
    assert second["sparsity/dead_count/L0"] == 2
    assert second["sparsity/turned_off/L0"] == 1 and second["sparsity/revived/L0"] == 1  # unit 3 off, unit 1 back
    assert second["sparsity/never_fired/L0"] == 1  # unit 2
    assert second["sparsity/sleeping_frac/L0"] == 0.0  # −100 is far below zero


def _rank_main(rank: int) -> dict:
    v = one_hot_view()
    tokens = torch.tensor([[5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])  # unit 5 fires on rank 0 only
    (a,) = build("sparsity", v.shape, options={"sparsity": {"dead_min_tokens": 4}})
    a.observe_training("blocks.0.mlp.hook_pre", fire([7, 7] if rank == 0 else [8, 8]))  # one unit per rank
    saved = a.checkpoint_state()  # what a resume checkpoint keeps: reduced over ranks
    mine, first = shard(tokens, rank, 2)
    return {"values": measure(v, [a], mine, step=1, first_window=first).values,
            "saved_fired": torch.nonzero(saved["states"]["train_fired"][0]).flatten().tolist()}


def test_usage_and_the_training_stream_are_ors_over_ranks(two_ranks):
    results = two_ranks(_rank_main)
    for rank in (0, 1):
        values = results[rank]["values"]
        assert values["sparsity/batch_usage/L0"] == pytest.approx(3 / 12)  # units 0, 1, 5
        assert values["sparsity/dead_count/L0"] == 10 and values["sparsity/dead_window_tokens"] == 4  # 7 and 8 fired
        assert results[rank]["saved_fired"] == [7, 8]  # no rank's training units are lost on resume
    single = measure(one_hot_view(), build("sparsity", one_hot_view().shape), torch.tensor([[1, 1, 1, 1]] * 2), 0)
    assert single.values["sparsity/batch_usage/L0"] == pytest.approx(1 / 12)  # rank 1's shard alone misses 0 and 5


def test_gelu_uses_the_preactivation_sign():
    torch.manual_seed(0)
    v = TransformerView(Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, vocab_size=50,
                                                context_length=16, activation="gelu")).eval())
    tokens = torch.randint(0, 50, (4, 16))
    out = measure(v, build("sparsity", v.shape), tokens, step=0).values
    _, cache = v.run_with_cache(tokens, ["blocks.0.mlp.hook_pre"])
    active = (cache["blocks.0.mlp.hook_pre"] > 0).float().mean().item()
    assert out["sparsity/token_density_mean/L0"] == pytest.approx(active)
