"""Shared arithmetic of the memory model; each backend's ``Strategy.memory`` composes it.

Per rank, in bytes, by part: model state by the ZeRO paper (Rajbhandari et al. 2020, sec. 3:
fp32 AdamW 4+4+8 bytes/param; 16-bit 2+2+K=12), buffers (DDP buckets, gathered units,
autocast's weight cache), activations (Korthikanti et al. 2022: 34·s·b·h bytes per block in
16-bit, less two dropout masks = 16·s·b·h values; SDPA keeps no a·s² scores). Parameter
counts come from ``GPTConfig``, the same arithmetic the model is built from.
"""
from __future__ import annotations

from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPTConfig

PARTS = ("params", "grads", "optimizer", "buffers", "activations")  # what a rank holds, by kind
GPU_ALLOWANCE = 2**30  # a GPU's context, cuBLAS workspace and allocator slack before the first tensor (an allowance)


def parts_total(parts: dict) -> float:
    """Bytes of the parts a rank holds (PARTS; not what is offloaded)."""
    return sum(parts.get(k, 0) for k in PARTS)


def activation_values(c: GPTConfig, b: int, layers: int, tp: int = 1, ckpt: bool = False) -> float:
    """Activation values (not bytes) ``layers`` blocks keep for backward at micro-batch ``b``."""
    sbh = c.seq_len * b * c.d_model
    full = sbh * (4 + 12 / tp)  # LayerNorm, qkv and fc inputs (replicated under TP); qkv, attention, fc, GELU outputs
    return layers * sbh + (full if layers else 0) if ckpt else layers * full


def activations(cfg, tp: int = 1, vocab_split: bool = False) -> float:
    """A whole model's activations for one micro-batch, plus the head's inputs and the loss's fp32 tensors: at
    the backward's high point the log-softmax cross-entropy saved, its gradient and the logits' gradient, three
    fp32 b·s·V tensors (measured on `small`: +1.0, +1.0 and +1.2 logits' worth), and in 16-bit the model's own
    16-bit logits beside their fp32 copy."""
    c, t = GPTConfig.from_cfg(cfg.model), cfg.train
    b, word = t.micro_batch_size, (4 if t.precision == "fp32" else 2)
    logits = (12 + (0 if word == 4 else word)) * b * c.seq_len * c.vocab_size / (tp if vocab_split else 1)
    acts = activation_values(c, b, c.n_layer, tp, bool(t.activation_checkpointing)) + 2 * c.seq_len * b * c.d_model
    return acts * word + logits


def replica_state(cfg, psi: float) -> dict:
    """A full fp32 AdamW replica of ``psi`` parameters; autocast's 16-bit weight cache as a buffer."""
    mp = cfg.train.precision != "fp32"
    return {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi, "buffers": 2 * psi if mp else 0, "offloaded": 0}


def replica(cfg, layout: Layout, ddp_buckets: bool) -> dict:
    """single / ddp: every rank holds everything; DDP's buckets are a second copy of the gradients."""
    psi = GPTConfig.from_cfg(cfg.model).num_params()
    r = replica_state(cfg, psi)
    if ddp_buckets and layout.dp > 1:
        r["buffers"] += 4 * psi
    return {**r, "activations": activations(cfg)}


