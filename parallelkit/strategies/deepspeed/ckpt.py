"""DeepSpeed's state <-> the portable form, through DeepSpeed's own consolidation API.

ZeRO 1-3 (and the bf16 optimizer) keep the fp32 master weights and AdamW's moments in flat
per-rank partitions; ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
all-gather one parameter's full value from them (collective), and the ``safe_set_full_*`` twins
write each rank's slice of a full value back. What they do not cover is done here:

* the step count, kept per flat partition by the inner optimizer (torch AdamW: a tensor;
  DeepSpeedCPUAdam: an int), read from and written to that state directly;
* a fresh engine has no optimizer state until its first step (AdamW creates it lazily): zero
  moments are created on the flat partitions first, then linked to the parameters as DeepSpeed
  links them after a step (for every parameter group: DeepSpeed 0.19 links only the first);
* the module's own copy of a parameter (the one forward uses): whole on every rank under ZeRO 1-2,
  partitioned under ZeRO 3 (written through ``GatheredParameters``, as initialisation does).

ZeRO 0 in fp32 steps the run's torch AdamW over the module's parameters directly: the shared
by-name helpers serve it.
"""
from __future__ import annotations

import torch
from torch import nn

from parallelkit.strategies.shared.by_name import (
    ADAM_KEYS,
    check_names,
    load_by_name,
    state_by_name,
)


def named(engine) -> list[tuple[str, nn.Parameter]]:
    return list(engine.module.named_parameters())


def mapped(engine) -> bool:
    """Does DeepSpeed hold the fp32 state in flat partitions (ZeRO 1-3, bf16 optimizer)?"""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named(engine))


def flat_partitions(opt) -> list[torch.Tensor]:
    """The fp32 flat partitions the inner optimizer steps (their state holds the moments and the step)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if getattr(opt, attr, None):
            return list(getattr(opt, attr))
    raise RuntimeError(f"unknown DeepSpeed optimizer {type(opt).__name__}: cannot find its fp32 partitions")


def read_step(opt) -> float | None:
    steps = {float(opt.optimizer.state[f]["step"]) for f in flat_partitions(opt) if "step" in opt.optimizer.state.get(f, {})}
    if len(steps) > 1:
        raise RuntimeError(f"DeepSpeed's partitions disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else None


def ensure_state(opt, step: float) -> None:
    """Moments on every flat partition (zeros where none yet), the step count set, linked to the parameters."""
    inner = opt.optimizer
    int_step = type(inner).__name__ == "DeepSpeedCPUAdam"  # its step is a plain int
    for f in flat_partitions(opt):
        st = inner.state[f]
        for k in ADAM_KEYS:
            if k not in st:
                st[k] = torch.zeros_like(f)
        old = st.get("step")
        st["step"] = int(step) if int_step or (old is not None and not torch.is_tensor(old)) else \
            torch.tensor(float(step), dtype=torch.float32)
    relink(opt)


def relink(opt) -> None:
    """Point each parameter's optimizer-state fragments (ZeRO 1-2, bf16) at its partition's state. DeepSpeed links
    them once, after stepping the first parameter group, when the other groups have no state yet; so the second
    group (biases, LayerNorms) is left unlinked. Re-linking every group is idempotent."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    lp_groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if lp_groups is None:  # ZeRO-3 reads the state through the flat partition itself
        return
    for lp, flat in zip(lp_groups, flat_partitions(opt)):
        if opt.optimizer.state.get(flat):
            lazy_init_hp_params_optimizer_state(lp, flat, opt.optimizer.state)


def export_state(engine, rank: int):
    if not mapped(engine):
        model, optim = state_by_name(named(engine), engine.optimizer)
        return (model, optim) if rank == 0 else None
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = read_step(engine.optimizer)
    relink(engine.optimizer)
    model, optim = {}, {}
    for name, p in named(engine):
        shape = tuple(getattr(p, "ds_shape", p.shape))
        model[name] = safe_get_full_fp32_param(p).detach().float().cpu().reshape(shape).clone()
        if step is not None:
            optim[name] = {k: safe_get_full_optimizer_state(p, k).detach().float().cpu().reshape(shape).clone()
                           for k in ADAM_KEYS}
            optim[name]["step"] = torch.tensor(step, dtype=torch.float32)
    return (model, optim) if rank == 0 else None


@torch.no_grad()
def import_state(engine, model: dict, optim: dict, rank: int, device: torch.device) -> None:
    if not mapped(engine):
        load_by_name(named(engine), engine.optimizer, model, optim)
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    check_names([n for n, _ in named(engine)], model)
    steps = {float(st["step"]) for st in optim.values()}
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's parameters were stepped different numbers of times ({sorted(steps)}): "
                         f"DeepSpeed keeps one count per partition")
    if steps:
        ensure_state(engine.optimizer, steps.pop())
    for name, p in named(engine):
        full = model[name].to(device)
        safe_set_full_fp32_param(p, full)  # this rank's slice of the fp32 master copy
        if hasattr(p, "ds_id"):  # ZeRO-3: the module's partition, re-scattered from rank 0's full value
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(full.to(p.dtype))
        else:
            p.data.copy_(full.to(p.dtype))
        for k in ADAM_KEYS if name in optim else ():
            safe_set_full_optimizer_state(p, optim[name][k].to(device), k)
