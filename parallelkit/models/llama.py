"""A Llama-shaped causal LM beside the GPT: RoPE, RMSNorm, SwiGLU and grouped-query attention, no biases.

It keeps the GPT's contract, so every strategy that does not cut the model runs it unchanged:
``layers()`` is ``[Embedding, Block * n_layer, Head]``, ``blocks`` holds the blocks (FSDP shards each),
``init_weights(seed, assign)`` draws each parameter from ``(seed, name)`` (sharded or ZeRO-3-partitioned
instances get the same values), and there are no buffers (RoPE's angles are computed in ``forward``), so a
model built on the meta device needs nothing but its parameters. The names of the matrices are
Hugging Face's (``q_proj`` ... ``down_proj``): ``hf_names`` maps them to ``LlamaForCausalLM``'s, whose logits
it matches in fp32 (tests/test_llama.py).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from parallelkit.models.common import CheckpointedBlock, LayerListLM, unique_parameters
from parallelkit.util.tensors import assign_full


@dataclass
class LlamaConfig:
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 64
    d_ff: int = 176  # SwiGLU's hidden width (Llama: about 8/3 d, rounded)
    vocab_size: int = 512
    seq_len: int = 64
    tie_weights: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    arch: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_cfg(cls, m) -> "LlamaConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})

    def block_params(self) -> int:
        """Two RMSNorm gains, q, k, v, o, and the three SwiGLU matrices (no biases)."""
        d, kv = self.d_model, self.n_kv_head * self.head_dim
        return 2 * d + d * d + 2 * d * kv + d * d + 3 * d * self.d_ff

    def block_matmul_params(self) -> int:
        return self.block_params() - 2 * self.d_model

    def embed_params(self) -> int:
        return self.vocab_size * self.d_model

    def head_params(self, own_copy: bool = False) -> int:
        return self.d_model + (0 if self.tie_weights and not own_copy else self.vocab_size * self.d_model)

    def layer_params(self, own_head: bool = True) -> list[int]:
        return [self.embed_params(), *[self.block_params()] * self.n_layer, self.head_params(own_head)]

    def num_params(self) -> int:
        return self.embed_params() + self.n_layer * self.block_params() + self.head_params()

    def flops_per_token(self) -> float:
        """6N + 12 L d T, as the GPT's (the embedding lookup counted through the output matrix when tied)."""
        n = self.num_params() - (0 if self.tie_weights else self.embed_params())
        return 6 * n + 12 * self.n_layer * self.d_model * self.seq_len


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of (B, heads, T, head_dim), Hugging Face's layout (halves, not pairs)."""
    T, hd = x.size(-2), x.size(-1)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Embedding(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        kv = c.n_kv_head * c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, kv, bias=False)
        self.v_proj = nn.Linear(c.d_model, kv, bias=False)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.c.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, heads, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = rope(q, self.c.rope_theta), rope(k, self.c.rope_theta)
        rep = q.size(1) // k.size(1)  # grouped-query attention: each key/value head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(CheckpointedBlock):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(c.d_model, eps=c.norm_eps), Attention(c)
        self.mlp_norm, self.mlp = nn.RMSNorm(c.d_model, eps=c.norm_eps), MLP(c)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Head(nn.Module):
    def __init__(self, c: LlamaConfig, embedding: Embedding | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.out = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if embedding is not None:
            self.out.weight = embedding.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Llama(LayerListLM):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        if c.n_head % c.n_kv_head or c.d_model % c.n_head:
            raise ValueError(f"model.n_head={c.n_head} must divide model.d_model={c.d_model} and be a multiple of "
                             f"model.n_kv_head={c.n_kv_head}")
        self.config = c
        self.embed = Embedding(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.head = Head(c, self.embed if c.tie_weights else None)

    @torch.no_grad()
    def init_weights(self, seed: int, assign: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
        """Llama's init: N(0, 0.02) matrices and embedding, the residual projections (o, down) scaled by
        1/sqrt(2 n_layer), unit RMSNorm gains; each from a generator seeded by (seed, name)."""
        assign = assign or assign_full
        for m, name, p, shape in unique_parameters(self):
            if isinstance(m, nn.RMSNorm):
                assign(p, torch.ones(shape))
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if scaled else 0.02
            assign(p, torch.empty(shape).normal_(0.0, std, generator=g))


def hf_names(n_layer: int, tied: bool = False) -> dict[str, str]:
    """Our parameter names -> Hugging Face ``LlamaForCausalLM``'s."""
    out = {"embed.tok.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight"}
    if not tied:
        out["head.out.weight"] = "lm_head.weight"
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        out[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{ours}attn.{p}.weight"] = f"{theirs}self_attn.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            out[f"{ours}mlp.{p}.weight"] = f"{theirs}mlp.{p}.weight"
    return out
