"""PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Every transformer block is its own FSDP unit (all-gathered just before it runs, freed
after), and the root unit holds the embeddings, the tied output projection and the final
LayerNorm. ``reshard_after_forward`` picks the ZeRO stage it mirrors: true frees each
block's gathered parameters after forward and gathers them again in backward (ZeRO-3);
false keeps them until backward (ZeRO-2, FSDP1's SHARD_GRAD_OP).

Mixed precision is FSDP's own: the fp32 shards are the master weights, parameters are
all-gathered in ``param_dtype`` and every op of the forward runs in it, gradients are
reduce-scattered in ``reduce_dtype`` (fp32 by default). No ``torch.autocast`` on top by
default: it would only re-cast what is already bf16 (set ``strategy.autocast=true`` to
keep softmax/LayerNorm in fp32 as autocast does for DDP). The loss is always fp32.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ..config import ConfigError
from ..metrics import DTYPES
from .base import Strategy

REDUCE_DTYPES = (None, "fp32", "bf16", "fp16")


def check_options(cfg) -> None:
    """Options shared by FSDP2 and FSDP1: one line naming the key on a bad value."""
    s = cfg.strategy
    for key in ("reshard_after_forward", "cpu_offload", "autocast"):
        if not isinstance(s.get(key, False), bool):
            raise ConfigError(f"strategy.{key}={s.get(key)!r}: must be true or false")
    if s.get("reduce_dtype") not in REDUCE_DTYPES:
        raise ConfigError(f"strategy.reduce_dtype={s.get('reduce_dtype')!r}: choose null (fp32), fp32, bf16 or fp16")
    if s.get("reduce_dtype") == "fp16" and cfg.train.precision != "fp16":
        raise ConfigError("strategy.reduce_dtype=fp16 needs train.precision=fp16: use fp32 or bf16")


def stage_label(cfg, prefix: str) -> str:
    s = cfg.strategy
    label = f"{prefix} {'zero3' if s.get('reshard_after_forward', True) else 'zero2'}"
    return label + (" offload" if s.get("cpu_offload", False) else "")


class FSDPStrategy(Strategy):
    @classmethod
    def check(cls, cfg) -> None:
        check_options(cfg)

    @classmethod
    def label(cls, cfg) -> str:
        return stage_label(cfg, "fsdp2")

    def mp_dtypes(self) -> tuple[torch.dtype | None, torch.dtype]:
        """(param_dtype, reduce_dtype): None/fp32 in fp32 runs; low-precision compute, fp32 reduction by default."""
        param = None if self.ctx.precision == "fp32" else DTYPES[self.ctx.precision]
        reduce = self.options.get("reduce_dtype") or "fp32"
        return param, DTYPES[reduce]

    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        self.ctx = ctx
        model = model_factory().to(ctx.device)
        param_dtype, reduce_dtype = self.mp_dtypes()
        kw: dict[str, Any] = {
            "mesh": init_device_mesh(ctx.device.type, (ctx.world_size,)),
            "reshard_after_forward": self.options.get("reshard_after_forward", True),
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": (CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
                               if self.options.get("cpu_offload", False) else OffloadPolicy()),
        }
        for block in model.blocks:
            fully_shard(block, **kw)
        # root: embeddings, tied head, final LayerNorm. Kept gathered after forward in both modes: backward
        # needs the head first thing (what fully_shard's default, None, does for a root).
        fully_shard(model, **{**kw, "reshard_after_forward": False})
        self.model = model
        self.optimizer = optimizer_factory(model)  # after sharding: the optimizer sees (and holds state for) the shards
        if ctx.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler()  # all-reduces found_inf: each rank only sees its gradient shard

    def autocast(self):
        return super().autocast() if self.options.get("autocast", False) else contextlib.nullcontext()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate unsharded gradients locally and keep parameters gathered between micro-batches.

        The last micro-batch then reduce-scatters the accumulated gradient once, as DDP's
        no_sync does; the price is a full-size gradient (and gathered parameters) per rank
        while accumulating.
        """
        self.model.set_requires_gradient_sync(False)
        self.model.set_reshard_after_backward(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
            self.model.set_reshard_after_backward(True)

    def clip_grad_norm(self, max_norm: float) -> None:
        # Gradients are DTensor shards: clip_grad_norm_ reduces the partial norms over the mesh,
        # so the norm (and the clipping coefficient) is the global one on every rank.
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    # ---- checkpoints: torch.distributed.checkpoint, each rank writes and reads its own shards ----
    def save(self, path: Path, step: int) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
        if self.ctx.rank == 0:
            (path / "step.json").write_text(json.dumps({"step": step}))

    def load(self, path: Path) -> int:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return json.loads((path / "step.json").read_text())["step"]

    def describe(self) -> dict[str, Any]:
        param_dtype, reduce_dtype = self.mp_dtypes()
        raf = self.options.get("reshard_after_forward", True)
        return {
            "sharded": "parameters, gradients and optimizer state (fully_shard per block + root)",
            "reshard_after_forward": raf, "mirrors": "ZeRO-3" if raf else "ZeRO-2",
            "param_dtype": str(param_dtype or torch.float32).removeprefix("torch."),
            "reduce_dtype": str(reduce_dtype).removeprefix("torch."),
            "cpu_offload": self.options.get("cpu_offload", False),
            "checkpoint": "torch.distributed.checkpoint (sharded)",
        }
