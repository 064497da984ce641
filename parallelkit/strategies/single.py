"""The reference: one process, plain PyTorch, no wrapper.

It consumes the same global batch as a data-parallel run of ``world_size`` ranks (every
rank's micro-batches, one after another), so its loss trajectory is the one every other
strategy is compared against.
"""
from __future__ import annotations

from .base import Strategy


class SingleStrategy(Strategy):
    @classmethod
    def layout(cls, cfg) -> dict[str, int]:
        return {"world": 1, "dp": 1, "tp": 1, "pp": 1, "processes": 1, "virtual_dp": cfg.world_size}

    def dp_ranks_per_process(self) -> list[int]:
        return list(range(self.ctx.cfg.world_size))

    def describe(self) -> dict:
        return {"sharded": "nothing", "note": f"one process running the global batch of {self.ctx.cfg.world_size} ranks"}
