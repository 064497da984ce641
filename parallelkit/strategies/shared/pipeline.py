"""What every pipeline backend shares, written once: how the layers are cut into stages and the idle share of
a schedule. torch pipelining, DeepSpeed's pipeline engine (and neox_3d inside it) and FairScale Pipe call
these; the estimator reaches them through each backend's ``memory()``."""
from __future__ import annotations

import re

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import split_stages


def stage_balance(layers: list[tuple[str, int]], stages: int, method: str = "parameters",
                  given: list[int] | None = None) -> list[int]:
    """Layers per stage: ``given`` when the user gave a balance, else the contiguous split with the smallest
    largest stage (``split_stages``) over each layer's weight: its parameters (``parameters``), 1 (``uniform``),
    or 1 where the layer's name matches (``type:REGEX``, as DeepSpeed's partition methods weigh them).
    ``layers``: (name, parameters) of the pipeline's layers in order."""
    if given is not None:
        return list(given)
    if method == "parameters":
        weights = [n for _, n in layers]
    elif method == "uniform":
        weights = [1] * len(layers)
    else:
        rx = re.compile(method[5:], re.IGNORECASE)
        weights = [1 if rx.search(name) else 0 for name, _ in layers]
        if not any(weights):
            names = ", ".join(dict.fromkeys(name for name, _ in layers))
            raise ConfigError(f"strategy.partition_method={method!r} matches none of the pipeline's layers ({names})")
    return split_stages(weights, stages)


def bubble(m: int, p: int, v: int = 1) -> float:
    """Idle share of a fill-drain schedule (GPipe, 1F1B) of ``m`` micro-batches on ``p`` stages: (p-1)/(m+p-1);
    interleaving ``v`` model chunks per rank: (p-1)/(v·m+p-1) (Narayanan et al. 2021)."""
    return (p - 1) / (v * m + p - 1)


def block_flops(c) -> float:
    """Training FLOPs per token of one block (6 x its parameters, plus attention's 12·d·T): ``flops_per_token``'s
    share of it. The embedding lookup, positions and final norm count none; the head 6·V·d."""
    return 6 * c.block_params() + 12 * c.d_model * c.seq_len


def whole_head_share(c, tp: int) -> float:
    """A tensor-parallel rank's FLOPs over an even 1/tp split when it splits the blocks but computes the whole head
    (the embedding and the tied head kept whole on every rank): (tp x head + L x block) / (head + L x block)."""
    model, blocks = c.flops_per_token(), c.n_layer * block_flops(c)
    return (tp * (model - blocks) + blocks) / model


def rank_shares(flops: list[float], balance: list[int], pp: int) -> list[float]:
    """Each pipeline rank's share of the model's FLOPs: ``flops`` per layer, ``balance`` layers per stage, rank r
    holding stages r, r + pp, ... (interleaved schedules)."""
    stages, i = [], 0
    for n in balance:
        stages.append(sum(flops[i:i + n]))
        i += n
    total = sum(stages) or 1.0
    return [sum(stages[r::pp]) / total for r in range(pp)]


def gpt_layers(c) -> list[tuple[str, int]]:
    """(name, parameters) of ``GPT.layers()`` as torch pipelining and FairScale Pipe cut them; the last stage
    holds its own copy of a tied head, so it counts there."""
    params = c.layer_params(own_head=True)
    return [(f"layer{i}", n) for i, n in enumerate(params)]
