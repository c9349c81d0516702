import math

import pytest
import torch
import torch.nn.functional as F

from dynascope.analysis.view import TransformerView
from dynascope.core.model import ModelConfig, Transformer


def small(activation="relu", norm="layernorm", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, vocab_size=50, context_length=12,
                      activation=activation, norm=norm, **kw)
    m = Transformer(cfg).eval()
    for p in m.parameters():  # non-trivial norms and biases so the hand computation checks them
        if p.ndim == 1:
            p.data += 0.1 * torch.randn_like(p)
    return m


def by_hand(m: Transformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hook point computed directly from the weights with explicit matrix products."""
    c = m.cfg
    out = {}

    def norm(mod, h):
        if c.norm == "rmsnorm":
            return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * mod.weight
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * mod.weight + (mod.bias if mod.bias is not None else 0)

    T = x.shape[1]
    out["hook_embed"] = m.wte.weight[x]
    h = out["hook_embed"] + m.wpe.weight[:T]
    dh = c.d_model // c.n_heads
    mask = torch.ones(T, T).tril().bool()
    for layer, b in enumerate(m.blocks):
        out[f"blocks.{layer}.hook_resid_pre"] = h
        a = norm(b.ln1, h)
        out[f"blocks.{layer}.ln1.hook_normalized"] = a
        q, k, v = (a @ b.attn.qkv.weight.T + b.attn.qkv.bias).split(c.d_model, -1)
        out[f"blocks.{layer}.attn.hook_k"], out[f"blocks.{layer}.attn.hook_v"] = k, v
        heads = []
        for i in range(c.n_heads):
            s = slice(i * dh, (i + 1) * dh)
            scores = (q[..., s] @ k[..., s].transpose(-1, -2)) / math.sqrt(dh)
            heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[..., s])
        h = h + torch.cat(heads, -1) @ b.attn.proj.weight.T + b.attn.proj.bias
        out[f"blocks.{layer}.hook_resid_mid"] = h
        a = norm(b.ln2, h)
        out[f"blocks.{layer}.ln2.hook_normalized"] = a
        pre = a @ b.mlp.fc_in.weight.T + b.mlp.fc_in.bias
        post = pre.clamp_min(0) if c.activation == "relu" else F.gelu(pre)
        out[f"blocks.{layer}.mlp.hook_pre"], out[f"blocks.{layer}.mlp.hook_post"] = pre, post
        h = h + post @ b.mlp.fc_out.weight.T + b.mlp.fc_out.bias
        out[f"blocks.{layer}.hook_resid_post"] = h
    out["ln_final.hook_normalized"] = norm(m.ln_final, h)
    out["logits"] = out["ln_final.hook_normalized"] @ m.unembed.weight.T
    return out


@pytest.mark.parametrize("activation,norm", [("relu", "layernorm"), ("gelu", "rmsnorm")])
def test_cached_activations_match_hand_computation(activation, norm):
    m = small(activation, norm)
    x = torch.randint(0, 50, (3, 12))
    expected = by_hand(m, x)
    names = [n for n in expected if n != "logits"]
    view = TransformerView(m)
    assert set(names) == set(view.points)
    logits, cache = view.run_with_cache(x, names)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)
    for n in names:
        torch.testing.assert_close(cache[n], expected[n], rtol=1e-4, atol=1e-5, msg=n)


def test_cache_holds_only_requested_names_and_rejects_unknown():
    m = small()
    x = torch.randint(0, 50, (2, 12))
    logits, cache = TransformerView(m).run_with_cache(x, ["blocks.1.mlp.hook_post"])
    assert list(cache) == ["blocks.1.mlp.hook_post"] and cache["blocks.1.mlp.hook_post"].shape == (2, 12, 32)
    cached = cache["blocks.1.mlp.hook_post"]
    torch.testing.assert_close(logits, m(x))
    m(torch.randint(0, 50, (3, 12)))
    assert cache["blocks.1.mlp.hook_post"] is cached  # the hook is gone: a later pass writes nothing
    with pytest.raises(KeyError, match="blocks.7.hook_resid_post"):
        TransformerView(m).run_with_cache(x, ["blocks.7.hook_resid_post"])


def test_patch_residual_overwrites_one_position_and_acts_causally():
    view = TransformerView(small())
    x = torch.randint(0, 50, (2, 12))
    clean, cache = view.run_with_cache(x, ["blocks.0.hook_resid_post"])
    same, _ = view.patch_residual(x, "blocks.0.hook_resid_post", 5, cache["blocks.0.hook_resid_post"][:, 5])
    torch.testing.assert_close(same, clean)
    v = torch.randn(2, 16)
    patched, pc = view.patch_residual(x, "blocks.0.hook_resid_post", 5, v, names=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(pc["blocks.1.hook_resid_pre"][:, 5], v)
    torch.testing.assert_close(patched[:, :5], clean[:, :5])  # earlier positions cannot see position 5
    assert (patched[:, 5:] - clean[:, 5:]).abs().amax() > 1e-3


def test_parameter_count_and_flops():
    m = small()
    c = m.cfg
    d, f, V, L, T = c.d_model, c.d_mlp, c.vocab_size, c.n_layers, c.context_length
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    n = V * d + L * per_block + 2 * d + V * d  # wte, blocks, final norm, unembedding (no wpe)
    assert m.num_params() == n
    assert m.flops_per_token() == 6 * n + 12 * L * d * T
    tied = small(tie_embeddings=True)
    assert tied.num_params() == n - V * d and tied.unembed.weight is tied.wte.weight


def test_variants_and_config_errors():
    for act in ("relu2", "swiglu"):
        m = small(act)
        _, cache = TransformerView(m).run_with_cache(torch.randint(0, 50, (1, 12)), ["blocks.0.mlp.hook_post"])
        assert cache["blocks.0.mlp.hook_post"].shape == (1, 12, 32)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="tanh")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="context_length"):
        small()(torch.zeros(1, 13, dtype=torch.long))


def test_compiled_forward_matches_eager_and_hooks_still_work():
    m = small()
    x = torch.randint(0, 50, (2, 12))
    compiled = torch.compile(m.forward)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
    _, cache = TransformerView(m).run_with_cache(x, ["ln_final.hook_normalized"])
    assert cache["ln_final.hook_normalized"].shape == (2, 12, 16)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-5)
