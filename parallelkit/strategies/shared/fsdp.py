"""The memory and communication model of fully sharded data parallelism with a unit per block and a root unit,
shared by PyTorch FSDP2 (torch/fsdp.py), FSDP1 (torch/fsdp1.py) and FairScale's FSDP (fairscale/fsdp.py).
``o`` is the backend's options: ``reshard_after_forward``, ``cpu_offload`` and, where it has one, ``reduce_dtype``."""
from __future__ import annotations

import contextlib

from parallelkit.models.gpt import GPTConfig
from parallelkit.strategies.shared.comm_model import (
    FP32,
    clip_norm,
    gpt,
    one_process,
    total,
    word,
)
from parallelkit.strategies.shared.memory_model import activations, replica_state


def fsdp_memory(cfg, o, n: int) -> dict:
    """Sharded state; buffers: the gathered units (the root stays gathered; ZeRO-2 keeps every block) and
    one unit's unsharded gradient before its reduce-scatter."""
    c, mp = GPTConfig.from_cfg(cfg.model), cfg.train.precision != "fp32"
    psi, block = c.num_params(), c.block_params()
    root = psi - c.n_layer * block
    r = {k: v / n for k, v in replica_state(cfg, psi).items() if k in ("params", "grads", "optimizer")}
    units = root + (2 * block if o.reshard_after_forward else c.n_layer * block)
    grad = 2 if getattr(o, "reduce_dtype", None) in ("bf16", "fp16") else 4
    r.update(buffers=(2 if mp else 4) * units + grad * (root + block), offloaded=0)
    if o.cpu_offload:
        r["offloaded"] = r["params"] + r["grads"] + r["optimizer"]
        r.update(params=0, grads=0, optimizer=0)
    return {**r, "activations": activations(cfg)}


def fsdp_comm(cfg, o, layout, regather_root: bool = False, regather_blocks: bool = False,
              clip_vector: bool = False) -> dict[str, float]:
    """FSDP with a unit per block and a root unit (embeddings, tied head, final LayerNorm), as fsdp.py wraps it.

    all_gather, in param_dtype (fp32, or the training precision): every unit before its first forward (Ψ); with
    reshard_after_forward every block again in each micro-batch's backward (m·L·block). The root is not resharded
    after forward (backward needs the head first), so it is not gathered again: Ψ + L·block where the ZeRO paper
    counts 2Ψ (on ``small``, whose root holds most of the parameters, 1.2Ψ). While accumulating, FSDP2's no_sync
    (``set_reshard_after_backward(False)``) keeps units gathered, so later forwards gather nothing. FSDP1 and
    FairScale free resharding units after backward even then: ``regather_blocks`` (and FSDP1's root,
    ``regather_root``) are gathered again in every micro-batch's forward.
    reduce_scatter, in reduce_dtype (fp32 unless strategy.reduce_dtype says otherwise): every gradient once per
    step (Ψ: no_sync accumulates unsharded gradients). all_reduce: the clip norm, one fp32 scalar; ``clip_vector``:
    one all-reduce of every parameter's norm instead (FSDP2's clip_grad_norm_ over DTensor shards, a functional
    collective of one fp32 value per parameter tensor).
    """
    if one_process(layout):
        return {}
    c, m = gpt(cfg), cfg.train.grad_accum
    blocks = c.n_layer * c.block_params()
    root = c.num_params() - blocks
    gathered = c.num_params()
    if o.reshard_after_forward:
        gathered = root * (m if regather_root else 1) + blocks * ((m if regather_blocks else 1) + m)
    reduce_word = 2 if getattr(o, "reduce_dtype", None) in ("bf16", "fp16") else FP32
    clip = clip_norm(cfg, nbytes=FP32 * (param_tensors(cfg) if clip_vector else 1))
    return total({"all_gather": word(cfg.train.precision) * gathered, "reduce_scatter": reduce_word * c.num_params()},
                 clip)


def param_tensors(cfg) -> int:
    """How many parameter tensors the model has (a tied one once), counted on a model built on the meta device."""
    from parallelkit.models.gpt import build_model

    return sum(1 for _ in build_model(cfg.model, 0, device="meta", init=False).parameters())


def stage_label(o, prefix: str) -> str:
    return f"{prefix} {'zero3' if o.reshard_after_forward else 'zero2'}" + (" offload" if o.cpu_offload else "")


@contextlib.contextmanager
def fsdp2_no_sync(model):
    """FSDP2 while accumulating: unsharded gradients kept locally and parameters kept gathered between
    micro-batches, so the last micro-batch reduce-scatters the accumulated gradient once (as DDP's no_sync);
    the price is a full-size gradient (and gathered parameters) per rank while accumulating."""
    model.set_requires_gradient_sync(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        model.set_reshard_after_backward(True)
