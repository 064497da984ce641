"""Memory and communication model of torch_nd (torch/nd.py): FSDP2 over dp_shard x cp (HSDP over dp_replicate),
DTensor tensor parallelism with or without sequence parallelism, context parallelism (Ulysses or a ring),
pipeline stages. Built from the same parts as the other backends' models (memory_model, fsdp, comm_model).

Activations per block, in values, on a rank that holds s/cp tokens of a micro-batch of b sequences:
(4 + 12/tp)·(s/cp)·b·h without sequence parallelism (the LayerNorms' and matmul inputs replicated over tp),
16/tp·(s/cp)·b·h with it (Korthikanti et al. 2022: everything split by tp); Ulysses' all-to-all'd q, k, v
are (s, h/cp): the same size as (s/cp, h); the ring keeps its own chunk and the output's log-sum-exp.
"""
from __future__ import annotations

from parallelkit.models.gpt import GPTConfig
from parallelkit.strategies.shared.comm_model import FP32, clip_norm, one_process, total, word
from parallelkit.strategies.shared.memory_model import pipeline_memory, replica_state


def _degrees(o, layout) -> tuple[int, int, int, int, bool]:
    shard = layout.dp // o.dp_replicate
    return o.dp_replicate, shard, layout.cp, layout.tp, layout.tp > 1 and o.sequence_parallel


def tp_params(c: GPTConfig, tp: int) -> tuple[float, float]:
    """(root, one block) parameters a tensor-parallel rank holds: the matmuls split, the rest whole."""
    block = c.block_params() - c.block_matmul_params() * (1 - 1 / tp)
    return c.num_params() - c.n_layer * c.block_params(), block


def _tp_costs(c: GPTConfig, tp: int) -> list[float]:
    """Parameters a tensor-parallel rank holds of each pipeline layer (embedding, blocks, head with its own copy)."""
    block = tp_params(c, tp)[1]
    return [x if i in (0, c.n_layer + 1) else block for i, x in enumerate(c.layer_params(own_head=True))]


def nd_activations(cfg, layers: int, cp: int, tp: int, sp: bool, head: bool = True) -> float:
    c, t = GPTConfig.from_cfg(cfg.model), cfg.train
    b, w = t.micro_batch_size, (4 if t.precision == "fp32" else 2)
    sbh = c.seq_len // cp * b * c.d_model
    per_block = sbh * (16 / tp if sp else 4 + 12 / tp)
    acts = (layers * sbh + (per_block if layers else 0)) if t.activation_checkpointing else layers * per_block
    out = acts * w
    if head:  # the head's inputs (whole over tp) and the loss's fp32 tensors, for this rank's s/cp tokens
        out += 2 * sbh * w + (12 + (0 if w == 4 else w)) * b * c.seq_len // cp * c.vocab_size
    return out


def nd_memory(cfg, o, layout) -> dict:
    c = GPTConfig.from_cfg(cfg.model)
    rep, shard, cp, tp, sp = _degrees(o, layout)
    root, block = tp_params(c, tp)
    n = shard * cp  # FSDP2's shard group
    if layout.pp > 1:  # torch_pipe's stage model (its activations in flight), with this rank's tp share of the state
        balance = _balance(c, layout, o)
        r = pipeline_memory(cfg, layout, o.schedule, o.chunks, n > 1, balance)
        full, tp_costs = c.layer_params(own_head=True), _tp_costs(c, tp)
        starts = [sum(balance[:s]) for s in range(len(balance) + 1)]
        rows = []
        for i, row in enumerate(r["stages"]):
            layers = [j for s in range(i, len(balance), layout.pp) for j in range(starts[s], starts[s + 1])]
            psi, whole = sum(tp_costs[j] for j in layers), sum(full[j] for j in layers)
            state = {k: v / (n if n > 1 else 1) for k, v in replica_state(cfg, psi).items()
                     if k in ("params", "grads", "optimizer")}
            rows.append({**row, **state, "buffers": row["buffers"] * psi / whole,
                         "activations": row["activations"] / cp / (tp if sp else 1)})
        top = max(rows, key=lambda x: sum(x[k] for k in ("params", "grads", "optimizer", "buffers", "activations")))
        return {**top, "stages": rows}
    psi = root + c.n_layer * block
    r = replica_state(cfg, psi)
    if n > 1 or rep > 1:
        r.update({k: r[k] / n for k in ("params", "grads", "optimizer")})
        units = root + (2 * block if o.reshard_after_forward else c.n_layer * block)
        r["buffers"] += word(cfg.train.precision) * units + FP32 * (root + block)
    return {**r, "activations": nd_activations(cfg, c.n_layer, cp, tp, sp)}


