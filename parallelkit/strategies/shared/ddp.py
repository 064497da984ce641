"""torch DDP as a building block: the ddp backend, FairScale OSS (plain-DDP mode), FairScale TP and torch
pipelining (over a stage's replicas) wrap with it, and report its buckets on the probe step the same way."""
from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


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
