"""Export snapshots as Hugging Face GPT-2 checkpoints, and push them to the hub one branch per step.

Our `Transformer` with a LayerNorm and a GELU or ReLU MLP computes what `GPT2LMHeadModel` computes:
the same pre-LN block, fused q/k/v projection and learned positions. The weights are transposed into
GPT-2's Conv1D layout ([in, out]); a model without biases gets zero biases; the activation is HF's
"gelu" (the exact erf GELU of `F.gelu`; "gelu_new" is GPT-2's tanh approximation) or "relu". Each
export is a directory that `AutoModelForCausalLM`, `AutoTokenizer` and `pipeline` load on transformers 4
and 5: the run's tokenizer as a `PreTrainedTokenizerFast` (the class both majors know) with its
end-of-document token as EOS and padding, a generation config that stops at the context length, and a
model card (README.md) with the run's config, the step, the tokens seen and where the run is. Files get
the user's umask's mode. Pushed to the hub, step N is the branch `stepN`, as in Pythia.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dynascope.core.data import EOS, load_tokenizer
from dynascope.core.errors import DynascopeError, first_line, require
from dynascope.core.io import fsync_dir, read_yaml, settle
from dynascope.core.model import ModelConfig
from dynascope.core.runfiles import RunFiles
from dynascope.core.snapshots import load_snapshot, read_manifest

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DynascopeError("exporting to Hugging Face needs the hf extra: pip install 'dynascope[hf]'") from None
    return transformers


def gpt2_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our snapshot's weights under GPT2LMHeadModel's names, linear weights transposed to [in, out]."""

    def bias(name: str, size: int) -> torch.Tensor:
        return weights.get(name, torch.zeros(size))

    d = cfg.d_model
    out = {"transformer.wte.weight": weights["wte.weight"], "transformer.wpe.weight": weights["wpe.weight"],
           "transformer.ln_f.weight": weights["ln_final.weight"], "transformer.ln_f.bias": bias("ln_final.bias", d),
           "lm_head.weight": weights["unembed.weight"]}
    for l in range(cfg.n_layers):
        ours, theirs = f"blocks.{l}.", f"transformer.h.{l}."
        for a, b, size in (("ln1", "ln_1", d), ("ln2", "ln_2", d)):
            out[theirs + b + ".weight"] = weights[ours + a + ".weight"]
            out[theirs + b + ".bias"] = bias(ours + a + ".bias", size)
        for a, b, size in (("attn.qkv", "attn.c_attn", 3 * d), ("attn.proj", "attn.c_proj", d),
                           ("mlp.fc_in", "mlp.c_fc", cfg.d_mlp), ("mlp.fc_out", "mlp.c_proj", d)):
            out[theirs + b + ".weight"] = weights[ours + a + ".weight"].T.contiguous()
            out[theirs + b + ".bias"] = bias(ours + a + ".bias", size)
    return out


