"""torch DistributedDataParallel: every rank holds everything, gradients are all-reduced."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .base import Strategy


class DDPStrategy(Strategy):
    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        self.ctx = ctx
        model = model_factory().to(ctx.device)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        opts = {k: v for k, v in self.options.items() if k in ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph")}
        self.model = DDP(model, device_ids=ids, **opts)
        if ctx.comm is not None:  # route buckets through Python so the CommCounter sees them
            self.model.register_comm_hook(None, _python_allreduce)
        self.optimizer = optimizer_factory(self.model.module)
        if ctx.precision == "fp16":
            self.scaler = torch.amp.GradScaler(ctx.device.type)

    def no_sync(self):
        return self.model.no_sync()

    def model_for_export(self):
        return self.model.module

    def describe(self) -> dict:
        return {"sharded": "nothing (replicated; gradients all-reduced)"}


def _python_allreduce(_state, bucket):  # no annotations: DDP checks them at runtime
    """DDP's default hook (mean all-reduce), called through ``torch.distributed.all_reduce``."""
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])
