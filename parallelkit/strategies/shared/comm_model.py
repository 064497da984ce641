"""Shared arithmetic of the communication model; each backend's ``Strategy.comm`` composes it.

What is predicted is what ``metrics.CommCounter`` counts on the probe step: the payload a rank hands to each
torch.distributed call in one optimizer step, in bytes, by kind (``metrics.comm_kind``): all_reduce, reduce and
broadcast the tensor; all_gather the full output; reduce_scatter the full input; send and recv the tensor (each
side counts its own). It is not wire traffic: a ring all-reduce of S bytes puts about 2 S (n-1)/n on a link.

The volumes start from the ZeRO paper (Rajbhandari et al. 2020, sec. 7): plain data parallelism and ZeRO-1/2
move 2Ψ per rank (one all-reduce of Ψ, or a reduce(-scatter) of Ψ and an all-gather of Ψ); ZeRO-3 / full
sharding 3Ψ (all-gather in forward, all-gather again in backward, reduce-scatter). Each backend's ``comm()``
then says what it does differently (measured), e.g. FSDP2's root unit is not re-gathered in backward and
DeepSpeed's ZeRO-3 keeps parameters gathered while they fit in ``stage3_max_live_parameters``. Tensor
parallelism adds all-reduces of activations (Megatron: two per block forward, two backward) and pipelines
send activations forward and their gradients back at every stage boundary, per micro-batch.

Counts are per optimizer step of ``train.grad_accum`` micro-batches of ``train.micro_batch_size``. Gradient
bytes are 4 (fp32) unless the backend keeps 16-bit gradients (DeepSpeed and its pipeline in bf16/fp16): under
torch.autocast parameters, and so gradients, stay fp32. Scalars a backend all-reduces inside the step (the
global gradient norm for clipping) are counted too, so that a kind made only of them is still predicted.
"""
from __future__ import annotations

from collections.abc import Iterable

from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPTConfig

FP32 = 4  # bytes of an fp32 value (gradients under autocast, clip norms, fp32 activations)


def word(precision: str) -> int:
    """Bytes per value of a tensor kept in the training precision (fp32: 4; bf16/fp16: 2)."""
    return 4 if precision == "fp32" else 2


def grad_word(precision: str, keeps_16bit: bool) -> int:
    """Bytes per gradient value: fp32 under autocast (the parameters are fp32), 16-bit only where the backend
    casts the model itself (``keeps_16bit``: DeepSpeed)."""
    return word(precision) if keeps_16bit else FP32


def gpt(cfg) -> GPTConfig:
    return GPTConfig.from_cfg(cfg.model)


def tokens(cfg) -> int:
    """s·b: tokens in one micro-batch."""
    return cfg.train.micro_batch_size * cfg.model.seq_len


def activation(cfg) -> int:
    """s·b·h: values in one micro-batch's hidden states (a block's input or output)."""
    return tokens(cfg) * cfg.model.d_model


def total(*parts: dict[str, float]) -> dict[str, float]:
    """The sum of ``parts`` by kind; kinds that come to zero are left out."""
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in sorted(out.items()) if v}


def busiest(ranks: Iterable[dict[str, float]]) -> dict[str, float]:
    """The rank that moves the most in all (what ``Strategy.comm`` reports)."""
    return max(ranks, key=lambda r: sum(r.values()), default={})


def one_process(layout: Layout) -> bool:
    """One process: whatever the backend calls, the loop reports nothing moved (train.py)."""
    return layout.processes == 1


def clip_norm(cfg, calls: int = 1, nbytes: int = FP32) -> dict[str, float]:
    """The global gradient norm all-reduced ``calls`` times as a scalar, when clipping is on."""
    return {"all_reduce": calls * nbytes} if cfg.train.grad_clip else {}


def tensor_parallel(cfg, blocks: int, out_word: int, grad_word: int, vocab_parallel: bool = False) -> dict[str, float]:
    """Megatron-style tensor parallelism, one optimizer step: per block and micro-batch, the row-parallel outputs
    of attention and MLP all-reduced in forward (2 s·b·h, ``out_word`` bytes a value: a matmul's output, 16-bit
    under autocast) and the column-parallel inputs' gradients all-reduced in backward (2 s·b·h, ``grad_word``:
    fp32 under autocast, whose LayerNorm outputs are fp32). ``vocab_parallel``: the vocabulary-split embedding's
    output (forward) and the head's input gradient (backward), s·b·h fp32 each, and the vocab-parallel
    cross-entropy's max, sum of exponentials and target logit (3 s·b fp32)."""
    per_mb = 2 * blocks * activation(cfg) * (out_word + grad_word)
    if vocab_parallel:
        per_mb += 2 * activation(cfg) * FP32 + 3 * tokens(cfg) * FP32
    return {"all_reduce": cfg.train.grad_accum * per_mb}


def pipeline_p2p(cfg, stages_of_rank: list[list[int]], n_stages: int, message: float) -> list[dict[str, float]]:
    """Per pipeline rank: every micro-batch sends a stage's output forward and receives its gradient back at
    each boundary between stages, ``message`` bytes each (each side counts its send or its recv). A rank with
    stages ``stages_of_rank[r]`` (interleaved schedules hold several) touches the boundaries on either side of
    each of them."""
    m = cfg.train.grad_accum
    rows = []
    for stages in stages_of_rank:
        ends = sum((s > 0) + (s < n_stages - 1) for s in stages)
        rows.append({"send_recv": 2 * m * ends * message})
    return rows


def stage_params(costs: list[int], balance: list[int]) -> list[int]:
    """Parameters of each stage: ``costs`` per layer summed over ``balance`` (layers per stage)."""
    out, i = [], 0
    for n in balance:
        out.append(sum(costs[i:i + n]))
        i += n
    return out


def leaf_modules(c: GPTConfig) -> list[list[tuple[str, int]]]:
    """The GPT's modules that hold parameters, in forward order, each as (parameter name, elements) of its own
    parameters; the tied head names the token embedding's matrix again."""
    d, V = c.d_model, c.vocab_size
    mods = [[("embed.tok.weight", V * d)], [("embed.pos.weight", c.seq_len * d)]]
    for i in range(c.n_layer):
        for name, w, b in (("ln1", d, d), ("attn.qkv", 3 * d * d, 3 * d), ("attn.proj", d * d, d), ("ln2", d, d),
                           ("mlp.fc", 4 * d * d, 4 * d), ("mlp.proj", 4 * d * d, d)):
            mods.append([(f"blocks.{i}.{name}.weight", w), (f"blocks.{i}.{name}.bias", b)])
    mods += [[("head.ln.weight", d), ("head.ln.bias", d)],
             [("embed.tok.weight" if c.tie_weights else "head.out.weight", V * d)]]
    return mods


def tensor_sizes(c: GPTConfig) -> dict[str, int]:
    """Elements of every parameter tensor by name, the tied output matrix once (as ``GPT.named_parameters()``)."""
    return dict(p for mod in leaf_modules(c) for p in mod)
