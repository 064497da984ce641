"""FairScale OSS: optimizer state sharded over the ranks (ZeRO-1), with ShardedDDP or plain DDP.

* ``OSS`` wraps the optimizer *class*: each rank builds an AdamW over the parameters it owns
  (``OSS.optim``), steps them, then broadcasts them to the other ranks.
* ``ShardedDataParallel`` reduces each gradient to its owner rank only (``dist.reduce``), so
  with ``reduce_buffer_size: 0`` the other ranks drop it: gradients are sharded too (ZeRO-2
  style). With buckets (``reduce_buffer_size`` > 0) every rank keeps a full-size bucket.
* ``sharded_ddp: false`` keeps torch DDP (full gradients everywhere): the ZeRO-1 analogue,
  preset ``fairscale_oss_ddp``, so the table shows what ShardedDDP adds.

Clipping must go through ``OSS.clip_grad_norm``: a rank holds only its shard's gradients,
so a local ``clip_grad_norm_`` would scale each shard by a different factor.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from fairscale.nn.data_parallel import ShardedDataParallel
from fairscale.optim import OSS
from fairscale.optim.grad_scaler import ShardedGradScaler
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import ConfigError
from ..train import optimizer_kwargs, param_groups
from .base import Strategy
from .ddp import _python_allreduce


class FairScaleOSSStrategy(Strategy):
    @classmethod
    def check(cls, cfg) -> None:
        size = cfg.strategy.get("reduce_buffer_size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ConfigError(f"strategy.reduce_buffer_size={size!r}: must be an integer >= 0 (elements; 0 = no buckets)")
        if cfg.strategy.get("broadcast_fp16") and cfg.train.precision == "fp32":
            raise ConfigError("strategy.broadcast_fp16=true rounds the parameters to fp16 on every step: "
                              "use it with train.precision=bf16/fp16, or set it to false")

    @classmethod
    def label(cls, cfg) -> str:
        return "fairscale oss + sharded ddp" if cfg.strategy.get("sharded_ddp", True) else "fairscale oss + ddp (zero-1)"

    @property
    def sharded_ddp(self) -> bool:
        return bool(self.options.get("sharded_ddp", True))

    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        self.ctx = ctx
        module = model_factory().to(ctx.device)
        optim = ctx.cfg.optim
        # OSS turns the parameters into views of per-rank flat buffers, so it comes before the wrapper.
        self.optimizer = OSS(param_groups(module, optim.weight_decay), optim=torch.optim.AdamW,
                             broadcast_fp16=bool(self.options.get("broadcast_fp16", False)), **optimizer_kwargs(optim))
        if self.sharded_ddp:
            self.model = ShardedDataParallel(module, self.optimizer,
                                             reduce_buffer_size=int(self.options.get("reduce_buffer_size", 0)))
        else:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DDP(module, device_ids=ids)
            if ctx.comm is not None:  # route DDP's buckets through Python so the CommCounter sees them
                self.model.register_comm_hook(None, _python_allreduce)
        if ctx.precision == "fp16":
            self.scaler = ShardedGradScaler()  # torch's GradScaler would see only this rank's shard

    def no_sync(self):
        return self.model.no_sync()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)  # ShardedDDP zeroes its bucket views instead of dropping them

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.optimizer.clip_grad_norm(max_norm)

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        params = list(self.model.module.parameters())
        inner = self.optimizer.optim  # the AdamW over this rank's shard: the only optimizer state held here
        optim = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        return {"params": params, "grads": [p.grad for p in params], "optimizer": optim}

    def model_for_export(self):
        return self.model.module

    def save(self, path: Path, step: int) -> None:
        """Every rank sends its optimizer shard to rank 0, which writes one plain PyTorch checkpoint."""
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        super().save(path, step)
        dist.barrier()

    def describe(self) -> dict:
        if self.sharded_ddp:
            grads = ("gradients (reduced to their owner rank, others dropped)" if not self.options.get("reduce_buffer_size")
                     else "nothing else (ShardedDDP reduce buckets keep full-size gradients)")
            return {"sharded": f"optimizer state (OSS) and {grads}", "wrapper": "fairscale ShardedDataParallel"}
        return {"sharded": "optimizer state (OSS); gradients all-reduced in full by torch DDP", "wrapper": "torch DDP"}
