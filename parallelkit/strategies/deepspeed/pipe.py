"""DeepSpeed pipeline parallelism (``PipelineModule``, GPT-NeoX style) x ZeRO-0/1 data parallelism.

The GPT as DeepSpeed layers: the token embedding as ``TiedLayerSpec("embed")``, the position
embedding, a ``LayerSpec`` per block, the final LayerNorm, and the token embedding again as the
output projection on the last stage (tied across the first and last stage: DeepSpeed all-reduces
the tied gradient between them). The loss is computed inside the engine; ``engine.train_batch``
runs the 1F1B schedule over ``train.grad_accum`` micro-batches, all-reduces gradients over the
``world / pp_size`` replicas (ZeRO-1 shards the optimizer state over them; DeepSpeed's batch sizes
count dp = world / pp) and steps. Ranks are ordered (pipe, data, model), model fastest.

Each layer is built on the meta device and given single's initial values by GPT parameter name
(``gpt_prefix``): every stage starts bit-identical to ``single``. The stage split is
``stage_balance`` (``layout.split_stages``), which the memory model calls too, in place of
DeepSpeed's partitioner.

Clipping: DeepSpeed sums squared gradient norms over a replica's pipeline and tensor ranks but
counts a parameter not marked ``model_parallel`` on one rank of them only (stage 0 in its fp32
path, tensor rank 0 under ZeRO). Marking each parameter where this rank must count it (its own
layers; replicated ones on tensor rank 0; the tied copy on the first stage only) makes it the
global norm.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPT, Block, GPTConfig, initial_value
from parallelkit.strategies.base import Options
from parallelkit.strategies.deepspeed import ckpt as deepspeed_ckpt
from parallelkit.strategies.deepspeed.config import build_config, settings
from parallelkit.strategies.deepspeed.zero import SHARDED, DeepSpeedStrategy
from parallelkit.strategies.shared.by_name import ADAM_KEYS, check_names, load_by_name, state_by_name
from parallelkit.strategies.shared.comm_model import (
    activation,
    busiest,
    gpt,
    one_process,
    tensor_parallel,
    total,
    word,
)
from parallelkit.strategies.shared.memory_model import (
    PARTS,
    activation_values,
    parts_total,
    zero_state_bytes,
)
from parallelkit.strategies.shared.optim import param_groups
from parallelkit.strategies.shared.pipeline import block_flops, bubble, rank_shares, stage_balance
from parallelkit.strategies.shared.tensor_parallel import tp_slice, tp_unslice
from parallelkit.util.tensors import storages


@dataclass
class PipeOptions(Options):
    pp_size: int = 2  # pipeline stages; world_size / pp_size data-parallel replicas
    zero_stage: int = 1  # 0: gradients all-reduced; 1: + optimizer state sharded over the replicas (2, 3: refused)
    partition_method: str = "parameters"  # parameters | uniform | type:REGEX (balance layers whose class matches)
    config: Any = None  # a dict merged into the generated DeepSpeed config

    def validate(self) -> None:
        self.at_least("pp_size", 1)
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"strategy.zero_stage={self.zero_stage!r}: DeepSpeed refuses ZeRO-2 and ZeRO-3 with "
                              f"pipeline parallelism (its PipelineEngine runs ZeRO 0 or 1 only): use "
                              f"strategy.zero_stage=0 or 1, or strategy=deepspeed for ZeRO-2/3 without a pipeline")
        m = self.partition_method
        if m not in ("parameters", "uniform") and not m.startswith("type:"):
            raise ConfigError(f"strategy.partition_method={m!r}: choose parameters, uniform or type:REGEX "
                              f"(e.g. type:block)")
        if m.startswith("type:"):
            try:
                re.compile(m[5:])
            except re.error as e:
                raise ConfigError(f"strategy.partition_method={m!r}: not a regular expression ({e})") from None
        if self.config is not None and not isinstance(self.config, dict):
            raise ConfigError("strategy.config must be a mapping, e.g. 'strategy.config={wall_clock_breakdown: true}'")


# ---- the GPT as pipeline layers: built on meta, initialised by their GPT names ----

def _materialise(module: nn.Module, prefix: str, c: GPTConfig, seed: int) -> None:
    """Allocate a layer built on meta and give each parameter single's initial value, drawn by its GPT name."""
    module.to_empty(device="cpu")
    module.gpt_prefix = prefix
    with torch.no_grad():
        for mod_name, m in module.named_modules():
            for p_name, p in m.named_parameters(recurse=False):
                name = ".".join(s for s in (prefix, mod_name, p_name) if s)
                p.copy_(initial_value(m, name, tuple(p.shape), seed, c.n_layer))


