"""torch DistributedDataParallel: every rank holds everything, gradients are all-reduced."""
from __future__ import annotations

from dataclasses import dataclass

from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.comm_model import FP32, gpt, one_process
from parallelkit.strategies.shared.ddp import ddp_probe_comm, ddp_wrap
from parallelkit.strategies.shared.memory_model import replica


@dataclass
class DDPOptions(Options):
    bucket_cap_mb: float = 25  # gradient bucket size; DDP all-reduces a bucket as soon as it is full
    gradient_as_bucket_view: bool = False  # gradients are views into the buckets (saves one gradient copy)
    static_graph: bool = False


class DDPStrategy(Strategy):
    reference = 1  # the loss reference where no single run is in the comparison
    Options = DDPOptions

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return replica(cfg, layout, ddp_buckets=not o.gradient_as_bucket_view)

    @classmethod
    def comm(cls, cfg, o, layout):
        """One all-reduce of every gradient per optimizer step, 4Ψ: fp32 under autocast (the parameters stay fp32),
        once at the last micro-batch (``no_sync`` before it). The buckets are reported by ``ddp_probe_comm``;
        clipping is local (every rank holds every gradient)."""
        return {} if one_process(layout) else {"all_reduce": FP32 * gpt(cfg).num_params()}

    @classmethod
    def overlap(cls, cfg, o):
        return {"all_reduce": "backward"}  # each bucket is reduced as backward fills it

    def wrap(self, module):
        o = self.opts
        return ddp_wrap(module, self.ctx, bucket_cap_mb=o.bucket_cap_mb, gradient_as_bucket_view=o.gradient_as_bucket_view,
                        static_graph=o.static_graph)

    def no_sync(self):
        return self.model.no_sync()

    def probe_comm(self):
        return ddp_probe_comm(self.model, self.ctx.instrument)

    def describe(self) -> dict:
        return {"sharded": "nothing (replicated; gradients all-reduced)"}
