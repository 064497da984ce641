"""PyTorch FSDP1 (``FullyShardedDataParallel``): the flat-parameter predecessor of FSDP2.

One FSDP unit per transformer block (``ModuleWrapPolicy``) plus the root, as for
``fsdp``. FSDP1 needs a non-CPU accelerator: on a CPU-only torch build it fails at wrap
time, so ``check`` refuses it before any worker starts. Checkpoints go through
torch.distributed.checkpoint exactly as for FSDP2 (``get_state_dict`` handles both).
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import Block
from parallelkit.strategies.base import Strategy
from parallelkit.strategies.shared.fsdp import fsdp_comm, stage_label
from parallelkit.strategies.shared.optim import decays
from parallelkit.strategies.torch.fsdp import FSDPStrategy


def has_accelerator_build() -> bool:
    """What FSDP1 itself checks: a compiled-in accelerator (CUDA, XPU, ...), not the CPU."""
    try:
        return torch.accelerator.current_accelerator(check_available=False) is not None
    except TypeError:  # torch 2.6 has no check_available: a build with CUDA or XPU compiled in
        return torch.backends.cuda.is_built() or bool(getattr(torch, "xpu", None) and torch.xpu._is_compiled())


class FSDP1Strategy(FSDPStrategy):
    portable = False  # GPU only: its export/import is unwritten until it can be tested on a GPU

    @classmethod
    def check(cls, cfg, o) -> None:
        super().check(cfg, o)
        if not has_accelerator_build():
            raise ConfigError(f"strategy={o.name}: FSDP1 (FullyShardedDataParallel) needs a non-CPU accelerator "
                              f"device and torch {torch.__version__} is a CPU-only build: use strategy=fsdp (FSDP2), which runs on CPU")

    @classmethod
    def label(cls, cfg, o) -> str:
        return stage_label(o, "fsdp1")

    @classmethod
    def comm(cls, cfg, o, layout):
        """``fsdp_comm`` with FSDP1's accumulation: FULL_SHARD frees every unit after backward even under no_sync
        (``_should_free_in_backward``), so each micro-batch's forward gathers all of them again; its clip_grad_norm_
        all-reduces one fp32 norm. From FSDP1's source; not measured (it needs an accelerator build of torch)."""
        return fsdp_comm(cfg, o, layout, regather_root=True, regather_blocks=True)

    build_model = Strategy.build_model  # FSDP1 wraps a materialised model

    def wrap(self, model):
        offload = self.opts.cpu_offload
        if offload:
            model = model.cpu()
        # Weight-decay groups by name from the unwrapped model: after wrapping, FSDP1's (use_orig_params)
        # parameters are 1-D views of flat shards, so their shapes no longer tell matrices from vectors.
        self._decay = {n for n, p in model.named_parameters() if decays(n, p.shape)}
        param_dtype, reduce_dtype = self.mp_dtypes()
        return FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            sharding_strategy=ShardingStrategy.FULL_SHARD if self.opts.reshard_after_forward else ShardingStrategy.SHARD_GRAD_OP,
            mixed_precision=(MixedPrecision(param_dtype=param_dtype, reduce_dtype=reduce_dtype, buffer_dtype=param_dtype)
                             if param_dtype or reduce_dtype != torch.float32 else None),
            cpu_offload=CPUOffload(offload_params=offload),
            device_id=self.ctx.device if self.ctx.device.type != "cpu" else None,
            use_orig_params=True,  # per-parameter names, so weight-decay groups and DCP keys stay the model's own
        )

    def param_groups(self, module) -> list[dict]:
        wd = self.ctx.optim.weight_decay
        groups: list[dict] = [{"params": [], "weight_decay": wd}, {"params": [], "weight_decay": 0.0}]
        for n, p in self.model.named_parameters():
            groups[0 if n.replace("_fsdp_wrapped_module.", "") in self._decay else 1]["params"].append(p)
        return groups

    def no_sync(self):
        return self.model.no_sync()

    def clip(self, max_norm: float) -> None:
        self.model.clip_grad_norm_(max_norm)  # FSDP1's own: all-reduces the norm of the flat gradient shards

    def describe(self) -> dict:
        facts = super().describe()
        raf = self.opts.reshard_after_forward
        facts.update(sharded="parameters, gradients and optimizer state (FSDP1 flat parameters, one unit per block)",
                     sharding_strategy="FULL_SHARD" if raf else "SHARD_GRAD_OP", built="whole, then wrapped")
        return facts