class TokenEmbedding(nn.Embedding):
    """``embed.tok``: the input lookup on the first stage and (tied) the output projection on the last."""

    def __init__(self, c: GPTConfig, seed: int):
        with torch.device("meta"):
            super().__init__(c.vocab_size, c.d_model)
        _materialise(self, "embed.tok", c, seed)


def project(tok: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The tied head: (B, T, d) -> logits (B, T, V)."""
    return F.linear(x, tok.weight)


class PositionEmbedding(nn.Embedding):
    def __init__(self, c: GPTConfig, seed: int):
        with torch.device("meta"):
            super().__init__(c.seq_len, c.d_model)
        _materialise(self, "embed.pos", c, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return x + super().forward(torch.arange(x.size(1), device=x.device))


class TransformerBlock(Block):
    def __init__(self, c: GPTConfig, seed: int, index: int, checkpoint: bool, shard: Callable | None = None):
        with torch.device("meta"):
            super().__init__(c)
        _materialise(self, f"blocks.{index}", c, seed)
        self.checkpoint = checkpoint
        if shard is not None:  # neox_3d: keep this tensor-parallel rank's slices
            shard(self)


class FinalNorm(nn.LayerNorm):
    def __init__(self, c: GPTConfig, seed: int):
        with torch.device("meta"):
            super().__init__(c.d_model)
        _materialise(self, "head.ln", c, seed)


class OutputProjection(nn.Linear):
    """The head of an untied model (``model.tie_weights=false``)."""

    def __init__(self, c: GPTConfig, seed: int):
        with torch.device("meta"):
            super().__init__(c.d_model, c.vocab_size, bias=False)
        _materialise(self, "head.out", c, seed)


def pipeline_layers(c: GPTConfig) -> list[tuple[str, int]]:
    """(class name, parameters) of each pipeline layer in order, from the shapes alone."""
    d, head = c.d_model, TokenEmbedding if c.tie_weights else OutputProjection
    return [(TokenEmbedding.__name__, c.vocab_size * d), (PositionEmbedding.__name__, c.seq_len * d),
            *[(TransformerBlock.__name__, c.block_params())] * c.n_layer, (FinalNorm.__name__, 2 * d),
            (head.__name__, c.vocab_size * d)]


def layer_specs(c: GPTConfig, seed: int, checkpoint: bool, shard: Callable | None) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if c.tie_weights:
        tok = TiedLayerSpec("embed", TokenEmbedding, c, seed, tied_weight_attr=["weight"])
        head = TiedLayerSpec("embed", TokenEmbedding, c, seed, forward_fn=project, tied_weight_attr=["weight"])
    else:
        tok, head = LayerSpec(TokenEmbedding, c, seed), LayerSpec(OutputProjection, c, seed)
    blocks = [LayerSpec(TransformerBlock, c, seed, i, checkpoint, shard) for i in range(c.n_layer)]
    return [tok, LayerSpec(PositionEmbedding, c, seed), *blocks, LayerSpec(FinalNorm, c, seed), head]


def build_pipeline(specs: list, balance: list[int], topology, loss_fn: Callable) -> nn.Module:
    """DeepSpeed's PipelineModule cut as ``balance`` says (its partitioner is the one hook replaced)."""
    from deepspeed.pipe import PipelineModule

    class GPTPipe(PipelineModule):
        def _partition_layers(self, method="given"):
            self.parts = [0, *accumulate(balance)]
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    with contextlib.redirect_stdout(io.StringIO()):  # rank 0 prints its seed settings and the topology
        return GPTPipe(specs, topology=topology, loss_fn=loss_fn, partition_method="given")


def gpt_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(single-process GPT name, parameter) of a stage's layers; tensor-parallel slices keep the full name."""
    return [(f"{m.gpt_prefix}.{n}", p) for m in module.modules() if hasattr(m, "gpt_prefix")
            for n, p in m.named_parameters()]


class DeepSpeedPipeStrategy(DeepSpeedStrategy):
    families = ("gpt",)  # cuts the GPT into stages / shards by its layout
    Options = PipeOptions

    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout.model_parallel(cfg.world_size, pp=o.pp_size)

    @classmethod
    def check(cls, cfg, o) -> None:
        c, pp = GPTConfig.from_cfg(cfg.model), o.pp_size
        n = len(pipeline_layers(c))
        if pp > n:
            raise ConfigError(f"strategy.pp_size={pp} is more stages than the pipeline's {n} layers (token and "
                              f"position embeddings, {c.n_layer} blocks, final LayerNorm, head): use "
                              f"strategy.pp_size <= {n}")
        stage_balance(pipeline_layers(c), pp, o.partition_method)
        build_config(cfg, cls.layout(cfg, o).dp)  # a conflicting strategy.config, before any worker starts

    @classmethod
    def label(cls, cfg, o) -> str:
        lay = cls.layout(cfg, o)
        return f"deepspeed pipe pp{lay.pp} dp{lay.dp} zero{o.zero_stage}"

    @classmethod
    def pipeline_shares(cls, cfg, o, layout):
        c = GPTConfig.from_cfg(cfg.model)
        flops = [0.0, 0.0, *[block_flops(c)] * c.n_layer, 0.0, 6.0 * c.vocab_size * c.d_model]  # as pipeline_layers
        return rank_shares(flops, stage_balance(pipeline_layers(c), layout.pp, o.partition_method), layout.pp), 1

    @classmethod
    def stages(cls, cfg, o, layout: Layout) -> list[tuple[int, float]]:
        """(blocks, parameters on one of its ranks) of each stage: the last stage holds its own copy of a tied
        embedding; tensor parallelism (neox_3d) splits each block's matmuls over tp."""
        c = GPTConfig.from_cfg(cfg.model)
        split = c.block_matmul_params() * (1 - 1 / layout.tp)  # of each block, on each tensor-parallel rank
        layers, rows, start = pipeline_layers(c), [], 0
        for n in stage_balance(pipeline_layers(c), layout.pp, o.partition_method):
            mine = layers[start:start + n]
            start += n
            blocks = sum(1 for name, _ in mine if name == TransformerBlock.__name__)
            psi = sum(p for _, p in mine) - blocks * split
            if c.tie_weights and n == len(layers):  # one stage: the embedding and the head share one matrix
                psi -= c.vocab_size * c.d_model
            rows.append((blocks, psi))
        return rows

    @classmethod
    def stage_memory(cls, cfg, o, layout: Layout) -> list[dict]:
        """Predicted bytes of each stage's ranks. State: the stage's layers (the last stage holds its own copy of
        the tied embedding, stepped like the first's) under ZeRO-0/1 over dp; the pipeline keeps whole gradients
        until its reduce step after the last micro-batch. Activations: 1F1B keeps up to pp - i micro-batches in
        flight at stage i (never more than grad_accum), each with its blocks' saved values and the stage's input
        and output buffers. The last stage adds the loss's fp32 tensors for one micro-batch (the log-softmax the
        cross-entropy saves, its gradient and the logits' gradient: 12 bytes per logit, as ``activations``) and
        the logits themselves of up to two micro-batches: the engine keeps each forward's output in its
        ``pipe_buffers['outputs']`` (2 on the last stage, ``num_pipe_buffers``) and clears them on every stage
        but the last, so they stay alive until overwritten, between steps too (measured on `small`, pp 2, two
        micro-batches: two b·s·V logits alive beside the optimizer state after the step)."""
        c, t = GPTConfig.from_cfg(cfg.model), cfg.train
        tp, pp, b = layout.tp, layout.pp, t.micro_batch_size
        word, ckpt = (4 if t.precision == "fp32" else 2), bool(t.activation_checkpointing)
        zero = build_config(cfg, layout.dp)[0]["zero_optimization"]
        zc = {"reduce_bucket_size": zero["reduce_bucket_size"], "overlap_comm": zero["overlap_comm"],
              "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0}
        rows = []
        for i, (n, (blocks, psi)) in enumerate(zip(stage_balance(pipeline_layers(c), pp, o.partition_method), cls.stages(cfg, o, layout))):
            # accum=2: whole gradients until the reduce step, whatever grad_accum (the pipeline reduces once)
            r = zero_state_bytes({"zero_stage": o.zero_stage}, psi, layout.dp, t.precision, zc, accum=2)
            in_flight = min(pp - i, t.grad_accum)
            act = in_flight * (activation_values(c, b, blocks, tp, ckpt) + 2 * c.seq_len * b * c.d_model) * word
            if i == pp - 1:
                act += (12 + min(2, t.grad_accum) * word) * b * c.seq_len * c.vocab_size
            rows.append({**r, "activations": act, "layers": n, "in_flight": in_flight})
        return rows

    @classmethod
    def comm(cls, cfg, o, layout):
        """DeepSpeed's PipelineEngine, the busiest stage; values in the training precision (DeepSpeed casts the model,
        gradients included), m = train.grad_accum. send_recv: per micro-batch and stage boundary the activation
        forward and its gradient back, s·b·h each. With tensor parallelism (neox_3d) DeepSpeed sends each tensor
        rank's 1/tp slice of them plus a (7 + tp)-long int64 meta tensor, and all-gathers the slices back where the
        stage needs the whole: its input on every stage but the first, its output and the output's gradient on every
        stage but the last (all_gather, s·b·h each). all_reduce: the stage's gradients once per step over the data
        parallel group (DeepSpeed calls it even when dp = 1, on a group of one), the tied embedding's gradient between
        the first and the last stage (V·d), the blocks' tensor-parallel activations (``tensor_parallel``), and 16
        bytes of norm scalars (18 measured in bf16). all_gather also: ZeRO-1's updated parameters when dp > 1.
        broadcast: the loss, from the last stage (8 bytes). Measured on tiny (pp 2, dp 1 and 2, tp 1 and 2,
        grad_accum 1 and 2, fp32 and bf16) to within the scalars."""
        if one_process(layout):
            return {}
        c, m, tp, pp = gpt(cfg), cfg.train.grad_accum, layout.tp, layout.pp
        w = word(cfg.train.precision)
        act = w * activation(cfg)
        message = act / tp + 8 * (7 + tp) if tp > 1 else act
        rows = []
        for i, (blocks, psi) in enumerate(cls.stages(cfg, o, layout)):
            inner = (i > 0) + (i < pp - 1)  # boundaries this stage touches
            tied = w * c.vocab_size * c.d_model if c.tie_weights and pp > 1 and i in (0, pp - 1) else 0
            gathered = m * act * ((i > 0) + 2 * (i < pp - 1)) if tp > 1 else 0
            zero1 = w * psi if layout.dp > 1 and o.zero_stage >= 1 else 0
            rows.append(total({"send_recv": 2 * m * inner * message, "all_reduce": w * psi + tied + 16,
                               "all_gather": gathered + zero1, "broadcast": 8},
                              tensor_parallel(cfg, blocks, w, w) if tp > 1 else {}))
        return busiest(rows)

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        """The largest stage of ``stage_memory`` (every rank of a stage holds the same); every stage's in ``stages``."""
        rows = cls.stage_memory(cfg, o, layout)
        worst = max(rows, key=parts_total)
        return {**{k: worst[k] for k in (*PARTS, "offloaded")}, "stages": rows}

    # ---- setup ----
    def shard(self) -> Callable | None:
        """What cuts each block for tensor parallelism (neox_3d); None keeps blocks whole."""
        return None

    def build_model(self, build):
        """The stage's layers, built here from the specs (``build``, the whole GPT, is not needed)."""
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        deepspeed.utils.logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
        # DeepSpeed broadcasts the tied weight in place once; torch then warns at every backward that broadcast_
        # has no autograd kernel. The weight stays a leaf and its gradient is exact (parity with single).
        warnings.filterwarnings("ignore", category=UserWarning, message=r"c10d::broadcast_: an autograd kernel")
        ctx, lay = self.ctx, self.ctx.layout
        self.stage, self.offload_optimizer, self.offload_param = settings(ctx.cfg)
        self.ds_config, self.notes = build_config(ctx.cfg, lay.dp)
        self.nvme_dir, self.zero_init = None, False
        deepspeed.init_distributed(dist_init_required=False)
        topology = PipeModelDataParallelTopology(num_pp=lay.pp, num_mp=lay.tp, num_dp=lay.dp)
        for r in range(lay.world):  # DeepSpeed's (pipe, data, model) order is the layout's rank map (pp, dp, tp)
            c, want = topology.get_coord(r), lay.coords(r)
            assert (c.pipe, c.data, c.model) == (want["pp"], want["dp"], want["tp"]), (r, c, want)
        self.balance = stage_balance(pipeline_layers(ctx.model), lay.pp, self.opts.partition_method)
        specs = layer_specs(ctx.model, ctx.seed, bool(ctx.train.activation_checkpointing), self.shard())
        pipe = build_pipeline(specs, self.balance, topology, self.loss_fn)
        for p in pipe.parameters():  # where this rank counts p in the global gradient norm (module docstring)
            p.model_parallel = getattr(p, "tp_split", False) or (
                self.tp_rank == 0 and not getattr(p, "ds_pipe_replicated", False))
        return pipe

    def param_groups(self, module):
        return param_groups(gpt_named_parameters(module), self.ctx.optim.weight_decay)  # decay by GPT name, as single

    # ---- the step: DeepSpeed's schedule does forward, backward, reductions and the optimizer step ----
    def train_step(self, micro_batches, grad_clip: float) -> torch.Tensor:
        """The global batch's mean loss, averaged over the replicas and broadcast from the last stage by DeepSpeed."""
        if not self.measuring:
            return self.engine.train_batch(iter(micro_batches))
        step = self.engine._take_model_step

        def snapshot(*args, **kwargs):  # gradients at their high point: reduced, before the step frees them
            self._grads = storages(self.held()["grads"])  # numbers only: the tensors are not kept alive
            return step(*args, **kwargs)

        self.engine._take_model_step = snapshot  # on the untimed probe step only
        try:
            return self.engine.train_batch(iter(micro_batches))
        finally:
            del self.engine._take_model_step

    def global_loss(self, local: torch.Tensor) -> float:
        return float(local)  # train_batch already returns the global batch's loss on every rank

    # ---- checkpoints. Portable: each stage's parameters by GPT name, the fp32 master copy and AdamW's moments
    # gathered over the stage's data-parallel ranks (DeepSpeed's consolidation API, as under ZeRO), tensor-parallel
    # slices joined (neox_3d), sent to rank 0 by the first replica's tensor rank 0 of every stage. The tied
    # embedding's copy on the last stage equals the first's and is written once.
    def _named(self) -> list[tuple[str, nn.Parameter]]:
        return gpt_named_parameters(self.engine.module)

    def _tp_group(self):
        return getattr(getattr(self, "tp", None), "group", None)

    def export_state(self):
        opt, named = self.engine.optimizer, self._named()
        if deepspeed_ckpt.mapped(self.engine):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            step = deepspeed_ckpt.read_step(opt)
            deepspeed_ckpt.relink(opt)
            model = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in named}
            optim = {} if step is None else {n: {**{k: safe_get_full_optimizer_state(p, k).detach().float().cpu()
                                                     for k in ADAM_KEYS}, "step": torch.tensor(step)} for n, p in named}
        else:  # ZeRO-0 in fp32: the run's torch AdamW over the stage's parameters
            model, optim = state_by_name(named, opt)
        if self.ctx.layout.tp > 1:  # every rank's slice, joined (COLLECTIVE over the tensor-parallel group)
            split = {n for n, p in named if getattr(p, "tp_split", False)}
            model = {n: self._join(n, t) if n in split else t for n, t in model.items()}
            optim = {n: {k: self._join(n, v) if n in split and v.dim() else v for k, v in st.items()}
                     for n, st in optim.items()}
        c = self.coords
        parts = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object((model, optim) if c["dp"] == c["tp"] == 0 else None, parts, dst=0)
        if self.ctx.rank != 0:
            return None
        return ({n: t for part in parts if part for n, t in part[0].items()},
                {n: st for part in parts if part for n, st in part[1].items()})

    def _join(self, name: str, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ctx.layout.tp)]
        dist.all_gather(parts, t.contiguous(), group=self._tp_group())
        return tp_unslice(name, parts, False)

    @torch.no_grad()
    def import_state(self, model, optim) -> None:
        with torch.device("meta"):
            check_names([n for n, _ in GPT(self.ctx.model).named_parameters()], model)
        named, tp, r = self._named(), self.ctx.layout.tp, self.tp_rank

        def mine(n, p, t):
            return tp_slice(n, t, r, tp, False) if getattr(p, "tp_split", False) else t

        if not deepspeed_ckpt.mapped(self.engine):
            load_by_name(named, self.engine.optimizer, {n: mine(n, p, model[n]) for n, p in named},
                         {n: {k: mine(n, p, v) if v.dim() else v for k, v in optim[n].items()} for n, p in named if n in optim})
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        steps = {float(st["step"]) for st in optim.values()}
        if steps:
            deepspeed_ckpt.ensure_state(self.engine.optimizer, max(steps))
        dev = self.ctx.device
        for n, p in named:
            full = mine(n, p, model[n]).to(dev)
            safe_set_full_fp32_param(p, full)
            p.data.copy_(full.to(p.dtype))
            for k in ADAM_KEYS if n in optim else ():
                safe_set_full_optimizer_state(p, mine(n, p, optim[n][k]).to(dev), k)

    def describe(self) -> dict:
        lay, m, c = self.ctx.layout, self.ctx.train.grad_accum, self.ctx.model
        p = lay.pp
        rows = self.stage_memory(self.ctx.cfg, self.opts, lay)
        tied = "token embedding on the first and last stage, its gradient all-reduced between them"
        if not c.tie_weights or p == 1:
            tied = "one stage: embedding and head share the matrix" if c.tie_weights else "no (model.tie_weights=false)"
        return {"sharded": f"layers in {p} pipeline stages (balance {self.balance}); over {lay.dp} data-parallel "
                           f"replicas: {SHARDED[self.stage]}",
                "schedule": "1F1B (DeepSpeed)", "micro_batches": m, "pp": p, "dp": lay.dp, "tp": lay.tp,
                "bubble_estimate": bubble(m, p), "balance": self.balance,
                "stage_of_rank": [lay.coords(r)["pp"] for r in range(lay.world)],
                "partition_method": self.opts.partition_method, "zero_stage": self.stage,
                "optimizer": self.optimizer_name,
                "tied": tied, "stage_memory_predicted": [{k: int(v) for k, v in r.items()} for r in rows],
                "deepspeed_config": "deepspeed_config.json", "notes": self.notes,
                "state_measured": "this rank's stage: params and optimizer after the last step, gradients after the "
                                  "reduction of the probe step"}
