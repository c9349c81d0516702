"""A small pre-LN decoder-only Transformer with TransformerLens-named hook points.

Every activation an analysis may want passes through a `HookPoint` (an identity module) whose
module path is its TransformerLens name (`blocks.0.mlp.hook_post`, `ln_final.hook_normalized`, ...).
With no hooks registered they cost nothing and compile away. Reading and patching them is the
model view's job (`dynascope.analysis.view.TransformerView`), which attaches forward hooks only for
the duration of one call.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynascope.core.errors import require

ACTIVATIONS = ("gelu", "relu", "relu2", "swiglu")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    """The architecture of a pre-LN decoder-only Transformer."""

    n_layers: int = 4
    """Number of Transformer blocks."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    d_mlp: int = 512
    """Hidden units of each MLP."""
    vocab_size: int = 4096
    """Rows of the embedding and the unembedding; at least the tokenizer's vocabulary."""
    context_length: int = 128
    """Tokens per training window, and the number of learned positions."""
    activation: str = "relu"
    """MLP activation: gelu, relu, relu2 or swiglu."""
    norm: str = "layernorm"
    """Normalisation before attention, MLP and unembedding: layernorm or rmsnorm."""
    tie_embeddings: bool = False
    """Share one matrix between the token embedding and the unembedding."""
    bias: bool = True
    """Biases in the linear layers and the LayerNorms."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "vocab_size", "context_length"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"model.arch.{name}", value, "must be a positive integer")
        require(self.context_length >= 2, "model.arch.context_length", self.context_length,
                "must be at least 2 (a window predicts its next tokens)")
        require(self.activation in ACTIVATIONS, "model.arch.activation", self.activation,
                f"choose one of {ACTIVATIONS}")
        require(self.norm in NORMS, "model.arch.norm", self.norm, f"choose one of {NORMS}")
        require(self.d_model % self.n_heads == 0, "model.arch.d_model", self.d_model,
                f"must be divisible by model.arch.n_heads={self.n_heads}")

    def hash(self) -> str:
        """Short stable hash identifying the architecture (stored in the snapshot manifest)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class HookPoint(nn.Identity):
    """Marks a named activation; forward hooks on it read or replace the activation."""


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.bias and cfg.norm == "layernorm" else None
        self.rms = cfg.norm == "rmsnorm"
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            y = F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-5)
        else:
            y = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=1e-5)
        return self.hook_normalized(y)


class Attention(nn.Module):
    """Causal self-attention. `hook_k` and `hook_v` are the keys and values [B, T, C] before the heads split:
    a prefix's keys and values (`past`) let later positions be computed alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`past`: keys and values [B, T', C] of the T' positions before x's, which x's positions all follow."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        k, v = self.hook_k(k), self.hook_v(v)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        q, k, v = (t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    """`hook_pre` is the pre-activation (the gate for swiglu); `hook_post` is the input of `fc_out`,
    so the rows of `fc_out.weight.T` are the value vectors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.fc_gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            post = F.silu(self.hook_pre(self.fc_gate(x))) * self.fc_in(x)
        else:
            pre = self.hook_pre(self.fc_in(x))
            post = {"gelu": F.gelu, "relu": F.relu, "relu2": lambda t: F.relu(t).square()}[self.activation](pre)
        return self.fc_out(self.hook_post(post))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = Norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.attn(self.ln1(x), past))
        return self.hook_resid_post(x + self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = Norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:
                nn.init.ones_(p)
            else:
                residual_out = name.endswith(("proj.weight", "fc_out.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layers) if residual_out else 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context_length {self.cfg.context_length}")
        x = self.hook_embed(self.wte(tokens)) + self.wpe(torch.arange(T, device=tokens.device))
        return self.unembed(self.ln_final(self.blocks_from(x)))

    def blocks_from(self, x: torch.Tensor, start: int = 0,
                    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The residual stream after the last block, from states x entering block `start`; with `past`, x's
        positions follow those whose keys and values `past` holds for each block from `start` on (a KV cache)."""
        for i, block in enumerate(self.blocks[start:]):
            x = block(x, None if past is None else past[i])
        return x

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); position embeddings never count towards FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() - (self.wte.weight.numel() if non_embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·d·T (N excludes position embeddings)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layers * c.d_model * c.context_length
