"""The few collectives the loop itself calls (outside any strategy), safe on one process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def gather_named(values: dict) -> list[dict]:
    """Every rank's dict of named values, rank by rank."""
    if not distributed():
        return [values]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def max_over_ranks(value: float, device: torch.device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
