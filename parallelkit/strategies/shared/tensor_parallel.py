"""The tensor-parallel cut of the GPT, written once: which parameter is split how over the tensor-parallel ranks,
a rank's slice of a full tensor and the full tensor from every rank's slice, and the one check every tensor-
parallel backend needs (FairScale's layers in fairscale/tp.py; the hand-written pair in deepspeed/neox_3d.py).
Portable checkpoints of tensor-parallel runs cut and join by these."""
from __future__ import annotations

import torch

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import divisors


def split_of(name: str, vocab_parallel: bool) -> str | int | None:
    """How the full tensor of the GPT's parameter ``name`` is cut over the tensor-parallel ranks: ``"qkv"`` (each of
    q, k and v by rows: a rank takes its heads of all three), 0 (rows), 1 (columns) or None (replicated)."""
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return "qkv"
    if name.endswith(("mlp.fc.weight", "mlp.fc.bias")):
        return 0  # column-parallel: this rank's hidden units
    if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
        return 1  # row-parallel: the input columns of this rank's heads / units (the bias is added once: replicated)
    if vocab_parallel and name in ("embed.tok.weight", "head.out.weight"):
        return 0  # this rank's slice of the vocabulary
    return None


def tp_slice(name: str, full: torch.Tensor, r: int, n: int, vocab_parallel: bool) -> torch.Tensor:
    """Rank ``r``'s part of a full tensor (a parameter or its optimizer moment)."""
    how = split_of(name, vocab_parallel)
    if how is None:
        return full
    if how == "qkv":
        return torch.cat([t.chunk(n, 0)[r] for t in full.chunk(3, 0)])
    return full.chunk(n, how)[r]


def tp_unslice(name: str, parts: list[torch.Tensor], vocab_parallel: bool) -> torch.Tensor:
    """The full tensor from every rank's part, in rank order (the inverse of ``tp_slice``)."""
    how = split_of(name, vocab_parallel)
    if how is None:
        return parts[0]
    if how == "qkv":
        return torch.cat([torch.cat([p.chunk(3, 0)[i] for p in parts]) for i in range(3)])
    return torch.cat(parts, how)


def check_heads(cfg, tp: int, other: int = 1) -> None:
    """Each tensor-parallel rank computes whole attention heads: ``tp`` must divide model.n_head (one line naming
    the sizes that work on world_size with ``other`` ranks per tensor group's replica, e.g. pipeline stages)."""
    h = cfg.model.n_head
    if h % tp:
        fits = [d for d in divisors(h) if cfg.world_size % (d * other) == 0]
        raise ConfigError(f"strategy.tp_size={tp} does not divide model.n_head={h}: each tensor-parallel rank "
                          f"computes whole attention heads; use strategy.tp_size={' or '.join(map(str, fits))}")
