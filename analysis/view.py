"""Model views: the only thing analyses know about a model, and the one place hooks live.

A view exposes `run_with_cache(tokens, names)` with TransformerLens hook names, residual patching at
(hook name, position), the unembedding as `output_embeddings` ([V, d]: row v is token v's output
embedding, the orientation of Hugging Face's `get_output_embeddings().weight`; TransformerLens's
`W_U` is its transpose) with an optional `output_bias`, the final norm as a callable, each MLP's input
and value vectors, and the model's `shape`. `TransformerView` views dynascope's own `Transformer`;
`HFModelView` maps Hugging Face GPT-2, GPT-NeoX (Pythia) and Llama-family (OLMo-2, SmolLM) causal
LMs onto the same names with forward hooks; `LensView` views a TransformerLens `HookedTransformer`, whose
hook points carry these names already (`view_of` picks the view of a model). For Hugging Face models,
`blocks.{l}.hook_resid_mid` is not provided (GPT-NeoX's parallel residual has none), and for gated MLPs
`mlp.hook_pre` is the gate pre-activation and `mlp.hook_post` the input of the down projection.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynascope.core.errors import DynascopeError
from dynascope.core.model import HookPoint, ModelConfig, Transformer

Cache = dict[str, torch.Tensor]
HookFn = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class ModelShape:
    """The sizes an analysis needs to declare its states, known before any checkpoint is loaded."""

    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    context_length: int
    activation: str

    @property
    def is_relu(self) -> bool:
        return self.activation == "relu"

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelShape:
        return cls(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size, cfg.context_length, cfg.activation)


def overwrite_position(position: int, vectors: torch.Tensor) -> HookFn:
    """A hook function that replaces the activation at sequence `position` by `vectors` [B, d]."""

    def overwrite(o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, position] = vectors.to(o.dtype)
        return o

    return overwrite


class ModelView:
    """Base class: subclasses set `model`, `shape` and `points` (hook name -> (module, "in" | "out"))
    and implement the weight accessors."""

    model: nn.Module
    shape: ModelShape
    points: dict[str, tuple[nn.Module, str]]

    @property
    def device(self) -> torch.device:
        return self.output_embeddings.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def output_embeddings(self) -> torch.Tensor:
        """The unembedding [V, d]."""
        raise NotImplementedError

    @property
    def output_bias(self) -> torch.Tensor | None:
        return None

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-norm outputs h [..., d]: h·Eᵀ (+ bias)."""
        logits = h.float() @ self.output_embeddings.float().T
        return logits if self.output_bias is None else logits + self.output_bias.float()

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm_gain(self) -> torch.Tensor:
        """The final norm's elementwise gain γ [d]."""
        raise NotImplementedError

    def final_norm_bias(self) -> torch.Tensor | None:
        """The final norm's bias β [d], if it has one (RMSNorm has none)."""
        return None

    def mlp_in(self, layer: int) -> torch.Tensor:
        """Input weights [d_mlp, d] (rows read the residual stream)."""
        raise NotImplementedError

    def mlp_values(self, layer: int) -> torch.Tensor:
        """Value vectors [d_mlp, d]: row i is what unit i writes to the residual stream."""
        raise NotImplementedError

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        """The MLP's output bias (a constant sub-update of no value vector), if any."""
        return None

    def add_hook(self, name: str, fn: HookFn):
        """Register `fn` on hook `name` until the returned handle's `remove()`; `fn` may return a
        replacement activation."""
        if name not in self.points:
            raise KeyError(f"unknown hook name {name!r}; available: {sorted(self.points)}")
        module, where = self.points[name]
        if where == "out":
            return module.register_forward_hook(lambda m, a, o: _apply_out(fn, o))
        return module.register_forward_pre_hook(lambda m, a, k: _apply_in(fn, a, k), with_kwargs=True)

    @contextlib.contextmanager
    def hooks(self, fns: dict[str, HookFn]) -> Iterator[None]:
        unknown = sorted(set(fns) - set(self.points))
        if unknown:
            raise KeyError(f"unknown hook names {unknown}; available: {sorted(self.points)}")
        handles = [self.add_hook(name, fn) for name, fn in fns.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def run_with_cache(self, tokens: torch.Tensor, names: Sequence[str] = ()) -> tuple[torch.Tensor, Cache]:
        """Logits and the activations at `names` (nothing is stored for names not asked for)."""
        cache: Cache = {}
        with self.hooks({n: (lambda o, n=n: cache.__setitem__(n, o)) for n in names}):
            logits = self.forward(tokens)
        return logits, cache

    def patch_residual(self, tokens: torch.Tensor, name: str, position: int, vectors: torch.Tensor,
                       names: Sequence[str] = ()) -> tuple[torch.Tensor, Cache]:
        """Forward pass with the activation at `name`, sequence `position`, replaced by `vectors` [B, d]."""
        with self.hooks({name: overwrite_position(position, vectors)}):
            return self.run_with_cache(tokens, names)

    def patch_hooks(self, layer: int) -> list[str]:
        """What a clean pass should record so that `patch_last_position(..., clean=...)` at `layer` reuses it
        rather than running its own: nothing here."""
        return []

    def patch_last_position(self, tokens: torch.Tensor, layer: int, vectors: torch.Tensor,
                            names: Sequence[str] = (), clean: Cache | None = None) -> Cache:
        """For prompts `tokens` [P, T], with the residual after block `layer` at the last position replaced
        by each of `vectors` [P, N, d]: the activations at `names` [P, N, ...] at the last position (the
        logits, when needed, are `unembed` of `ln_final.hook_normalized`). Here: one patched forward pass per
        vector (`clean` is not needed)."""
        P, N, d = vectors.shape
        _, cache = self.patch_residual(tokens.repeat_interleave(N, dim=0), f"blocks.{layer}.hook_resid_post",
                                       tokens.shape[1] - 1, vectors.reshape(P * N, d), names)
        return {n: c[:, -1].view(P, N, *c.shape[2:]) for n, c in cache.items()}


def _apply_out(fn: HookFn, output):
    if isinstance(output, tuple):
        new = fn(output[0])
        return None if new is None else (new, *output[1:])
    return fn(output)


def _apply_in(fn: HookFn, args, kwargs):
    if args:
        new = fn(args[0])
        return None if new is None else ((new, *args[1:]), kwargs)
    new = fn(kwargs["hidden_states"])
    return None if new is None else (args, {**kwargs, "hidden_states": new})


class TransformerView(ModelView):
    """dynascope's own `Transformer`: its `HookPoint` modules are the hook names."""

    def __init__(self, model: Transformer):
        self.model = model
        self.shape = ModelShape.of(model.cfg)
        self.points = {n: (m, "out") for n, m in model.named_modules() if isinstance(m, HookPoint)}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def patch_hooks(self, layer: int) -> list[str]:
        return [f"blocks.{l}.attn.hook_{x}" for l in range(layer + 1, self.shape.n_layers) for x in "kv"]

    def patch_last_position(self, tokens: torch.Tensor, layer: int, vectors: torch.Tensor,
                            names: Sequence[str] = (), clean: Cache | None = None) -> Cache:
        """As `ModelView.patch_last_position`, computing only what the patch changes: the last position, from
        block `layer + 1` to the final norm (`Transformer.blocks_from`, no unembedding), over the earlier
        positions' keys and values of the clean pass (`clean`, if it recorded `patch_hooks(layer)` and `names`,
        else one of its own); activations the patch cannot reach, in blocks up to `layer`, are the clean pass's."""
        P, N, d = vectors.shape
        needed = [*self.patch_hooks(layer), *names]
        if clean is None or not set(needed) <= set(clean):
            _, clean = self.run_with_cache(tokens, needed)
        past = [tuple(clean[f"blocks.{l}.attn.hook_{x}"][:, :-1].repeat_interleave(N, dim=0) for x in "kv")
                for l in range(layer + 1, self.shape.n_layers)]
        cache = {n: clean[n][:, -1:].repeat_interleave(N, dim=0) for n in names}
        with self.hooks({n: (lambda o, n=n: cache.__setitem__(n, o)) for n in names}):
            self.model.ln_final(self.model.blocks_from(vectors.reshape(P * N, 1, d), layer + 1, past))
        return {n: c.view(P, N, *c.shape[2:]) for n, c in cache.items()}

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.model.unembed.weight

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.ln_final(h)

    def final_norm_gain(self) -> torch.Tensor:
        return self.model.ln_final.weight

    def final_norm_bias(self) -> torch.Tensor | None:
        return self.model.ln_final.bias

    def mlp_in(self, layer: int) -> torch.Tensor:
        mlp = self.model.blocks[layer].mlp
        return (mlp.fc_gate or mlp.fc_in).weight

    def mlp_values(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].mlp.fc_out.weight.T

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        return self.model.blocks[layer].mlp.fc_out.bias

    @classmethod
    def from_snapshot(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                      source: str = "snapshot") -> TransformerView:
        with torch.device("meta"):  # no initialisation: the weights are the snapshot's tensors, on their device
            model = Transformer(cfg)
        try:
            model.load_state_dict(weights, strict=True, assign=True)
            if cfg.tie_embeddings:
                model.unembed.weight = model.wte.weight
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise DynascopeError(f"{source} does not match the run's model config: {first}") from None
        return cls(model.eval())


def _config_json(path: str | Path) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise DynascopeError(f"{path} is not a Hugging Face model directory (no config.json)")
    return json.loads(config.read_text())


def _max_positions(config: dict) -> int:
    return config.get("max_position_embeddings") or config["n_positions"]  # GPT-2 calls it n_positions


# Per architecture: (blocks, embedding, final norm, MLP pre-activation, MLP output projection, activation attr)
_HF_LAYOUTS = {
    "gpt2": ("transformer.h", "transformer.wte", "transformer.ln_f", "mlp.c_fc", "mlp.c_proj", "activation_function"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h", "hidden_act"),
    "llama": ("model.layers", "model.embed_tokens", "model.norm", "mlp.gate_proj", "mlp.down_proj", "hidden_act"),
}
_HF_LAYOUTS.update({k: _HF_LAYOUTS["llama"] for k in ("olmo", "olmo2", "mistral", "qwen2")})


def _activation(name: str) -> str:
    """A model config's activation name as the analyses know it: relu, gelu (any GELU variant) or the name itself."""
    a = str(name).lower()
    return "relu" if a == "relu" else "gelu" if "gelu" in a else a


class HFModelView(ModelView):
    """A Hugging Face causal LM (loaded from a local directory with `transformers`)."""

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or not hasattr(cfg, "model_type"):
            raise DynascopeError(f"a {type(model).__name__} is not a Hugging Face causal LM (no config.model_type)")
        self.model = model.eval()
        if cfg.model_type not in _HF_LAYOUTS:
            raise DynascopeError(f"model type {cfg.model_type!r} is not supported; supported: {sorted(_HF_LAYOUTS)}")
        blocks, embed, norm, pre, out, act = _HF_LAYOUTS[cfg.model_type]
        self._blocks = model.get_submodule(blocks)
        self._norm = model.get_submodule(norm)
        self._pre_name, self._out_name = pre, out
        self.shape = ModelShape(n_layers=len(self._blocks), d_model=cfg.hidden_size,
                                d_mlp=self.mlp_values(0).shape[0],
                                vocab_size=model.get_output_embeddings().weight.shape[0],
                                context_length=_max_positions(cfg.to_dict()),
                                activation=_activation(getattr(cfg, act, "gelu")))
        self.points = {"hook_embed": (model.get_submodule(embed), "out"),
                       "ln_final.hook_normalized": (self._norm, "out")}
        for l, block in enumerate(self._blocks):
            self.points[f"blocks.{l}.hook_resid_pre"] = (block, "in")
            self.points[f"blocks.{l}.hook_resid_post"] = (block, "out")
            self.points[f"blocks.{l}.mlp.hook_pre"] = (block.get_submodule(pre), "out")
            self.points[f"blocks.{l}.mlp.hook_post"] = (block.get_submodule(out), "in")

    @classmethod
    def from_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> HFModelView:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise DynascopeError("Hugging Face models need the hf extra: pip install 'dynascope[hf]'") from None
        _config_json(path)
        return cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True))

    @staticmethod
    def max_positions(path: str | Path) -> int:
        """The longest sequence the model in `path` takes, read from its config.json (no weights loaded)."""
        return _max_positions(_config_json(path))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h)

    def final_norm_gain(self) -> torch.Tensor:
        return self._norm.weight

    def final_norm_bias(self) -> torch.Tensor | None:
        return getattr(self._norm, "bias", None)

    def _weight(self, layer: int, name: str) -> torch.Tensor:
        w = self._blocks[layer].get_submodule(name).weight
        return w if self.model.config.model_type == "gpt2" else w.T  # GPT-2's Conv1D stores [in, out]

    def mlp_in(self, layer: int) -> torch.Tensor:
        return self._weight(layer, self._pre_name).T

    def mlp_values(self, layer: int) -> torch.Tensor:
        return self._weight(layer, self._out_name)

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self._blocks[layer].get_submodule(self._out_name), "bias", None)


