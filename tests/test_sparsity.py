import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakes import FakeView
from torch import nn

from dynascope.analysis import build
from dynascope.analysis.measure import measure
from dynascope.analysis.probe import shard
from dynascope.analysis.view import TransformerView
from dynascope.train.model import HookPoint, ModelConfig, Transformer


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


def test_usage_and_density_on_planted_firing():
    v = one_hot_view()
    tokens = torch.tensor([[0, 0, 1, 1], [2, 3, 3, 3], [4, 4, 4, 4]])
    (a,) = build("sparsity", v.shape)
    out = measure(v, [a], tokens, step=0, batch_size=2).values
    assert out["sparsity/token_density_mean/L0"] == pytest.approx(1 / 12)  # one unit per token
    assert out["sparsity/seq_usage_mean/L0"] == pytest.approx((2 + 2 + 1) / 3 / 12)
    assert out["sparsity/batch_usage/L0"] == pytest.approx(5 / 12)
    assert out["sparsity/dead_count/L0"] == 7 and out["sparsity/batch_window_tokens"] == 12
    assert out["sparsity/always_on_frac/L0"] == 0
    assert out["sparsity/sleeping_frac/L0"] == 0 and out["sparsity/dead_margin_median/L0"] == -1


def test_dead_units_turned_off_revived_and_chance_null():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=50,
                                    context_length=16)).eval()
    v = TransformerView(model)
    tokens = torch.randint(0, 50, (8, 16))
    (a,) = build("sparsity", v.shape)
    bias = model.blocks[0].mlp.fc_in.bias
    with torch.no_grad():
        bias[[1, 2]] = -100.0
    first = measure(v, [a], tokens, step=0).values
    assert first["sparsity/dead_count/L0"] == 2 and first["sparsity/dead_count/L1"] == 0
    assert "sparsity/turned_off/L0" not in first  # no previous checkpoint yet
    with torch.no_grad():
        bias[1] = 0.0
        bias[3] = -100.0
    second = measure(v, [a], tokens, step=1).values
    assert second["sparsity/dead_count/L0"] == 2
    assert second["sparsity/turned_off/L0"] == 1 and second["sparsity/revived/L0"] == 1  # unit 3 off, unit 1 back
    assert second["sparsity/dead_since_init/L0"] == 1  # unit 2
    # the units alive before fired on a good share of 128 tokens: chance explains none of the turning off
    assert second["sparsity/dead_expected_chance/L0"] < 1e-3
    assert second["sparsity/sleeping_frac/L0"] == 0.0  # −100 is far below zero


def _rank_main(rank: int, path: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    v = one_hot_view()
    tokens = torch.tensor([[5, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])  # unit 5 fires on rank 0 only
    (a,) = build("sparsity", v.shape, options={"sparsity": {"train_batches": True}})
    training = [[7, 7]] if rank == 0 else [[8, 8]]  # each rank's training batch fires one unit
    a.observe_training("blocks.0.mlp.hook_pre", 2 * nn.functional.one_hot(torch.tensor(training), 12).float() - 1)
    mine, first = shard(tokens, rank, 2)
    results[rank] = measure(v, [a], mine, step=1, first_window=first).values
    dist.destroy_process_group()


def test_batch_usage_and_the_training_stream_are_ors_over_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        assert results[rank]["sparsity/batch_usage/L0"] == pytest.approx(3 / 12)  # units 0, 1, 5
        assert results[rank]["sparsity/dead_count/L0"] == 9
        assert results[rank]["sparsity/train_dead_frac/L0"] == pytest.approx(10 / 12)  # units 7 and 8
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


def test_training_stream_ors_the_units_seen_between_checkpoints():
    v = one_hot_view()
    (a,) = build("sparsity", v.shape, options={"sparsity": {"train_batches": True}})
    assert a.training_hook_names() == ["blocks.0.mlp.hook_pre"]
    for batch in (torch.tensor([[0, 1]]), torch.tensor([[1, 7]])):
        a.observe_training("blocks.0.mlp.hook_pre", 2 * nn.functional.one_hot(batch, 12).float() - 1)
    out = measure(v, [a], torch.tensor([[3, 3]]), step=1).values
    assert out["sparsity/train_dead_frac/L0"] == pytest.approx(9 / 12)  # units 0, 1, 7 fired in training
    assert out["sparsity/dead_count/L0"] == 11  # the probe set saw only unit 3
    assert "sparsity/train_dead_frac/L0" not in measure(v, [a], torch.tensor([[3, 3]]), step=2).values  # reset
