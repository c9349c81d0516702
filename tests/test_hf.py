"""Hugging Face views on tiny randomly initialised GPT-2, GPT-NeoX and Llama models (no download)."""

import pytest
import torch
from conftest import make_text

transformers = pytest.importorskip("transformers")

from dynascope.analysis.records import read_csv  # noqa: E402
from dynascope.analysis.report import write_report  # noqa: E402
from dynascope.analysis.runner import analyze_hf  # noqa: E402
from dynascope.analysis.view import HFModelView  # noqa: E402
from dynascope.train.data import DataConfig, train_tokenizer  # noqa: E402

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
    down = v._blocks[1].get_submodule(v._out_name)
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
    labels = ["step0", "step100", "step200"]
    report = analyze_hf(dirs, tmp_path / "out", labels, "all", DataConfig(source="files", paths=[str(corpus)]),
                        n_windows=8, context_length=48)
    assert [r.step for r in report.records] == [0, 100, 200] and not report.skipped
    for r, d in zip(report.records, dirs, strict=True):
        v = HFModelView.from_dir(d)
        norm = v.output_embeddings.norm(dim=-1).mean().item()
        assert r.values["basic/unembed_row_norm_mean"] == pytest.approx(norm, rel=1e-6)
        assert 5.0 < r.values["basic/probe_loss"] < 6.5  # ~log(320) for random models
    assert (tmp_path / "out" / "metrics.csv").exists() and (tmp_path / "out" / "probe.safetensors").exists()
    distance = [r.values["frequency/dist_to_final"] for r in report.records]  # to the last checkpoint given
    assert distance[-1] == 0 < distance[0]
    page = write_report(tmp_path / "out").read_text()  # the same page as for a run, against the labels' steps
    assert "checkpoints: step0, step100, step200" in page and "003 · Stable regions" in page


def test_analyze_command_uploads_the_table_to_wandb(tmp_path, capsys):
    import glob

    import wandb_reader

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
    (run_file,) = glob.glob(str(tmp_path / "out" / "wandb" / "*run-*" / "run-*.wandb"))
    logged = [r for r in wandb_reader.history(run_file) if "basic/probe_loss" in r]
    assert [r["trainer/global_step"] for r in logged] == [0, 1]  # ordered by directory name: a-ckpt first
    table = {r["label"]: r for r in read_csv(tmp_path / "out" / "metrics.csv")}
    assert logged[0]["basic/probe_loss"] == pytest.approx(table["a-ckpt"]["basic/probe_loss"])