class LensView(ModelView):
    """A TransformerLens `HookedTransformer`: its hook points are the hook names; its weights are [in, out]."""

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "cfg", None)
        if not hasattr(model, "hook_dict") or not hasattr(cfg, "d_vocab_out"):
            raise DynascopeError(f"a {type(model).__name__} is not a TransformerLens HookedTransformer")
        self.model = model.eval()
        self.shape = ModelShape(n_layers=cfg.n_layers, d_model=cfg.d_model, d_mlp=cfg.d_mlp, vocab_size=cfg.d_vocab_out,
                                context_length=cfg.n_ctx, activation=_activation(cfg.act_fn or "gelu"))
        self.points = {name: (point, "out") for name, point in model.hook_dict.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.model.W_U.T

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.model.b_U

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.ln_final(h)

    def final_norm_gain(self) -> torch.Tensor:  # LNPre and RMSPre (weights folded) have no gain of their own
        gain = getattr(self.model.ln_final, "w", None)
        return torch.ones(self.shape.d_model, device=self.device) if gain is None else gain

    def final_norm_bias(self) -> torch.Tensor | None:
        return getattr(self.model.ln_final, "b", None)

    def mlp_in(self, layer: int) -> torch.Tensor:
        mlp = self.model.blocks[layer].mlp
        return getattr(mlp, "W_gate", mlp.W_in).T

    def mlp_values(self, layer: int) -> torch.Tensor:
        return self.model.blocks[layer].mlp.W_out

    def mlp_out_bias(self, layer: int) -> torch.Tensor | None:
        return self.model.blocks[layer].mlp.b_out


def view_of(model: nn.Module | ModelView) -> ModelView:
    """The view of dynascope's `Transformer`, a Hugging Face causal LM or a TransformerLens `HookedTransformer`."""
    if isinstance(model, ModelView):
        return model
    if isinstance(model, Transformer):
        return TransformerView(model)
    if hasattr(model, "hook_dict") and hasattr(model, "W_U"):
        return LensView(model)
    if hasattr(getattr(model, "config", None), "model_type"):
        return HFModelView(model)
    raise DynascopeError(f"a {type(model).__name__} is not a model dynascope can view: give dynascope's Transformer, "
                         "a transformers causal LM or a TransformerLens HookedTransformer")
