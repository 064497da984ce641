"""FairScale FullyShardedDataParallel (the original FSDP): CUDA only.

FairScale's FSDP allocates its buffers on CUDA whatever the module's device ("Torch not
compiled with CUDA enabled" on a CPU build), so ``check`` refuses it on a machine without a
GPU and points at PyTorch FSDP2 (``strategy=fsdp``) or OSS (``strategy=fairscale_oss``).

Every block is its own FSDP unit, the root holds embeddings, tied head and final LayerNorm.
``flatten_parameters: false`` keeps the GPT's own parameters (sharded in place), so the
optimizer's weight-decay groups are the same as every other strategy's; checkpoints are
one local (sharded) file per rank.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP
from fairscale.optim.grad_scaler import ShardedGradScaler

from ..config import ConfigError, cuda_available
from ..metrics import DTYPES
from ..train import param_groups
from .base import Strategy


class FairScaleFSDPStrategy(Strategy):
    @classmethod
    def check(cls, cfg) -> None:
        if not cuda_available():
            raise ConfigError("strategy=fairscale_fsdp needs a CUDA GPU (FairScale's FSDP allocates on CUDA): "
                              "on CPU use strategy=fsdp (PyTorch FSDP2) or strategy=fairscale_oss")
        for key in ("reshard_after_forward", "cpu_offload"):
            if not isinstance(cfg.strategy.get(key, False), bool):
                raise ConfigError(f"strategy.{key}={cfg.strategy.get(key)!r}: must be true or false")

    @classmethod
    def label(cls, cfg) -> str:
        s = cfg.strategy
        return (f"fairscale fsdp {'zero3' if s.get('reshard_after_forward', True) else 'zero2'}"
                + (" offload" if s.get("cpu_offload", False) else ""))

    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        self.ctx = ctx
        model = model_factory().to(ctx.device)
        groups = param_groups(model, ctx.cfg.optim.weight_decay)  # before sharding flattens every tensor to 1-D
        low = ctx.precision != "fp32"
        kw = {"reshard_after_forward": bool(self.options.get("reshard_after_forward", True)),
              "mixed_precision": low, "compute_dtype": DTYPES[ctx.precision] if low else None,
              "fp32_reduce_scatter": low, "flatten_parameters": False,
              "move_params_to_cpu": bool(self.options.get("cpu_offload", False)),
              "compute_device": ctx.device}
        for i, block in enumerate(model.blocks):
            model.blocks[i] = FSDP(block, **kw)
        self.model = FSDP(model, **kw)
        self.optimizer = optimizer_factory(groups)  # the same Parameter objects, now holding this rank's shard
        if ctx.precision == "fp16":
            self.scaler = ShardedGradScaler()

    def autocast(self):
        return contextlib.nullcontext()  # FSDP casts parameters to compute_dtype itself

    def no_sync(self):
        return self.model.no_sync()

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        self.model.clip_grad_norm_(max_norm)  # norms of the gradient shards, all-reduced

    def save(self, path: Path, step: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.local_state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "world_size": self.ctx.world_size}
        torch.save(state, path / f"rank{self.ctx.rank}.pt")

    def load(self, path: Path) -> int:
        f = Path(path) / f"rank{self.ctx.rank}.pt"
        if not f.exists():
            raise FileNotFoundError(f"{f} missing: resume a fairscale_fsdp checkpoint with the same world_size")
        state = torch.load(f, map_location=self.ctx.device, weights_only=False)
        self.model.load_local_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["step"]

    def describe(self) -> dict:
        return {"sharded": "parameters, gradients and optimizer state (FairScale FSDP per block + root)",
                "reshard_after_forward": bool(self.options.get("reshard_after_forward", True)),
                "checkpoint": "local shards, one file per rank"}