def check_target(out_dir: Path, overwrite: bool) -> None:
    """An export goes into a new or empty directory; with `overwrite` into any directory, where it replaces
    only the files it writes itself."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DynascopeError(f"export target {out_dir} is a file; give a directory")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DynascopeError(f"export target {out_dir} is not empty; give a new or empty directory, or --overwrite "
                             "to replace the export's own files in it (other files are left alone)")


def export_snapshot(run_dir: str | Path, step: int, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the run's snapshot at `step` to `out_dir` as a GPT-2 model directory with the run's tokenizer.
    Files of `out_dir` that the export does not write are never touched (see `check_target`)."""
    run, out_dir = RunFiles(run_dir), Path(out_dir)
    check_target(out_dir, overwrite)
    config = read_yaml(run.config, "run config")
    cfg = ModelConfig(**config["model"]["arch"])
    supported = "export writes GPT-2 checkpoints: activation gelu or relu, norm layernorm"
    require(cfg.activation in ("gelu", "relu"), "model.arch.activation", cfg.activation, supported)
    require(cfg.norm == "layernorm", "model.arch.norm", cfg.norm, supported)
    eos = (config.get("data") or {}).get("eos_token") or EOS
    eos_id = load_tokenizer(run.tokenizer).token_to_id(eos)
    if eos_id is None:
        raise DynascopeError(f"{run.tokenizer} has no {eos} token (the run's data.eos_token)")
    t = _transformers()
    hf_config = t.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                             n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                             activation_function=cfg.activation, layer_norm_epsilon=1e-5,  # as train/model.py
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
                             pad_token_id=eos_id)
    model = t.GPT2LMHeadModel(hf_config)
    model.load_state_dict(gpt2_weights(cfg, load_snapshot(run_dir, step)), strict=True)
    # generation past the learned positions would index beyond them: stop at the context length
    model.generation_config = t.GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                                 max_length=cfg.context_length)
    tokenizer = t.PreTrainedTokenizerFast(tokenizer_file=str(run.tokenizer), eos_token=eos, pad_token=eos,
                                          model_max_length=cfg.context_length)
    # written beside the target, then each file renamed into it: an interrupted export leaves no half file
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        settings = tmp / "tokenizer_config.json"  # transformers 5 names its own backend, which 4.x cannot load
        fast = json.loads(settings.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
        settings.write_text(json.dumps(fast, indent=2))
        model_card(run, config, step).save(tmp / "README.md")
        out_dir.mkdir(exist_ok=True)
        for path in tmp.iterdir():
            settle(path)
            os.replace(path, out_dir / path.name)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def model_card(run: RunFiles, config: dict, step: int):
    """The export's model card: what the checkpoint is (step, tokens seen), the run it comes from, its config."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    entry = read_manifest(run.root)[step]
    arch = config["model"]["arch"]
    wandb = run.wandb_id.read_text().strip() if run.wandb_id.exists() else None
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=["dynascope", "gpt2"])
    text = "\n".join([
        f"---\n{data.to_yaml()}\n---", "", f"# {run.root.resolve().name}, step {step}", "",
        f"A snapshot of a dynascope pretraining run: a {arch['n_layers']}-layer {arch['activation']} transformer "
        f"(d_model {arch['d_model']}, context {arch['context_length']}) at step {step}, after "
        f"{entry.get('tokens_seen', float('nan')):,.0f} training tokens, exported as a GPT-2 checkpoint.", "",
        f"- run directory: `{run.root.resolve()}`", f"- wandb run id: `{wandb}`" if wandb else "- wandb: none",
        f"- snapshot sha256: `{entry['sha256']}`", "", "## Run config", "", "```yaml",
        yaml.safe_dump(config, sort_keys=False).strip(), "```", ""])
    return ModelCard(text)


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None,
               overwrite: bool = False) -> dict[int, Path]:
    """Export one snapshot into `out_dir`, or (`step` None) every snapshot into `out_dir/stepN`; every target
    is checked before the first is written."""
    manifest = read_manifest(run_dir)
    if not manifest:
        raise DynascopeError(f"{RunFiles(run_dir).snapshots} holds no snapshots to export")
    if step is not None and step not in manifest:
        raise DynascopeError(f"--step {step}: {run_dir} has no snapshot at that step (have {sorted(manifest)})")
    targets = {step: Path(out_dir)} if step is not None else {s: Path(out_dir) / f"step{s}" for s in sorted(manifest)}
    for target in targets.values():
        check_target(target, overwrite)
    return {s: export_snapshot(run_dir, s, target, overwrite) for s, target in targets.items()}


def push(exports: dict[int, Path], repo_id: str, api: HfApi | None = None) -> None:
    """Upload each export to the hub repo `repo_id` as its branch `stepN` (created if missing)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        for step, folder in sorted(exports.items()):
            api.create_branch(repo_id, branch=f"step{step}", exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder, revision=f"step{step}",
                              commit_message=f"dynascope snapshot at step {step}")
    except Exception as e:  # a bad id, no token or access (hub errors), no network (its HTTP library's own errors)
        raise DynascopeError(f"--push {repo_id}: {first_line(e)}; check the network and `hf auth login`, "
                             "then push again (the export stays on disk)") from None
