"""torch DistributedDataParallel: every rank holds everything, gradients are all-reduced."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from parallelkit.strategies.shared.comm_model import FP32, gpt, one_process
from parallelkit.strategies.shared.memory_model import replica
from parallelkit.strategies.base import Options, Strategy


@dataclass
class DDPOptions(Options):
    bucket_cap_mb: float = 25  # gradient bucket size; DDP all-reduces a bucket as soon as it is full
    gradient_as_bucket_view: bool = False  # gradients are views into the buckets (saves one gradient copy)
    static_graph: bool = False


def ddp_wrap(module, ctx, group=None, **opts) -> DDP:
    """DDP over ``group`` (default: every rank). With ``train.instrument`` the buckets go through a Python
    hook so the comm counter sees them on every step; otherwise DDP's own C++ all-reduce runs untouched
    and ``ddp_probe_comm`` reports the buckets on the probe step."""
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    model = DDP(module, device_ids=ids, process_group=group, **opts)
    if ctx.instrument:
        model.register_comm_hook(group, _python_allreduce)
    return model


def ddp_probe_comm(model, instrumented: bool) -> dict[str, tuple[int, int]]:
    """DDP all-reduces every bucket once per synchronised step: their sizes are in its logging data."""
    if instrumented or not isinstance(model, DDP):
        return {}
    sizes = [int(b) for b in str(model._get_ddp_logging_data().get("bucket_sizes", "")).split(",") if b.strip()]
    return {"all_reduce": (len(sizes), sum(sizes))} if sizes else {}


def _python_allreduce(group, bucket):  # no annotations: DDP checks them at runtime
    """DDP's default hook (mean all-reduce), called through ``torch.distributed.all_reduce``."""
    buf = bucket.buffer().div_(dist.get_world_size(group))
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])


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