def zero_state_bytes(o: dict, psi: float, n: int, prec: str, zc: dict, accum: int = 1) -> dict:
    """ZeRO stage 0-3 partitioning, offload, buckets (Rajbhandari et al. 2020, fig. 1). Gradients are counted at
    the backward's high point: stages 1-2 reduce them into partitions, but every gradient is still alive then
    (measured on `small` at 2 ranks, grad_accum 1: full gradients on the busiest rank). Optimizer offload moves
    the master copy and moments to host memory and adds a host fp32 gradient partition (4 bytes/param / n)."""
    stage, p = int(o.get("zero_stage", 2)), (4 if prec == "fp32" else 2)
    k = 8 if stage == 0 and prec == "fp32" else 12  # stage 0 in fp32 steps the params directly: no master copy
    r = {"params": p * psi / (n if stage == 3 else 1), "grads": p * psi / (n if stage == 3 else 1),
         "optimizer": k * psi / (n if stage >= 1 else 1), "offloaded": 0}
    if o.get("offload_optimizer") not in (None, False, "none"):
        r["offloaded"] += r["optimizer"] + 4 * psi / n
        r["optimizer"] = 0
    if o.get("offload_param") not in (None, False, "none") and stage == 3:
        r["offloaded"] += r["params"]
        r["params"] = 0
    r["offloaded_to_disk"] = "nvme" in (o.get("offload_optimizer"), o.get("offload_param"))  # not in host memory
    bucket = p * zc["reduce_bucket_size"] * (2 if zc["overlap_comm"] else 1)
    live = min(psi, zc["stage3_max_live_parameters"] + zc["stage3_prefetch_bucket_size"])
    r["buffers"] = bucket + (p * live if stage == 3 else 0)
    return r


def in_flight(schedule: str, m: int, p: int, i: int, v: int = 1) -> int:
    """Micro-batches (interleaved: model chunks) whose activations pipeline rank ``i`` of ``p`` holds at once:
    GPipe all ``m``; 1F1B at most ``p - i`` (the warm-up depth); interleaved 1F1B its warm-up depth + 1 over
    ``v`` chunks, as torch.distributed.pipelining schedules it."""
    if schedule == "gpipe":
        return m
    if schedule == "interleaved_1f1b":
        per_round = m // max(1, m // p)
        return min((v - 1) * per_round + 2 * (p - 1 - i) + 1, m * v)
    return min(m, p - i)


def pipeline_memory(cfg, layout: Layout, schedule: str, v: int, sharded_dp: bool, balance: list[int]) -> dict:
    """Per pipeline rank (a rank holds stages i, i + pp, ...): the state of its layers (the last stage's own copy
    of a tied head included and stepped), sharded over dp under FSDP or with DDP's buckets, and the activations
    of the micro-batches in flight (the last stage's also the saved log-softmax). Returns the largest rank's
    parts and every rank's in ``stages``."""
    c, t = GPTConfig.from_cfg(cfg.model), cfg.train
    b, m, p, dp = t.micro_batch_size, t.grad_accum, layout.pp, layout.dp
    L, word, ckpt = c.n_layer, (4 if t.precision == "fp32" else 2), bool(t.activation_checkpointing)
    costs, starts = c.layer_params(own_head=True), [sum(balance[:s]) for s in range(len(balance) + 1)]
    rows = []
    for i in range(p):
        psi = acts = 0.0
        for s in range(i, len(balance), p):
            layers = range(starts[s], starts[s + 1])
            psi += sum(costs[j] for j in layers)
            blocks = sum(1 for j in layers if 0 < j <= L)
            per_mb = activation_values(c, b, blocks, 1, ckpt) * word
            if L + 1 in layers:  # the head's two inputs and the log-softmax cross-entropy keeps (fp32)
                per_mb += 2 * c.seq_len * b * c.d_model * word + 4 * b * c.seq_len * c.vocab_size
            acts += per_mb / v
        acts *= in_flight(schedule, m, p, i, v)
        if i == p - 1:
            acts += 8 * b * c.seq_len * c.vocab_size  # the loss's and the logits' gradients, one micro-batch at a time
        r = replica_state(cfg, psi)
        if dp > 1 and sharded_dp:
            r.update({k: r[k] / dp for k in ("params", "grads", "optimizer")}, buffers=r["buffers"] + 8 * psi)
        elif dp > 1:
            r["buffers"] += 4 * psi  # DDP's buckets
        rows.append({**r, "activations": acts})
    top = max(rows, key=parts_total)
    return {**top, "stages": rows}
