"""A GPT in the GPT-2/3 mould, built so that every backend can take it apart.

* ``GPT.layers()`` is a flat list ``[Embedding, Block * n_layer, Head]``: pipelines cut it
  into stages, ``GPT.forward`` is just that list applied in order.
* Every matmul of a block is a plain ``nn.Linear`` with a fixed name (``attn.qkv``,
  ``attn.proj``, ``mlp.fc``, ``mlp.proj``), so tensor parallelism can swap them; attention
  derives its local head count from ``qkv``'s width, so a column-split ``qkv`` just works.
* Initialisation depends only on the seed (``torch.manual_seed`` before construction),
  so every rank builds the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class GPTConfig:
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    vocab_size: int = 512
    seq_len: int = 64
    tie_weights: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_cfg(cls, m) -> "GPTConfig":
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})

    def num_params(self) -> int:
        """Parameter count from the shapes alone (no allocation); equals ``GPT.num_params``."""
        d, L, V, T = self.d_model, self.n_layer, self.vocab_size, self.seq_len
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        head = 2 * d + (0 if self.tie_weights else V * d)
        return V * d + T * d + L * block + head

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12 L d T (PaLM appendix B; nanoGPT ``estimate_mfu``).

        N leaves out the position embeddings (a lookup, no matmul); the tied output
        projection is counted through the token embedding.
        """
        n = self.num_params() - self.seq_len * self.d_model
        return 6 * n + 12 * self.n_layer * self.d_model * self.seq_len


class Embedding(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.seq_len, c.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, d)
        pos = torch.arange(idx.size(1), device=idx.device)
        return self.tok(idx) + self.pos(pos)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, local width)
        nh = q.size(-1) // self.head_dim  # local heads: all of them, or 1/tp of them
        q, k, v = (t.view(B, T, nh, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.proj = nn.Linear(4 * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.d_model), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c.d_model), MLP(c)
        self.checkpoint = False  # activation checkpointing: recompute this block in backward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Head(nn.Module):
    def __init__(self, c: GPTConfig, embedding: Embedding | None = None):
        super().__init__()
        self.ln = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if embedding is not None:
            self.out.weight = embedding.tok.weight  # weight tying (GPT-2/3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, V)
        return self.out(self.ln(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.embed = Embedding(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.head = Head(c, self.embed if c.tie_weights else None)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for layer in self.layers():
            x = layer(x)
        return x  # logits (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared tensors counted once


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, always computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def build_model(model_cfg, seed: int, activation_checkpointing: bool = False) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_cfg(model_cfg))
    for b in model.blocks:
        b.checkpoint = activation_checkpointing
    return model
