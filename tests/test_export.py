"""`dynascope export`: snapshots as Hugging Face GPT-2 checkpoints that compute what our model computes."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_text

transformers = pytest.importorskip("transformers")

from dynascope.cli import main  # noqa: E402
from dynascope.core.data import load_tokenizer, train_tokenizer  # noqa: E402
from dynascope.core.errors import DynascopeError  # noqa: E402
from dynascope.core.model import ModelConfig, Transformer  # noqa: E402
from dynascope.core.records import read_csv  # noqa: E402
from dynascope.core.runfiles import RunFiles  # noqa: E402
from dynascope.core.snapshots import load_snapshot, write_snapshot  # noqa: E402
from dynascope.export import export_run, push  # noqa: E402

EOS = "<|doc|>"  # not GPT-2's <|endoftext|>: the export must name the run's own EOS


def make_run(run: Path, steps=(0, 3), **arch) -> ModelConfig:
    """A run directory with the files export reads: config.yaml, tokenizer.json and snapshots whose every
    parameter (LayerNorm gains and biases included) is random, so a misplaced or untransposed weight shows."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=300, context_length=24, **arch)
    run.mkdir(parents=True)
    (RunFiles(run).config).write_text(yaml.safe_dump({"model": {"arch": vars(cfg)}, "data": {"eos_token": EOS}}))
    tok = train_tokenizer(iter([make_text(50)]), 290)
    tok.add_special_tokens([EOS])
    tok.save(str(RunFiles(run).tokenizer))
    model = Transformer(cfg)
    for step in steps:
        torch.manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        write_snapshot(run, step, model.state_dict(), {"tokens_seen": step * 100})
    return cfg


def ours(run: Path, cfg: ModelConfig, step: int) -> Transformer:
    model = Transformer(cfg)
    model.load_state_dict(load_snapshot(run, step))
    return model.eval()


def max_logit_difference(run: Path, cfg: ModelConfig, step: int, hf_dir: Path) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, cfg.vocab_size, (3, cfg.context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (hf(input_ids=x).logits - ours(run, cfg, step)(x)).abs().max().item()


@pytest.mark.parametrize("arch", [dict(activation="gelu", tie_embeddings=False, bias=True),
                                  dict(activation="relu", tie_embeddings=True, bias=False)])
def test_export_computes_our_logits(tmp_path, capsys, arch):
    cfg = make_run(tmp_path / "run", **arch)
    main(["export", str(tmp_path / "run"), "--step", "3", str(tmp_path / "hf")])
    assert capsys.readouterr().out.strip() == f"step 3: {tmp_path / 'hf'}"
    # 1e-5: GPT-2's tanh GELU ("gelu_new") would be off by ~3e-4 here
    assert max_logit_difference(tmp_path / "run", cfg, 3, tmp_path / "hf") <= 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.activation_function == arch["activation"] and hf.config.n_positions == 24
    tied = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert tied == arch["tie_embeddings"]
    biases = [p for name, p in hf.named_parameters() if name.endswith("bias")]
    assert all(b.abs().max() == 0 for b in biases) == (not arch["bias"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == hf.config.eos_token_id
    text = "The cat sat.<|doc|>A dog ran"
    assert tokenizer(text).input_ids == load_tokenizer(tmp_path / "run" / "tokenizer.json").encode(text).ids


def test_export_all_and_push_one_branch_per_step(tmp_path):
    cfg = make_run(tmp_path / "run")
    exports = export_run(tmp_path / "run", tmp_path / "out")
    assert exports == {0: tmp_path / "out" / "step0", 3: tmp_path / "out" / "step3"}

    class Hub:
        """Stands in for huggingface_hub.HfApi: records calls, keeps each revision's files in a folder."""

        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, exist_ok=False):
            self.calls.append(("create_repo", repo_id, exist_ok))

        def create_branch(self, repo_id, branch, exist_ok=False):
            self.calls.append(("create_branch", repo_id, branch, exist_ok))

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            self.calls.append(("upload_folder", repo_id, revision))
            shutil.copytree(folder_path, tmp_path / "hub" / revision)

    hub = Hub()
    push(exports, "me/tiny", api=hub)
    assert hub.calls == [("create_repo", "me/tiny", True),
                         ("create_branch", "me/tiny", "step0", True), ("upload_folder", "me/tiny", "step0"),
                         ("create_branch", "me/tiny", "step3", True), ("upload_folder", "me/tiny", "step3")]
    for step in (0, 3):  # each branch holds its own step's weights
        assert max_logit_difference(tmp_path / "run", cfg, step, tmp_path / "hub" / f"step{step}") <= 1e-5
    assert max_logit_difference(tmp_path / "run", cfg, 0, tmp_path / "hub" / "step3") > 0.1


@pytest.mark.parametrize("arch, option", [(dict(activation="swiglu"), "model.arch.activation"),
                                          (dict(norm="rmsnorm"), "model.arch.norm")])
def test_export_refuses_what_gpt2_cannot_hold(tmp_path, capsys, arch, option):
    make_run(tmp_path / "run", steps=(0,), **arch)
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "run"), "--all", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert option in err and "gelu or relu, norm layernorm" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DynascopeError, match="--step 5: .* no snapshot"):
        export_run(tmp_path / "run", tmp_path / "out", step=5)


