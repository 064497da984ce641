"""The optimizer every strategy uses: parameter groups, AdamW from ``optim.*``, and the lr schedule.

Strategies never read the run config for these: they call ``param_groups`` and
``build_optimizer`` (or pass ``adamw_kwargs`` to a backend that builds its own AdamW).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def decays(name: str, shape: Iterable[int]) -> bool:
    """Decay matrices, not biases, LayerNorms or position tables (GPT-2/nanoGPT practice)."""
    return len(tuple(shape)) >= 2 and "pos" not in name


def param_groups(named: nn.Module | Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 shape_of=lambda p: p.shape) -> list[dict]:
    """Two AdamW groups, each parameter once (tied weights appear once). ``shape_of`` gives a parameter's
    full shape where the tensor itself is a shard or a placeholder (ZeRO-3 under zero.Init: ``ds_shape``)."""
    if isinstance(named, nn.Module):
        named = named.named_parameters()
    decay, no_decay, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decays(name, shape_of(p)) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(optim) -> dict:
    return {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def build_optimizer(optim, groups: list[dict], cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    return cls(groups, **adamw_kwargs(optim))


def lr_at(step: int, optim, total_steps: int) -> float:
    """Linear warmup over optim.warmup_steps, then cosine decay to lr * min_lr_ratio at total_steps."""
    warm = optim.warmup_steps
    if step < warm:
        return optim.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total_steps - warm)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