def _balance(c: GPTConfig, layout, o) -> list[int]:
    from parallelkit.strategies.shared.pipeline import gpt_layers, stage_balance
    return stage_balance(gpt_layers(c), layout.pp * o.chunks)


def nd_comm(cfg, o, layout) -> dict[str, float] | None:
    """Per optimizer step, busiest rank, what the counter sees (torch.distributed's and the functional
    collectives' Python calls): FSDP2's
    all-gather and reduce-scatter of this rank's (tp-split) parameters over dp_shard x cp (Ψ + m·L·block gathered
    with reshard_after_forward, as fsdp_comm), HSDP's all-reduce of the shard over dp_replicate, Ulysses'
    all-to-alls (q, k, v and the output forward; their gradients backward: 8 per block and micro-batch, each
    (s/cp)·b·h/tp fp32 values) or the ring's k and v passed cp - 1 times forward and, with their gradients, twice
    backward (each tensor counted by sender and receiver), the dk and dv accumulators home once more, the clip
    norm (fp64), and DTensor's tensor-parallel collectives (``nd_tp_comm``)."""
    if one_process(layout):
        return {}
    if layout.pp > 1:
        return _pipeline_comm(cfg, o, layout)
    c, m = GPTConfig.from_cfg(cfg.model), cfg.train.grad_accum
    rep, shard, cp, tp, _ = _degrees(o, layout)
    root, block = tp_params(c, tp)
    psi, n = root + c.n_layer * block, shard * cp
    parts = [clip_norm(cfg, nbytes=8)]  # the norm's square is summed in fp64
    if n > 1:
        gathered = root + c.n_layer * block * (1 + m) if o.reshard_after_forward else psi
        parts.append({"all_gather": word(cfg.train.precision) * gathered, "reduce_scatter": FP32 * psi})
    if rep > 1:
        parts.append({"all_reduce": FP32 * psi / n})
    if cp > 1:
        values, w = cfg.train.micro_batch_size * c.seq_len // cp * c.d_model // tp, word(cfg.train.precision)
        if o.cp_mode == "ulysses":  # q, k, v and the output forward, their gradients backward
            parts.append({"all_to_all": 8 * c.n_layer * m * values * w})
        else:  # k, v forward (cp - 1 shifts); k, v with fp32 dk, dv backward (cp - 1 shifts), dk, dv home (1 shift);
            # each tensor counted by its sender and its receiver
            per = (cp - 1) * 2 * w + (cp - 1) * (2 * w + 2 * FP32) + 2 * FP32
            parts.append({"send_recv": 2 * c.n_layer * m * values * per})
    return total(*parts, nd_tp_comm(cfg, o, layout))


