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

from dataclasses import dataclass
from pathlib import Path

import torch

from parallelkit.config.env import cuda_available
from parallelkit.config.errors import ConfigError
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.fsdp import fsdp_comm, fsdp_memory
from parallelkit.strategies.shared.lazy import lazy
from parallelkit.util.dtypes import DTYPES

fairscale_dp = lazy("fairscale.nn.data_parallel")


@dataclass
class FairScaleFSDPOptions(Options):
    reshard_after_forward: bool = True  # true: ZeRO-3 (gather again in backward); false: keep gathered params (ZeRO-2)
    cpu_offload: bool = False  # keep the fp32 shards and the optimizer step on the CPU


class FairScaleFSDPStrategy(Strategy):
    Options = FairScaleFSDPOptions
    portable = False  # GPU only: its export/import is unwritten until it can be tested on a GPU
    @property
    def scaler_class(self):
        from fairscale.optim.grad_scaler import ShardedGradScaler

        return ShardedGradScaler

    autocast_forward = False  # FSDP casts parameters to compute_dtype itself

    @classmethod
    def check(cls, cfg, o) -> None:
        if not cuda_available():
            raise ConfigError("strategy=fairscale_fsdp needs a CUDA GPU (FairScale's FSDP allocates on CUDA): "
                              "on CPU use strategy=fsdp (PyTorch FSDP2) or strategy=fairscale_oss")

    @classmethod
    def label(cls, cfg, o) -> str:
        return f"fairscale fsdp {'zero3' if o.reshard_after_forward else 'zero2'}" + (" offload" if o.cpu_offload else "")

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return fsdp_memory(cfg, o, layout.dp)

    @classmethod
    def comm(cls, cfg, o, layout):
        """``fsdp_comm`` with FairScale's accumulation: the root is never resharded (``disable_reshard_on_root``), the
        blocks are freed after backward even under no_sync (so gathered again in each micro-batch's forward);
        clip_grad_norm_ all-reduces one fp32 norm; gradients are reduce-scattered in fp32 (fp32_reduce_scatter).
        From FairScale's source; not measured (it needs a CUDA GPU)."""
        return fsdp_comm(cfg, o, layout, regather_blocks=True)

    def wrap(self, model):
        self._groups = super().param_groups(model)  # before sharding flattens every tensor to 1-D
        low = self.ctx.precision != "fp32"
        kw = {"reshard_after_forward": self.opts.reshard_after_forward,
              "mixed_precision": low, "compute_dtype": DTYPES[self.ctx.precision] if low else None,
              "fp32_reduce_scatter": low, "flatten_parameters": False,
              "move_params_to_cpu": self.opts.cpu_offload, "compute_device": self.ctx.device}
        for i, block in enumerate(model.blocks):
            model.blocks[i] = fairscale_dp.FullyShardedDataParallel(block, **kw)
        return fairscale_dp.FullyShardedDataParallel(model, **kw)

    def param_groups(self, module) -> list[dict]:
        return self._groups  # the same Parameter objects, now holding this rank's shard

    def no_sync(self):
        return self.model.no_sync()

    def clip(self, max_norm: float) -> None:
        self.model.clip_grad_norm_(max_norm)  # norms of the gradient shards, all-reduced

    def save(self, path: Path) -> None:
        state = {"model": self.model.local_state_dict(), "optimizer": self.optimizer.state_dict(),
                 "world_size": self.ctx.world_size}
        torch.save(state, path / f"rank{self.ctx.rank}.pt")

    def load(self, path: Path) -> None:
        state = torch.load(Path(path) / f"rank{self.ctx.rank}.pt", map_location=self.ctx.device, weights_only=True)
        self.model.load_local_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def describe(self) -> dict:
        return {"sharded": "parameters, gradients and optimizer state (FairScale FSDP per block + root)",
                "reshard_after_forward": self.opts.reshard_after_forward,
                "checkpoint": "local shards, one file per rank"}