def test_exported_run_analyzes_as_the_run(tiny_run, tmp_path):
    """`analyze --hf` over the exports, on the run's probe windows and counts, gives the native replay's numbers."""
    steps = sorted(int(r["step"]) for r in read_csv(RunFiles(tiny_run).analysis.metrics_csv))
    main(["export", str(tiny_run), "--all", str(tmp_path / "hf")])
    options = '{"regions": {"pairs_per_window": 1}, "sparsity": {"dead_min_tokens": 256}}'  # as the run's config
    exports = sorted(str(tmp_path / "hf" / f"step{s}") for s in steps)  # as a shell glob gives them: step0 step1 ...
    main(["analyze", "--hf", *exports, "--out", str(tmp_path / "out"), "--probe", str(RunFiles(tiny_run).probe),
          "--counts", str(RunFiles(tiny_run).counts), "--tokens_per_step", "128", "--options", options, "--no_plot"])
    native = {int(r["step"]): r for r in read_csv(RunFiles(tiny_run).analysis.metrics_csv)}
    exported = {int(r["step"]): r for r in read_csv(tmp_path / "out" / "metrics.csv")}
    assert sorted(exported) == steps
    shared = (set(native[steps[-1]]) & set(exported[steps[-1]])) - {"label"}
    assert len(shared) > 50 and {"tokens_seen", "frequency/r2_corpus", "regions/sharpness_median/L1",
                                 "sparsity/batch_usage/L1", "vocab/agree_final/L0", "outliers/count"} <= shared
    differences = {}
    for s in steps:
        for key in shared:
            a, b = native[s][key], exported[s][key]
            assert (a != a) == (b != b), (s, key)  # NaN in both or in neither
            if a == a:
                differences[(s, key)] = abs(a - b)
    worst = max(differences, key=differences.get)
    print(f"max |Δ| {differences[worst]:.2e} at {worst} over {len(differences)} values")
    assert differences[worst] <= 1e-4


def test_export_never_deletes_what_it_did_not_write(tmp_path, capsys):
    cfg = make_run(tmp_path / "run")
    out = tmp_path / "mymodels"
    (out / "other").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "other" / "a.bin").write_bytes(b"\x00\x01")
    (out / "config.json").write_text("{}")  # a stale file of the export's own name
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "run"), "--step", "3", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt", "other"]
    assert (out / "config.json").read_text() == "{}"

    main(["export", str(tmp_path / "run"), "--step", "3", str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "other" / "a.bin").read_bytes() == b"\x00\x01"
    assert max_logit_difference(tmp_path / "run", cfg, 3, out) <= 1e-5  # config.json replaced by the export's
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mymodels")]  # no temporary directory left

    main(["export", str(tmp_path / "run"), "--all", str(out)])  # beside the other files, in new stepN folders
    assert (out / "notes.txt").read_text() == "mine" and (out / "step0" / "config.json").is_file()
    with pytest.raises(DynascopeError, match="step0 is not empty"):  # every target checked before any is written
        export_run(tmp_path / "run", out)


LOAD_AND_GENERATE = """
import json, os, stat, sys
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed
path, eos, context = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
assert tokenizer.pad_token == eos and tokenizer.eos_token == eos, (tokenizer.pad_token, tokenizer.eos_token)
assert model.generation_config.max_length == context and model.generation_config.pad_token_id == tokenizer.eos_token_id
generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
lengths = []
for seed in range(20):
    set_seed(seed)
    ids = generate("The cat", do_sample=True, return_tensors=True)[0]["generated_token_ids"]
    lengths.append(len(ids))
modes = {oct(stat.S_IMODE(os.stat(os.path.join(path, f)).st_mode)) for f in os.listdir(path)}
print(json.dumps({"version": transformers.__version__, "lengths": lengths, "modes": sorted(modes)}))
"""


@pytest.mark.parametrize("major", [4, 5])
def test_exports_load_and_generate_on_both_transformers_majors(tmp_path, major):
    """transformers 4.x runs from .tf4 (the Makefile installs it beside the venv's 5.x)."""
    import json
    import os
    import subprocess
    import sys

    tf4 = Path(__file__).parents[1] / ".tf4"
    assert major == 5 or tf4.is_dir(), "transformers 4.x is missing: run `make install`"
    make_run(tmp_path / "run")
    old_mask = os.umask(0o027)  # a group-readable umask: every exported file follows it
    try:
        main(["export", str(tmp_path / "run"), "--step", "3", str(tmp_path / "hf")])
    finally:
        os.umask(old_mask)
    env = os.environ | ({"PYTHONPATH": str(tf4)} if major == 4 else {})
    done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(tmp_path / "hf"), EOS, "24"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"].startswith(f"{major}.")
    assert len(result["lengths"]) == 20 and max(result["lengths"]) <= 24  # generation stops at the context
    assert result["modes"] == ["0o640"]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "step 3, after 300 training tokens" in card and str((tmp_path / "run").resolve()) in card
    assert "library_name: transformers" in card and "n_layers: 2" in card
