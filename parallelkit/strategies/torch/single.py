"""The reference: one process, plain PyTorch, no wrapper.

It consumes the same global batch as a data-parallel run of ``world_size`` ranks (every
rank's micro-batches, one after another), so its loss trajectory is the one every other
strategy is compared against.
"""
from __future__ import annotations

from parallelkit.config.layout import Layout
from parallelkit.strategies.base import Strategy


class SingleStrategy(Strategy):
    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout(world=1, dp=1, processes=1, ranks_per_process=cfg.world_size)

    def describe(self) -> dict:
        n = self.ctx.layout.ranks_per_process
        return {"sharded": "nothing", "note": f"one process running the global batch of {n} ranks"}