def nd_tp_comm(cfg, o, layout, blocks: int | None = None, ends: tuple[bool, bool] = (True, True)) -> dict[str, float]:
    """DTensor's tensor-parallel collectives (functional collectives) per optimizer step on a rank holding
    ``blocks`` blocks (None: all) and (``ends``) the embedding and the head: without sequence parallelism
    Megatron's all-reduces (comm_model.tensor_parallel); with it, per block and micro-batch, the attention's and
    MLP's inputs all-gathered and their outputs reduce-scattered in forward, and the reverse for their gradients
    in backward, plus the sequence split after the embedding and joined before the head (an all-gather each way),
    and the partial gradients (sums over this rank's part of the sequence) of what a block keeps whole: under
    FSDP2 its norms', all-reduced once a step after backward; without FSDP2 its norms' and row-parallel biases',
    which stay partial and are all-reduced each time AdamW reads them (twice a step), whatever the number of
    micro-batches (both as the counter records them on gloo)."""
    from parallelkit.strategies.shared.comm_model import activation, tensor_parallel

    rep, shard, cp, tp, sp = _degrees(o, layout)
    if tp == 1 or one_process(layout):
        return {}
    c, m = GPTConfig.from_cfg(cfg.model), cfg.train.grad_accum
    layers, w = c.n_layer if blocks is None else blocks, word(cfg.train.precision)
    if not sp:
        return {k: v / cp for k, v in tensor_parallel(cfg, layers, w, FP32).items()}
    a = activation(cfg) / cp  # this rank's part of the sequence, whole hidden size
    whole = c.block_params() - c.block_matmul_params()  # norms and row-parallel biases
    if shard * cp > 1 or rep > 1:  # FSDP2's post-backward: the norms only
        reduced = layers * (whole - 2 * c.d_model if isinstance(c, GPTConfig) else whole)
    else:
        reduced = 2 * layers * whole
    split_join = FP32 * ends[0] + w * ends[1]  # the split's gradient gathered back; the head's input gathered
    return total({"all_gather": m * a * (2 * layers * (w + FP32) + split_join),
                  "reduce_scatter": m * a * 2 * layers * (w + FP32), "all_reduce": reduced * FP32})


def nd_compute_share(cfg, o, layout) -> float:
    """The tensor-parallel ranks split the blocks' FLOPs but each computes the whole head (the embedding and the tied
    head stay whole): (tp x head + L x block) / (head + L x block) of an even split (pipelines: 1, their stages'
    shares are the projection's)."""
    from parallelkit.strategies.shared.pipeline import whole_head_share

    tp = _degrees(o, layout)[3]
    if tp == 1 or layout.pp > 1 or one_process(layout):
        return 1.0
    return whole_head_share(GPTConfig.from_cfg(cfg.model), tp)


def _pipeline_comm(cfg, o, layout) -> dict[str, float]:
    """Under pp, per pipeline rank as torch_pipe's model: the stage boundaries' activations (this rank's s/cp, and
    1/tp of that under sequence parallelism) forward and their gradients back, the tied embedding's gradient
    between first and last stage (this rank's FSDP shard of it), FSDP2 over the stage's (tp-split) parameters,
    kept gathered for the step (one all-gather and one reduce-scatter), the fp64 clip norm, and DTensor's
    tensor-parallel collectives of the rank's blocks (``nd_tp_comm``)."""
    from parallelkit.strategies.shared.comm_model import busiest, pipeline_p2p, stage_params
    c = GPTConfig.from_cfg(cfg.model)
    rep, shard, cp, tp, sp = _degrees(o, layout)
    p, v, n = layout.pp, o.chunks, shard * cp
    balance = _balance(c, layout, o)
    params = stage_params(_tp_costs(c, tp), balance)
    stages = [[r + k * p for k in range(v)] for r in range(p)]
    first = [sum(balance[:s]) for s in range(len(balance))]  # each stage's first layer: embedding, blocks, head
    layers = [set(range(first[s], first[s] + balance[s])) for s in range(len(balance))]
    message = FP32 * cfg.train.micro_batch_size * c.seq_len // cp // (tp if sp else 1) * c.d_model
    rows = []
    for r, p2p in enumerate(pipeline_p2p(cfg, stages, p * v, message)):
        mine = FP32 * sum(params[s] for s in stages[r])
        tied = {"all_reduce": FP32 * c.vocab_size * c.d_model / n} if c.tie_weights and r in (0, p - 1) else {}
        dp = {"all_gather": mine, "reduce_scatter": mine} if n > 1 else {}
        if rep > 1:
            dp["all_reduce"] = mine / n
        held = set().union(*(layers[s] for s in stages[r]))
        blocks = len(held - {0, c.n_layer + 1})
        tp_comm = nd_tp_comm(cfg, o, layout, blocks, (0 in held, c.n_layer + 1 in held))
        rows.append(total(p2p, tied, dp, clip_norm(cfg, nbytes=8), tp_comm))
    return busiest(rows)
