import math

import pytest
import torch
import torch.nn.functional as F

from dynascope.analysis import build, resolve
from dynascope.analysis.base import LOGSUMEXP, PROBS, TOP1
from dynascope.analysis.measure import measure, probe_pass
from dynascope.analysis.view import TransformerView
from dynascope.core.errors import DynascopeError
from dynascope.core.model import ModelConfig, Transformer
from dynascope.core.probe import sample_probe, shard


def view() -> TransformerView:
    torch.manual_seed(0)
    return TransformerView(Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=40,
                                                   context_length=10)).eval())


def test_basic_matches_direct_computation_and_is_batch_size_independent():
    v = view()
    tokens = torch.randint(0, 40, (7, 10))
    (a,) = build("basic", v.shape)
    values = measure(v, [a], tokens, step=0, batch_size=3).values
    logits, cache = v.run_with_cache(tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
    assert values["basic/probe_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert values["basic/resid_norm/L1"] == pytest.approx(cache["blocks.1.hook_resid_post"].norm(dim=-1).mean().item(),
                                                          rel=1e-6)
    rows = v.output_embeddings.norm(dim=-1)
    assert values["basic/unembed_row_norm_max"] == pytest.approx(rows.max().item(), rel=1e-6)
    again = measure(v, [a], tokens, step=1, batch_size=7).values  # reset between checkpoints, no carry-over
    assert again == pytest.approx(values, rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 3000.0])
def test_probe_pass_computes_the_next_token_distribution_once_for_every_analysis(scale):
    """PROBS, LOGSUMEXP (taken from the top token's probability) and TOP1 agree with torch's own, also for logits
    in the hundreds, where a plain exp overflows."""
    v = view()
    with torch.no_grad():
        v.model.unembed.weight.mul_(scale)
        logits, cache = probe_pass(v, torch.randint(0, 40, (5, 10)), [PROBS, LOGSUMEXP, TOP1])
    assert logits.exp().isinf().any() == (scale > 1)
    assert torch.allclose(cache[PROBS], logits.softmax(-1), atol=1e-6)
    assert torch.allclose(cache[LOGSUMEXP], logits.logsumexp(-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(cache[TOP1], logits.argmax(-1))
    _, plain = probe_pass(v, torch.randint(0, 40, (5, 10)), ["blocks.0.hook_resid_post"])
    assert set(plain) == {"blocks.0.hook_resid_post"}  # nothing is computed that no analysis asked for


def test_registry_resolves_names():
    assert resolve("all") == ["basic", "outliers", "frequency", "regions", "sparsity", "vocab"]  # import order
    assert resolve("basic") == ["basic"]
    with pytest.raises(DynascopeError, match="unknown analyses"):
        resolve("basic,nonsense")


def test_probe_is_seeded_and_shards_cover_it():
    val = torch.arange(1000).numpy()
    p = sample_probe(val, 9, 20, seed=3)
    assert torch.equal(p, sample_probe(val, 9, 20, seed=3)) and not torch.equal(p, sample_probe(val, 9, 20, seed=4))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 20)) for row in p)  # contiguous windows
    parts = [shard(p, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([t for t, _ in parts]), p) and len(parts[0][0]) == 5 and parts[1][1] == 5
    batches = [shard(p, r, 3, unit=2) for r in range(3)]  # 5 batches of at most 2 windows over 3 ranks
    assert [(len(t), first) for t, first in batches] == [(4, 0), (4, 4), (1, 8)]
    assert len(shard(p, 5, 6, unit=4)[0]) == 0  # more ranks than batches
    with pytest.raises(DynascopeError, match="fewer than one probe window"):
        sample_probe(val[:10], 2, 20)


def test_view_exposes_weights():
    v = view()
    E = v.output_embeddings
    assert v.mlp_values(1).shape == (32, 16) and v.mlp_in(0).shape == (32, 16) and E.shape == (40, 16)
    h = torch.randn(3, 16)
    torch.testing.assert_close(v.unembed(v.final_norm(h)), v.model.unembed(v.model.ln_final(h)))
    assert v.shape.is_relu and not math.isnan(E.sum().item())


def test_analysis_package_imports_no_lightning():
    import subprocess
    import sys

    code = ("import sys, dynascope.analysis.replay, dynascope.pages.plots, dynascope.cli, dynascope.analyze; "
            "print(any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
