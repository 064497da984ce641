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

from dataclasses import dataclass
from pathlib import Path

import torch

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.by_name import ADAM_KEYS
from parallelkit.strategies.shared.comm_model import (
    FP32,
    clip_norm,
    gpt,
    one_process,
    total,
)
from parallelkit.strategies.shared.ddp import ddp_probe_comm, ddp_wrap
from parallelkit.strategies.shared.memory_model import activations, replica_state
from parallelkit.strategies.shared.optim import adamw_kwargs


@dataclass
class OSSOptions(Options):
    sharded_ddp: bool = True  # false: plain torch DDP instead (the fairscale_oss_ddp preset)
    reduce_buffer_size: int = 0  # ShardedDDP bucket, in elements; 0 = no buckets, gradients of other ranks' params freed
    broadcast_fp16: bool = False  # send updated parameters as fp16 (only with bf16/fp16 training)

    def validate(self) -> None:
        if self.reduce_buffer_size < 0:
            raise ConfigError(f"strategy.reduce_buffer_size={self.reduce_buffer_size}: must be an integer >= 0 "
                              "(elements; 0 = no buckets)")


class FairScaleOSSStrategy(Strategy):
    Options = OSSOptions
    @property
    def scaler_class(self):  # torch's GradScaler would see only this rank's shard
        from fairscale.optim.grad_scaler import ShardedGradScaler

        return ShardedGradScaler


    @classmethod
    def check(cls, cfg, o) -> None:
        if o.broadcast_fp16 and cfg.train.precision == "fp32":
            raise ConfigError("strategy.broadcast_fp16=true rounds the parameters to fp16 on every step: "
                              "use it with train.precision=bf16/fp16, or set it to false")

    @classmethod
    def label(cls, cfg, o) -> str:
        return "fairscale oss + sharded ddp" if o.sharded_ddp else "fairscale oss + ddp (zero-1)"

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        n, psi = layout.dp, GPTConfig.from_cfg(cfg.model).num_params()
        owned = max(oss_shares(cfg, n))  # OSS gives whole tensors to ranks: the busiest rank owns this many
        r = replica_state(cfg, psi)
        r["optimizer"] *= owned / psi
        if not o.sharded_ddp:
            r["buffers"] += 4 * psi  # DDP's buckets
        elif not o.reduce_buffer_size:
            r["grads"] *= owned / psi  # gradients of other ranks' parameters are dropped once reduced
        return {**r, "activations": activations(cfg)}

    @classmethod
    def comm(cls, cfg, o, layout):
        """The ZeRO-1/2 volume 2Ψ, as FairScale moves it. Gradients, fp32 under autocast, once per step (no_sync
        while accumulating): ShardedDDP ``reduce``s each one to its owner rank (Ψ; every rank calls reduce for
        every parameter), plain DDP all-reduces them all (Ψ). After its step each owner ``broadcast``s its updated
        parameters (Ψ in all; every rank calls broadcast for every shard; fp16 with broadcast_fp16, else fp32: OSS
        keeps the model in fp32). Plus OSS.clip_grad_norm's one norm scalar. Measured on tiny to the byte."""
        if one_process(layout):
            return {}
        psi = gpt(cfg).num_params()
        grads = {"reduce" if o.sharded_ddp else "all_reduce": FP32 * psi}
        return total(grads, {"broadcast": (2 if o.broadcast_fp16 else FP32) * psi}, clip_norm(cfg))

    @classmethod
    def overlap(cls, cfg, o):
        """ShardedDDP reduces each gradient from its hook as backward makes it; plain DDP's buckets likewise."""
        return {"reduce" if o.sharded_ddp else "all_reduce": "backward"}

    def make_optimizer(self, module):
        # OSS wraps the optimizer class and turns the parameters into views of per-rank flat buffers,
        # so it comes before the wrapper (wrap below uses it).
        from fairscale.optim import OSS

        return OSS(self.param_groups(module), optim=torch.optim.AdamW, broadcast_fp16=self.opts.broadcast_fp16,
                   **adamw_kwargs(self.ctx.optim))

    def wrap(self, module):
        return module if self.opts.sharded_ddp else ddp_wrap(module, self.ctx)

    def wrap_with_optimizer(self, model, optimizer):
        if self.opts.sharded_ddp:  # ShardedDDP needs the OSS instance
            from fairscale.nn.data_parallel import ShardedDataParallel

            model = ShardedDataParallel(model, optimizer, reduce_buffer_size=self.opts.reduce_buffer_size)
        return model, optimizer

    def inner_optimizer(self):
        return self.optimizer.optim  # the AdamW over this rank's shard: the only optimizer state held here

    def no_sync(self):
        return self.model.no_sync()

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)  # ShardedDDP zeroes its bucket views instead of dropping them

    def clip(self, max_norm: float) -> None:
        self.optimizer.clip_grad_norm(max_norm)  # a rank holds only its shard's gradients: OSS reduces the norm

    def probe_comm(self):
        return ddp_probe_comm(self.model, self.ctx.instrument)

    # ---- checkpoints: OSS gathers the optimizer shards on rank 0 (consolidate_state_dict) ----
    def export_state(self):
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        if self.ctx.rank != 0:
            return None
        sd, named = self.optimizer.state_dict(), self.portable_params()
        order = [p for g in self.optimizer.param_groups for p in g["params"]]  # OSS numbers them in this order
        name_of = {id(p): n for n, p in named}
        optim = {name_of[id(order[i])]: {"step": torch.as_tensor(st["step"], dtype=torch.float32).clone(),
                                         **{k: st[k].detach().float().cpu().clone() for k in ADAM_KEYS}}
                 for i, st in sd["state"].items() if "exp_avg" in st}
        return {n: p.detach().float().cpu().clone() for n, p in named}, optim

    # import_state: the base's, into the inner AdamW (inner_optimizer): each rank loads the moments of the
    # parameters it owns and every rank the whole weights.

    def save(self, path: Path) -> None:
        """Every rank sends its optimizer shard to rank 0, which writes one plain PyTorch checkpoint."""
        self.optimizer.consolidate_state_dict(recipient_rank=0)
        super().save(path)

    def describe(self) -> dict:
        if self.opts.sharded_ddp:
            grads = ("gradients (reduced to their owner rank, others dropped)" if not self.opts.reduce_buffer_size
                     else "nothing else (ShardedDDP reduce buckets keep full-size gradients)")
            return {"sharded": f"optimizer state (OSS) and {grads}", "wrapper": "fairscale ShardedDataParallel"}
        return {"sharded": "optimizer state (OSS); gradients all-reduced in full by torch DDP", "wrapper": "torch DDP"}


def oss_shares(cfg, n: int) -> list[int]:
    """Parameters each rank owns under OSS's partition (fairscale.optim.OSS.partition_parameters): group by group,
    each tensor to the rank that owns the fewest so far. Whole tensors: with a large embedding, one rank owns it
    and most of the optimizer state (on `small`, 12.9M of 16.1M parameters)."""
    from parallelkit.models.gpt import build_model
    from parallelkit.strategies.shared.optim import param_groups

    sizes = [0] * n
    for group in param_groups(build_model(cfg.model, 0, device="meta", init=False), 0.0):
        for param in group["params"]:
            sizes[sizes.index(min(sizes))] += param.numel()
    return sizes
