"""Portable state by parameter name: the helpers strategies share to implement export_state / import_state."""
from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def state_by_name(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Whole parameters and their torch AdamW state, by name, as fp32 CPU copies."""
    model, optim = {}, {}
    for name, p in named:
        model[name] = p.detach().float().cpu().clone()
        st = optimizer.state.get(p) if optimizer is not None else None
        if st and "exp_avg" in st:
            optim[name] = {k: st[k].detach().float().cpu().clone() for k in ADAM_KEYS}
            optim[name]["step"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().cpu().clone()
    return model, optim


def check_names(have: list[str], model: dict) -> None:
    """The checkpoint must hold every parameter this model has, with nothing left over."""
    missing, extra = sorted(set(have) - set(model)), sorted(set(model) - set(have))
    if missing or extra:
        raise ValueError(f"the checkpoint's model differs from this run's: missing {missing[:4]}, unexpected {extra[:4]} "
                         f"(resume with the model.* of the run that wrote it)")


@torch.no_grad()
def load_by_name(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None,
                 model: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy whole parameters in place and give a torch optimizer their AdamW state (through its own
    ``load_state_dict``, which puts each state on its parameter's device and dtype)."""
    check_names([n for n, _ in named], model)
    for name, p in named:
        if tuple(p.shape) != tuple(model[name].shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(model[name].shape)} != model's {tuple(p.shape)}")
        p.copy_(model[name])
    if optimizer is None:
        return
    names, groups, state, first = {id(p): n for n, p in named}, [], {}, 0
    for g in optimizer.param_groups:  # a state dict in torch's format: parameters numbered in group order
        ids = list(range(first, first + len(g["params"])))
        first += len(ids)
        for i, p in zip(ids, g["params"]):
            if names.get(id(p)) in optim:
                state[i] = {k: optim[names[id(p)]][k].clone() for k in ("step", *ADAM_KEYS)}
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``names`` of ``module`` (FSDP2 shards gathered: COLLECTIVE over each shard group) and their optimizer
    state, as full fp32 CPU copies; on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(module, options=full)
    osd = get_optimizer_state_dict(module, optimizer, options=full)["state"]
    return ({n: msd[n].detach().float().cpu().clone() for n in names},
            {n: {k: torch.as_tensor(v).detach().float().cpu().clone() for k, v in osd[n].items()} for n in names if n in osd})


def load_full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model: dict[str, torch.Tensor],
                    optim: dict[str, dict[str, torch.Tensor]], source: dict[str, str]) -> None:
    """Every parameter ``n`` of ``module`` from ``model[source[n]]`` (FSDP2 keeps its shard), its optimizer
    state from ``optim[source[n]]``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, {n: model[s] for n, s in source.items()}, options=full)
    if not optim:
        return
    ids = {id(p): n for n, p in module.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ids[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    state = {n: {k: v.clone() for k, v in optim[s].items()} for n, s in source.items() if s in optim}
    set_optimizer_state_dict(module, optimizer, {"state": state, "param_groups": groups}, options=full)
