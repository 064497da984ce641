"""A GPT in the GPT-2/3 mould, built so that every backend can take it apart.

* ``GPT.layers()`` is a flat list ``[Embedding, Block * n_layer, Head]``: pipelines cut it
  into stages, ``GPT.forward`` is just that list applied in order.
* Every matmul of a block is a plain ``nn.Linear`` with a fixed name (``attn.qkv``,
  ``attn.proj``, ``mlp.fc``, ``mlp.proj``), so tensor parallelism can swap them; attention
  derives its local head count from ``qkv``'s width, so a column-split ``qkv`` just works.
* Initialisation (``GPT.init_weights``) draws each parameter from its own generator, seeded
  by the run's seed and the parameter's name. It can be re-run on any built instance: a whole
  model, a model built on the meta device and sharded (FSDP2: each rank keeps its slice of the
  same full tensor), or one partitioned by ZeRO-3. Every strategy starts from bit-identical
  weights however the model is cut.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from parallelkit.models.common import CheckpointedBlock, LayerListLM, unique_parameters
from parallelkit.models.hf import HFCausalLM, HFShape
from parallelkit.models.llama import Llama, LlamaConfig
from parallelkit.util.tensors import assign_full  # noqa: F401 - importers name it here too


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
    def from_cfg(cls, m) -> "GPTConfig | LlamaConfig | HFShape":
        """The shape of ``model.*``: a GPTConfig, a LlamaConfig for ``model.arch=llama``, an HFShape for
        ``model.arch=hf``; all answer the same questions (parameters by part, FLOPs per token) for the estimator, the predictors and the backends."""
        if (m.get("arch") or "gpt") == "llama":
            return LlamaConfig.from_cfg(m)
        if m.get("arch") == "hf":
            return HFShape.from_cfg(m)
        return cls(**{k: m[k] for k in cls.__dataclass_fields__ if k in m})

    def block_params(self) -> int:
        """One transformer block: two LayerNorms, qkv, proj, fc, proj (weights and biases)."""
        d = self.d_model
        return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)

    def block_matmul_params(self) -> int:
        """The part of a block that tensor parallelism splits (the four linears' weights and column biases)."""
        d = self.d_model
        return 12 * d * d + 7 * d

    def embed_params(self) -> int:
        return self.vocab_size * self.d_model + self.seq_len * self.d_model

    def head_params(self, own_copy: bool = False) -> int:
        """The final LayerNorm, plus the output matrix unless it is the (tied) token embedding."""
        return 2 * self.d_model + (0 if self.tie_weights and not own_copy else self.vocab_size * self.d_model)

    def layer_params(self, own_head: bool = True) -> list[int]:
        """Parameters of each entry of ``GPT.layers()``; ``own_head``: a pipeline's last stage holds the
        tied matrix again (as its own copy), so it counts there too."""
        return [self.embed_params(), *[self.block_params()] * self.n_layer, self.head_params(own_head)]

    def num_params(self) -> int:
        """Parameter count from the shapes alone (no allocation); equals ``GPT.num_params``."""
        return self.embed_params() + self.n_layer * self.block_params() + self.head_params()

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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of (B, heads, T, head_dim) tensors."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    attend = staticmethod(causal_attention)  # context parallelism puts a distributed one here (torch/nd.py)

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
        y = self.attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.proj = nn.Linear(4 * c.d_model, c.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(CheckpointedBlock):
    """Pre-LayerNorm transformer block."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.d_model), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c.d_model), MLP(c)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, c: GPTConfig, embedding: Embedding | None = None):
        super().__init__()
        self.ln = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if embedding is not None:
            self.out.weight = embedding.tok.weight  # weight tying (GPT-2/3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, V)
        return self.out(self.ln(x))


class GPT(LayerListLM):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.embed = Embedding(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.head = Head(c, self.embed if c.tie_weights else None)

    @torch.no_grad()
    def init_weights(self, seed: int, assign: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
        """Give every parameter its initial value; ``assign(param, full_value)`` stores it (default: copy,
        or this rank's slice of a DTensor). GPT-2 init: N(0, 0.02) matrices and embeddings, residual
        projections scaled by 1/sqrt(2 n_layer), zero biases, unit LayerNorm gains."""
        assign = assign or assign_full
        for m, name, p, shape in unique_parameters(self):
            assign(p, initial_value(m, name, shape, seed, self.config.n_layer))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, always computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def initial_value(module: nn.Module, name: str, shape: tuple[int, ...], seed: int, n_layer: int) -> torch.Tensor:
    """The full fp32 initial value of one parameter: a function of (seed, name) only."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # the CPU generator keeps 32 bits
    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=g)


def build_model(model_cfg, seed: int, activation_checkpointing: bool = False, device: str | torch.device | None = "cpu",
                init: bool = True) -> GPT | Llama | HFCausalLM:
    """The GPT, built without drawing any default init (on the meta device, then materialised), then
    initialised by ``init_weights``. ``device="meta"`` with ``init=False`` leaves it for a strategy to shard
    first and initialise after (FSDP2); ``device=None`` constructs it in the caller's context (DeepSpeed's
    zero.Init partitions each parameter as it is created)."""
    c = GPTConfig.from_cfg(model_cfg)
    with torch.device("meta") if device is not None else contextlib.nullcontext():
        model = Llama(c) if isinstance(c, LlamaConfig) else HFCausalLM(c) if isinstance(c, HFShape) else GPT(c)
    for b in model.blocks:
        b.checkpoint = activation_checkpointing
    if device is not None and str(device) != "meta":
        model.to_empty(device=device)
        model.tie()
        if init:
            model.init_weights(seed)
    return model
