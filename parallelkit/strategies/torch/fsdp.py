"""PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Every transformer block is its own FSDP unit (all-gathered just before it runs, freed
after), and the root unit holds the embeddings, the tied output projection and the final
LayerNorm. ``reshard_after_forward`` picks the ZeRO stage it mirrors: true frees each
block's gathered parameters after forward and gathers them again in backward (ZeRO-3);
false keeps them until backward (ZeRO-2, FSDP1's SHARD_GRAD_OP).

The model is built on the meta device, sharded, then materialised: each rank allocates and
initialises only its own shards (``GPT.init_weights`` gives them their slice of the same full
values every other strategy starts from), so no rank ever holds the whole fp32 model.

Mixed precision is FSDP's own: the fp32 shards are the master weights, parameters are
all-gathered in ``param_dtype`` and every op of the forward runs in it, gradients are
reduce-scattered in ``reduce_dtype`` (fp32 by default). No ``torch.autocast`` on top by
default: it would only re-cast what is already bf16 (set ``strategy.autocast=true`` to
keep softmax/LayerNorm in fp32 as autocast does for DDP). The loss is always fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.by_name import check_names
from parallelkit.strategies.shared.fsdp import fsdp2_no_sync, fsdp_comm, fsdp_memory, stage_label
from parallelkit.util.dtypes import DTYPES


@dataclass
class FSDPOptions(Options):
    reshard_after_forward: bool = True  # true: free gathered params after forward (ZeRO-3); false: keep them (ZeRO-2)
    cpu_offload: bool = False  # sharded params, grads and optimizer step on the CPU
    reduce_dtype: Optional[str] = None  # gradient reduce-scatter dtype under bf16/fp16 training: null = fp32
    autocast: bool = False  # also run the forward under torch.autocast (FSDP already computes in param_dtype)

    def validate(self) -> None:
        self.choice("reduce_dtype", (None, "fp32", "bf16", "fp16"))


class FSDPStrategy(Strategy):
    Options = FSDPOptions
    scaler_class = ShardedGradScaler  # all-reduces found_inf: each rank only sees its gradient shard

    @classmethod
    def check(cls, cfg, o) -> None:
        if o.reduce_dtype == "fp16" and cfg.train.precision != "fp16":
            raise ConfigError("strategy.reduce_dtype=fp16 needs train.precision=fp16: use fp32 or bf16")

    @classmethod
    def label(cls, cfg, o) -> str:
        return stage_label(o, "fsdp2")

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return fsdp_memory(cfg, o, layout.dp)

    @classmethod
    def comm(cls, cfg, o, layout):
        """See ``fsdp_comm``: measured on tiny (2 ranks, grad_accum 1 and 2) to the byte; cpu_offload moves the same."""
        return fsdp_comm(cfg, o, layout, clip_vector=True)

    @classmethod
    def overlap(cls, cfg, o):
        return {"all_gather": "forward+backward", "reduce_scatter": "backward"}  # prefetch; per-block reduce

    @classmethod
    def optimizer_elements(cls, cfg, o, parts):
        """Each rank steps its 1/world shard of every parameter; cpu_offload moves the shards, not the work (its
        offloaded state is parameters, gradients and moments: the base rule would count it twice)."""
        return -(-GPTConfig.from_cfg(cfg.model).num_params() // int(cfg.world_size))

    @classmethod
    def proxy_held(cls, cfg, o, layout):
        return {"fsdp2": {"reshard": o.reshard_after_forward, "mesh": [1, layout.dp]}}

    @property
    def autocast_forward(self) -> bool:
        return self.opts.autocast

    def mp_dtypes(self) -> tuple[torch.dtype | None, torch.dtype]:
        """(param_dtype, reduce_dtype): None/fp32 in fp32 runs; low-precision compute, fp32 reduction by default."""
        param = None if self.ctx.precision == "fp32" else DTYPES[self.ctx.precision]
        return param, DTYPES[self.opts.reduce_dtype or "fp32"]

    def build_model(self, build):
        return build(device="meta", init=False)  # sharded first, materialised in wrap

    def wrap(self, model):
        ctx, o = self.ctx, self.opts
        param_dtype, reduce_dtype = self.mp_dtypes()
        kw: dict[str, Any] = {
            "mesh": init_device_mesh(ctx.device.type, (ctx.world_size,)),
            "reshard_after_forward": o.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if o.cpu_offload else OffloadPolicy(),
        }
        for block in model.blocks:
            fully_shard(block, **kw)
        # root: embeddings, tied head, final LayerNorm. Kept gathered after forward in both modes: backward
        # needs the head first thing (what fully_shard's default, None, does for a root).
        fully_shard(model, **{**kw, "reshard_after_forward": False})
        model.to_empty(device="cpu" if o.cpu_offload else ctx.device)
        model.tie()
        model.init_weights(ctx.seed)  # each rank fills its shards with its slice of the full initial values
        return model

    def no_sync(self):
        return fsdp2_no_sync(self.model)  # accumulate unsharded; one reduce-scatter on the last micro-batch

    # clip: the base's clip_grad_norm_ over DTensor gradient shards reduces the partial norms over the mesh,
    # so the norm (and the clipping coefficient) is the global one on every rank.

    # ---- checkpoints ----
    # Portable: torch.distributed.checkpoint's state-dict helpers gather the full state (rank 0, on the CPU)
    # and shard a full one back; the optimizer state is keyed by the same parameter names.
    def export_state(self):
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=full)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.ctx.rank != 0:
            return None
        names = [n for n, _ in self.portable_params()]
        model = {n: model_sd[n].detach().float().clone() for n in names}
        optim = {n: {k: torch.as_tensor(v).detach().float().clone() for k, v in optim_sd["state"][n].items()}
                 for n in names if n in optim_sd["state"]}
        return model, optim

    def import_state(self, model, optim):
        check_names([n for n, _ in self.portable_params()], model)
        full = StateDictOptions(full_state_dict=True)
        sd = dict(model)
        if self.ctx.model.tie_weights:
            sd["head.out.weight"] = model["embed.tok.weight"]  # the state dict names the tied weight twice
        set_model_state_dict(self.model, sd, options=full)
        if not optim:
            return
        groups, names = [], {id(p): n for n, p in self.portable_params()}
        for g in self.optimizer.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]})
        state = {n: {k: v.clone() for k, v in st.items()} for n, st in optim.items()}
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": groups}, options=full)

    # Native: torch.distributed.checkpoint, each rank writes and reads its own shards.
    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def describe(self) -> dict[str, Any]:
        param_dtype, reduce_dtype = self.mp_dtypes()
        raf = self.opts.reshard_after_forward
        return {
            "sharded": "parameters, gradients and optimizer state (fully_shard per block + root)",
            "reshard_after_forward": raf, "mirrors": "ZeRO-3" if raf else "ZeRO-2",
            "param_dtype": str(param_dtype or torch.float32).removeprefix("torch."),
            "reduce_dtype": str(reduce_dtype).removeprefix("torch."),
            "cpu_offload": self.opts.cpu_offload, "built": "on the meta device, sharded, then initialised per shard",
            "native_checkpoint": "torch.distributed.checkpoint (sharded)",
        }
