"""The notebook API: one model measured through three views (ours, transformers, TransformerLens) gives the same
numbers; missing inputs are errors; a run reads back as DataFrames; the README's notebook section runs."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynascope
from dynascope.analysis.view import HFModelView
from dynascope.core.errors import DynascopeError
from dynascope.core.model import ModelConfig, Transformer
from dynascope.export import gpt2_weights

CONFIG = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=64, context_length=16,
                     activation="relu", bias=True)
README = Path(__file__).parents[1] / "README.md"


def three_views(cfg: ModelConfig = CONFIG):
    """One random model as dynascope's Transformer, a transformers GPT-2 and a TransformerLens HookedTransformer."""
    transformers = pytest.importorskip("transformers")
    lens = pytest.importorskip("transformer_lens")
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function=cfg.activation, layer_norm_epsilon=1e-5,
        tie_word_embeddings=cfg.tie_embeddings)).eval()
    hf.load_state_dict(gpt2_weights(cfg, ours.state_dict()), strict=True)
    tl_cfg = lens.HookedTransformerConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.context_length,
                                          d_head=cfg.d_model // cfg.n_heads, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp,
                                          d_vocab=cfg.vocab_size, act_fn=cfg.activation, normalization_type="LN",
                                          eps=1e-5)
    tl = lens.HookedTransformer(tl_cfg).eval()
    tl.load_state_dict(convert_gpt2_weights(hf, tl_cfg), strict=False)
    return ours, hf, tl


def test_three_views_of_one_model_measure_the_same():
    models = three_views()
    probe = torch.randint(0, CONFIG.vocab_size, (12, CONFIG.context_length), generator=torch.Generator().manual_seed(1))
    counts = np.random.default_rng(0).integers(10, 1000, CONFIG.vocab_size)
    frames = [dynascope.measure(m, probe=probe, analyses="sparsity,outliers,vocab,frequency", counts=counts,
                                batch_size=5) for m in models]
    ours = frames[0]
    assert list(ours.index) == [0] and ours.shape[1] > 20
    assert 0.3 < ours.loc[0, "sparsity/token_density_mean/L0"] < 0.7  # a random ReLU unit fires on about half
    for other in frames[1:]:
        assert set(other.columns) == set(ours.columns)
        for key in ours.columns:
            assert other.loc[0, key] == pytest.approx(ours.loc[0, key], rel=1e-3, abs=1e-4, nan_ok=True), key


def test_checkpoints_in_order_carry_from_one_to_the_next():
    torch.manual_seed(0)
    first, second = Transformer(CONFIG).eval(), Transformer(CONFIG).eval()
    probe = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.context_length))
    counts = np.full(CONFIG.vocab_size, 100)
    frame = dynascope.measure({0: first, 10: second}, probe=probe, analyses="frequency", counts=counts)
    assert list(frame.index) == [0, 10]
    change = (second.unembed.weight - first.unembed.weight).norm() / second.unembed.weight.norm() / 10
    assert np.isnan(frame.loc[0, "frequency/wu_change_per_step"])  # nothing before the first checkpoint
    assert frame.loc[10, "frequency/wu_change_per_step"] == pytest.approx(change.item(), rel=1e-4)


def test_missing_or_wrong_inputs_are_errors():
    model = Transformer(CONFIG).eval()
    probe = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.context_length))
    with pytest.raises(DynascopeError, match="frequency needs counts="):
        dynascope.measure(model, probe=probe, analyses="frequency")
    with pytest.raises(DynascopeError, match="longer than the model's context"):
        dynascope.measure(model, probe=torch.zeros(2, 40, dtype=torch.long), analyses="sparsity")
    with pytest.raises(DynascopeError, match="Linear is not a model dynascope can view"):
        dynascope.measure(nn.Linear(3, 3), probe=probe)
    with pytest.raises(DynascopeError, match="not a Hugging Face causal LM"):
        HFModelView(nn.Linear(3, 3))


def test_load_run_reads_a_run_as_dataframes(tiny_run):
    run = dynascope.load_run(tiny_run)
    assert list(run.metrics.index) == sorted(run.metrics.index) and run.metrics.index[-1] == 7
    assert run.metrics.loc[7, "sparsity/batch_usage/L0"] == pytest.approx(
        dynascope.load_run(tiny_run).metrics["sparsity/batch_usage/L0"].iloc[-1])
    assert set(run.onsets.index) == {k.removesuffix("_step") for k in run.summary if k.endswith("_step")}


def test_the_readme_notebook_section_runs(tiny_run, monkeypatch):
    pytest.importorskip("transformer_lens")
    section = README.read_text().split("### From a notebook", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code.replace("runs/demo", str(tiny_run)), "README notebook section", "exec"), scope)
    assert {"hf", "lens", "run"} <= set(scope)
    assert scope["hf"].shape == (1, scope["lens"].shape[1])  # the same keys from both models
    assert scope["run"].metrics.index[-1] == 7


def test_the_three_views_give_the_same_weights():
    from dynascope.analysis.view import view_of

    views = [view_of(m) for m in three_views()]
    ours = views[0]
    for view in views[1:]:
        assert view.shape == ours.shape
        torch.testing.assert_close(view.output_embeddings, ours.output_embeddings)
        torch.testing.assert_close(view.final_norm_gain(), ours.final_norm_gain())
        torch.testing.assert_close(view.final_norm_bias(), ours.final_norm_bias())
        for layer in range(CONFIG.n_layers):
            torch.testing.assert_close(view.mlp_in(layer), ours.mlp_in(layer))
            torch.testing.assert_close(view.mlp_values(layer), ours.mlp_values(layer))
            torch.testing.assert_close(view.mlp_out_bias(layer), ours.mlp_out_bias(layer))
