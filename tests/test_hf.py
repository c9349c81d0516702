"""Hugging Face views on tiny randomly initialised GPT-2, GPT-NeoX and Llama models (no download)."""

import pytest
import torch
from helpers import make_text

transformers = pytest.importorskip("transformers")

from dynascope.analysis.view import HFModelView  # noqa: E402
from dynascope.analyze import AnalyzeRequest, analyze  # noqa: E402
from dynascope.core.data import train_tokenizer  # noqa: E402
from dynascope.core.probe import load_probe  # noqa: E402
from dynascope.core.records import read_csv  # noqa: E402

SIZES = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                                      activation_function="relu")
    elif kind == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(**SIZES, max_position_embeddings=64)
    else:
        cfg = transformers.LlamaConfig(**SIZES, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_hf_hooks_match_hidden_states(kind):
    model = tiny(kind)
    v = HFModelView(model)
    x = torch.randint(0, 320, (2, 12))
    names = ["hook_embed", "ln_final.hook_normalized", "blocks.1.mlp.hook_post"] + [
        f"blocks.{l}.hook_resid_{w}" for l in range(2) for w in ("pre", "post")]
    logits, cache = v.run_with_cache(x, names)
    out = model(input_ids=x, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, block 0 output, final-normed last block output
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], hs[0])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hs[1])
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hs[1])
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hs[2])
    torch.testing.assert_close(v.final_norm(cache["blocks.1.hook_resid_post"]), hs[2])
    torch.testing.assert_close(v.unembed(cache["ln_final.hook_normalized"]), logits, rtol=1e-4, atol=1e-5)
    # the MLP output is hook_post times the value vectors (plus the output bias, where there is one)
    post = cache["blocks.1.mlp.hook_post"]
    down = model.get_submodule({"gpt2": "transformer.h.1.mlp.c_proj", "gpt_neox": "gpt_neox.layers.1.mlp.dense_4h_to_h",
                                "llama": "model.layers.1.mlp.down_proj"}[kind])
    bias = down.bias if getattr(down, "bias", None) is not None else 0
    torch.testing.assert_close(post @ v.mlp_values(1) + bias, down(post))
    assert cache["blocks.1.mlp.hook_post"].shape == (2, 12, 64) and v.mlp_values(1).shape == (64, 32)
    assert v.mlp_in(0).shape == (64, 32) and v.shape.d_mlp == 64 and v.shape.n_layers == 2
    patched, pc = v.patch_residual(x, "blocks.1.hook_resid_pre", 4, torch.zeros(2, 32), ["blocks.1.hook_resid_pre"])
    assert pc["blocks.1.hook_resid_pre"][:, 4].abs().max() == 0
    torch.testing.assert_close(patched[:, :4], logits[:, :4])


def test_analyze_hf_runs_on_saved_checkpoints(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(300))
    tok = train_tokenizer(iter([corpus.read_text()]), 320)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    dirs = []
    for i, kind in enumerate(["gpt2", "gpt_neox", "llama"]):
        d = tmp_path / f"{kind}-step{i * 100}"
        tiny(kind).save_pretrained(d)
        fast.save_pretrained(d)
        dirs.append(d)
    request = AnalyzeRequest(hf=[str(d) for d in dirs], out=str(tmp_path / "out"),
                             labels=["step0", "step100", "step200"], data=[str(corpus)], probe_windows=8,
                             context_length=48)
    outcome = analyze(request)
    assert outcome.steps == [0, 100, 200] and not outcome.skipped
    rows = read_csv(outcome.files.metrics_csv)
    for r, d in zip(rows, dirs, strict=True):
        v = HFModelView.from_dir(d)
        norm = v.output_embeddings.norm(dim=-1).mean().item()
        assert r["basic/unembed_row_norm_mean"] == pytest.approx(norm, rel=1e-6)
        assert 5.0 < r["basic/probe_loss"] < 6.5  # ~log(320) for random models
    assert outcome.files.probe.exists() and load_probe(outcome.files.probe).shape == (8, 48)
    distance = [r["frequency/dist_to_final"] for r in rows]  # to the last checkpoint given
    assert distance[-1] == 0 < distance[0]
    page = (outcome.files.report / "index.html").read_text()  # the same page as a run's, against the labels' steps
    assert "checkpoints: step0, step100, step200" in page and "Stable regions in the residual stream" in page


def test_analyze_command_records_to_a_wandb_run_of_its_own(tmp_path, capsys, fake_wandb):
    from dynascope.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(200))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(iter([corpus.read_text()]), 320),
                                                eos_token="<|endoftext|>")
    dirs = []
    for name in ("b-ckpt", "a-ckpt"):
        tiny("gpt2").save_pretrained(tmp_path / name)
        fast.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
    main(["analyze", "--hf", *dirs, "--out", str(tmp_path / "out"), "--analyses", "basic", "--data", str(corpus),
          "--wandb"])
    assert "overview: " in capsys.readouterr().out
    (run,) = fake_wandb.runs
    assert run.init["job_type"] == "analyze" and run.init["group"] == f"hf-{dirs[0]}" and run.init["id"] is None
    assert run.init["config"]["checkpoints"] == dirs and run.exit_code == 0
    logged = [r for r in run.history if "basic/probe_loss" in r]
    assert [r["trainer/global_step"] for r in logged] == [0, 1]  # ordered by directory name: a-ckpt first
    assert {"report", "plots/overview"} <= {k for r in run.history for k in r}
    table = {r["label"]: r for r in read_csv(tmp_path / "out" / "metrics.csv")}
    assert logged[0]["basic/probe_loss"] == pytest.approx(table["a-ckpt"]["basic/probe_loss"])
