"""The reference: one process, plain PyTorch, no wrapper.

It consumes the same global batch as a data-parallel run of ``world_size`` ranks (every
rank's micro-batches, one after another), so its loss trajectory is the one every other
strategy is compared against.
"""
from __future__ import annotations

from parallelkit.config.layout import Layout
from parallelkit.strategies.base import Strategy
from parallelkit.strategies.shared.memory_model import replica


class SingleStrategy(Strategy):
    reference = 0  # the run every other is compared against (the report's loss deviation)
    candidate = False  # one process: not a way to use world_size devices (tune leaves it out)

    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout(world=1, dp=1, processes=1, ranks_per_process=cfg.world_size)

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return replica(cfg, layout, ddp_buckets=False)  # the whole model and AdamW, in one process

    @classmethod
    def comm(cls, cfg, o, layout):
        return {}  # one process: nothing sent

    def describe(self) -> dict:
        n = self.ctx.layout.ranks_per_process
        return {"sharded": "nothing", "note": f"one process running the global batch of {n} ranks"}
