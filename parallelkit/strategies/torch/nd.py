"""PyTorch's native N-D parallelism as torchtitan composes it, on one DeviceMesh:

* ``dp_shard``: FSDP2 (``fully_shard`` per block + root), parameters, gradients and optimizer state sharded;
* ``dp_replicate``: replicas of that sharding (HSDP: ``fully_shard`` over a 2-D (replicate, shard) mesh);
* ``tp``: DTensor tensor parallelism (``parallelize_module``): ``attn.qkv`` and ``mlp.fc`` column-wise,
  ``attn.proj`` and ``mlp.proj`` row-wise; with ``sequence_parallel`` (Megatron's SP) the LayerNorms and the
  residual stream between them hold 1/tp of the sequence (all-gather before each matmul pair,
  reduce-scatter after it instead of an all-reduce);
* ``pp``: ``torch.distributed.pipelining`` stages and schedules, as ``torch_pipe`` runs them;
* ``cp``: context (sequence) parallelism: each rank holds 1/cp of every sequence, and attention sees the whole
  causal context through ``cp_mode``: ``ulysses`` (DeepSpeed-Ulysses' all-to-all, DeepSpeed's
  ``DistributedAttention``: heads scattered, sequence gathered) or ``ring`` (a pass-KV ring: each rank's keys
  and values travel round the ring, partial softmaxes merged by log-sum-exp). torch's own
  ``context_parallel`` needs CUDA's SDPA kernels and replaces SDPA globally; on a GPU the ring here is the
  same algorithm, and on a CPU it is the one that runs.

The mesh is (pp, dp_replicate, dp_shard, cp, tp), slowest to fastest: the layout's rank map
(config/layout.py, dp = dp_replicate x dp_shard). FSDP2 shards over dp_shard x cp (cp ranks hold the same
weights and average their gradients, as torchtitan's dp_shard_cp). The embedding and the tied head stay whole
on every tensor-parallel rank (the sequence is split after the embedding and gathered before the head), so
the tied weight is one tensor as in ``single``. Everything else (the stages, the tied copy across stages,
initialisation by name, the schedule) is ``torch_pipe``'s.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout, divisors
from parallelkit.models.gpt import GPT, assign_full, causal_attention, initial_value
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.by_name import check_names, full_state, load_full_state
from parallelkit.strategies.shared.fsdp import fsdp2_no_sync
from parallelkit.strategies.shared.nd_model import nd_comm, nd_compute_share, nd_memory
from parallelkit.strategies.shared.tensor_parallel import tp_slice, tp_unslice
from parallelkit.strategies.torch.pipe import SCHEDULES, TorchPipeOptions, TorchPipeStrategy, _Stage

MESH = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # slowest to fastest: the layout's (pp, dp, cp, tp)


@dataclass
class TorchNDOptions(Options):
    dp_replicate: int = 1  # replicas of the sharded model (HSDP when dp_shard > 1)
    dp_shard: int = -1  # FSDP2 shards; -1: what world_size leaves after the other degrees
    tp: int = 1  # DTensor tensor-parallel ranks
    pp: int = 1  # pipeline stages (torch.distributed.pipelining; strategy.schedule)
    cp: int = 1  # ranks that split each sequence (context parallelism)
    cp_mode: str = "ulysses"  # ulysses (all-to-all) | ring (pass-KV)
    sequence_parallel: bool = True  # under tp: LayerNorms and the residual stream hold 1/tp of the sequence
    reshard_after_forward: bool = True  # FSDP2: free gathered blocks after forward (ZeRO-3) or keep them (ZeRO-2)
    schedule: str = "1f1b"  # under pp: gpipe | 1f1b | interleaved_1f1b (torch_pipe's)
    stages_per_rank: Optional[int] = None  # under pp: model chunks per rank (null: 2 for interleaved_1f1b, else 1)

    chunks = TorchPipeOptions.chunks
    dp_mode = "fsdp"  # how torch_pipe's code, which this reuses under pp, shares gradients between pipelines

    @property
    def pp_size(self) -> int:
        return self.pp

    def validate(self) -> None:
        for k in ("dp_replicate", "tp", "pp", "cp"):
            self.at_least(k, 1)
        if self.dp_shard != -1:
            self.at_least("dp_shard", 1)
        self.choice("cp_mode", ("ulysses", "ring"))
        self.choice("schedule", tuple(SCHEDULES))
        self.at_least("stages_per_rank", 1)


def nd_layout(world: int, o: TorchNDOptions) -> Layout:
    """The mesh's degrees, dp_shard=-1 filled in; sizes that do not multiply to world_size refused in one line."""
    fixed = o.pp * o.dp_replicate * o.cp * o.tp
    degrees = f"pp x dp_replicate x cp x tp = {o.pp} x {o.dp_replicate} x {o.cp} x {o.tp} = {fixed}"
    if o.dp_shard == -1 and world % fixed:
        raise ConfigError(f"strategy: {degrees} does not divide world_size={world}: lower them, or use world_size="
                          f"{fixed} or a multiple of it (strategy.dp_shard=-1 takes what is left)")
    shard = world // fixed if o.dp_shard == -1 else o.dp_shard
    if fixed * shard != world:
        raise ConfigError(f"strategy: {degrees}, times strategy.dp_shard={shard}, is {fixed * shard}, not world_size="
                          f"{world}: set strategy.dp_shard=-1 (what the rest leaves), or world_size={fixed * shard}")
    return Layout(world=world, dp=o.dp_replicate * shard, tp=o.tp, pp=o.pp, cp=o.cp, processes=world)


def dp_shard_of(layout: Layout, o: TorchNDOptions) -> int:
    return layout.dp // o.dp_replicate


class TorchNDStrategy(TorchPipeStrategy):
    PP_KEY = "pp"
    families = ("gpt", "llama")  # TP plans name our GPT's and Llama's linears (block_plan); cp: the GPT's attention
    Options = TorchNDOptions

    # ---- before any worker starts ----
    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return nd_layout(cfg.world_size, o)

    @classmethod
    def check(cls, cfg, o) -> None:
        lay = cls.layout(cfg, o)
        m = cfg.model
        if m.n_head % o.tp:
            fits = [d for d in divisors(m.n_head) if cfg.world_size % d == 0]
            raise ConfigError(f"strategy.tp={o.tp} does not divide model.n_head={m.n_head}: each tensor-parallel rank "
                              f"computes whole heads; use strategy.tp={' or '.join(map(str, fits))}")
        llama = (m.get("arch") or "gpt") == "llama"
        if llama and o.cp > 1:
            raise ConfigError(f"strategy.cp={o.cp} splits the sequence, and model.arch=llama's rotary positions are "
                              f"taken per rank: context parallelism runs model.arch=gpt; use strategy.cp=1 (tp, pp and "
                              f"FSDP2 run Llama)")
        if llama and m.n_kv_head % o.tp:
            raise ConfigError(f"strategy.tp={o.tp} does not divide model.n_kv_head={m.n_kv_head}: each tensor-parallel "
                              f"rank computes whole key/value heads; use a tp that divides it")
        sp = o.tp if o.sequence_parallel else 1
        if m.seq_len % (o.cp * sp):
            what = f"strategy.cp x tp = {o.cp} x {o.tp}" if o.cp > 1 and sp > 1 else \
                (f"strategy.cp={o.cp}" if o.cp > 1 else f"strategy.tp={o.tp} (sequence_parallel)")
            raise ConfigError(f"{what} does not divide model.seq_len={m.seq_len}: each rank holds an equal part of the "
                              f"sequence; use a model.seq_len that is a multiple of {o.cp * sp}")
        if o.cp > 1 and o.cp_mode == "ulysses" and (m.n_head // o.tp) % o.cp:
            raise ConfigError(f"strategy.cp={o.cp} with cp_mode=ulysses scatters attention heads: the {m.n_head // o.tp} "
                              f"heads per tensor-parallel rank (model.n_head={m.n_head} / tp={o.tp}) must divide by cp; "
                              f"use strategy.cp_mode=ring, or a cp that divides {m.n_head // o.tp}")
        if lay.pp > 1:
            super().check(cfg, o)
        elif cfg.train.precision == "fp16":
            raise ConfigError(f"strategy={o.name} runs train.precision=fp32 or bf16 (fp16's loss scaler does not unscale "
                              f"its DTensor gradients): use bf16")

    @classmethod
    def label(cls, cfg, o) -> str:
        lay = cls.layout(cfg, o)
        shard = dp_shard_of(lay, o)
        parts = [f"pp{lay.pp}" if lay.pp > 1 else "", f"hsdp{o.dp_replicate}x{shard}" if o.dp_replicate > 1 and shard > 1
                 else (f"rep{o.dp_replicate}" if o.dp_replicate > 1 else (f"fsdp{shard}" if shard > 1 else "")),
                 f"cp{lay.cp} {o.cp_mode}" if lay.cp > 1 else "", f"tp{lay.tp}" + ("+sp" if o.sequence_parallel else "")
                 if lay.tp > 1 else ""]
        return "torch nd " + " ".join(p for p in parts if p)

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return nd_memory(cfg, o, layout)

    @classmethod
    def comm(cls, cfg, o, layout):
        return nd_comm(cfg, o, layout)

    @classmethod
    def compute_share(cls, cfg, o, layout):
        return nd_compute_share(cfg, o, layout)

    @classmethod
    def overlap(cls, cfg, o):
        if cls.layout(cfg, o).tp > 1:  # these kinds are then mostly DTensor's own, which wait where they are called
            return {}
        return {"all_gather": "forward+backward", "reduce_scatter": "backward"}  # FSDP2's prefetch and reduce

    @classmethod
    def bursts(cls, cfg, o, layout):
        """DeepSpeed-Ulysses all-to-alls q, k and v one after another: of a block's 4 calls a pass, 2 follow
        compute (q's, after the projection, and the output's, after attention; backward the same). A ring's
        batched sends and receives are each waited on: every call."""
        return {"all_to_all": 0.5} if layout.cp > 1 and o.cp_mode == "ulysses" else {}

    @classmethod
    def proxy_held(cls, cfg, o, layout):
        """FSDP2 over its replicas and shards. A tensor-parallel rank's proxy stays whole-width (FairScale's is cut
        to its share): DTensor's ops cost more than the FLOPs a narrower layer saves (compare_all's tp2+sp computes
        277 ms against 206 projected whole), and a cut proxy moved its projection from +3% to +9%."""
        shard = dp_shard_of(layout, o) * layout.cp  # FSDP2 shards over dp_shard x cp (``wrap``)
        if o.dp_replicate == 1 and shard == 1:
            return None
        return {"fsdp2": {"reshard": o.reshard_after_forward and layout.pp == 1, "mesh": [o.dp_replicate, shard]}}

    # ---- in the worker ----
    @property
    def pipelined(self) -> bool:
        return self.ctx.layout.pp > 1

    def build_model(self, build):
        gpt = super().build_model(build)  # this rank's stages' layers, on the meta device
        self.tied = self.ctx.model.tie_weights and self.pipelined  # else one tensor, as in single
        return gpt

    def wrap(self, gpt):
        ctx, o, lay = self.ctx, self.opts, self.ctx.layout
        shard = dp_shard_of(lay, o)
        self.mesh = init_device_mesh(ctx.device.type, (lay.pp, o.dp_replicate, shard, lay.cp, lay.tp), mesh_dim_names=MESH)
        tp_mesh = self.mesh["tp"]
        self.sp = lay.tp > 1 and o.sequence_parallel
        self.cp_group = self.mesh.get_group("cp") if lay.cp > 1 else None
        self.cp_rank = self.coords["cp"]
        # the sequence: this rank's 1/cp after the embedding (then 1/tp of that under SP), whole again before the head
        if self.has_first:
            gpt.embed.register_forward_hook(lambda mod, args, out: self._enter(out))
        if self.has_last:
            gpt.head.register_forward_pre_hook(lambda mod, args: (self._exit(args[0]),))
        blocks = [b for b in gpt.blocks if not isinstance(b, nn.Identity)]
        if lay.cp > 1:
            attend = ulysses_attention(self.cp_group) if o.cp_mode == "ulysses" else RingAttention(self.cp_group)
            for b in blocks:
                b.attn.attend = attend
        if lay.tp > 1:
            for b in blocks:
                parallelize_module(b, tp_mesh, block_plan(self.sp, llama=not hasattr(b.attn, "qkv")))
        parts = []
        if self.pipelined:  # the layers of this rank's stages, each stage run by the schedule
            layers = gpt.layers()
            parts = [_Stage([layers[i] for i in self.stage_layers[s]], self.precision.dtype)
                     for s in self.stage_ids]
        dp_dims = [d for d, n in (("dp_replicate", o.dp_replicate), ("dp_shard_cp", shard * lay.cp)) if n > 1]
        if o.dp_replicate > 1 and len(dp_dims) == 1:  # replicas of one shard: still HSDP's 2-D mesh (a 1-D one
            dp_dims.append("dp_shard_cp")  # would shard over the replicas: ZeRO-3, not the all-reduce it names)
        self.fsdp = bool(dp_dims)
        if self.fsdp:
            self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
            dp_mesh = self.mesh[tuple(dp_dims)] if len(dp_dims) > 1 else self.mesh[dp_dims[0]]
            kw = {"mesh": dp_mesh, "reshard_after_forward": o.reshard_after_forward and not self.pipelined}
            for b in blocks:
                fully_shard(b, **kw)
            for root in parts or [gpt]:  # a stage's rest (embedding, head), or the whole model's: gathered until backward
                fully_shard(root, **{**kw, "reshard_after_forward": False})
        gpt.to_empty(device=ctx.device)
        if not self.pipelined:
            gpt.tie()  # one tensor again (the move from meta splits them)
        qkv = {i for b in blocks if hasattr(b.attn, "qkv") for i in (id(b.attn.qkv.weight), id(b.attn.qkv.bias))} \
            if lay.tp > 1 else set()  # the GPT's fused q, k, v (Llama's are three linears: a plain split)
        gpt.init_weights(ctx.seed, assign=lambda p, full: assign_full(p, self._to_mesh(full) if id(p) in qkv else full))
        if self.tied and self.has_last:  # the head's copy starts as the embedding it stands for
            w = gpt.head.out.weight
            with torch.no_grad():
                assign_full(w, initial_value(gpt.head.out, "embed.tok.weight", tuple(w.shape), ctx.seed, ctx.model.n_layer))
        self.parts = parts
        if not self.pipelined:
            return gpt
        p = lay.pp
        pp_group = self.mesh.get_group("pp")
        self.tie_group = dist.new_subgroups_by_enumeration([[g[0], g[-1]] for g in lay.groups("pp")])[0]
        self.stages = [PipelineStage(part, s, p * o.chunks, ctx.device, group=pp_group, **self._shapes(s, p * o.chunks))
                       for part, s in zip(parts, self.stage_ids)]
        cls, m = SCHEDULES[o.schedule], ctx.train.grad_accum
        target = self.stages if o.schedule == "interleaved_1f1b" else self.stages[0]
        self.schedule = cls(target, n_microbatches=m, loss_fn=lambda logits, y: self._loss(logits, y), scale_grads=True)
        self._idle, self.idle_by_rank = None, None
        return nn.ModuleList(parts)

    # qkv's rows are [q; k; v]: a column-wise split hands each tensor-parallel rank its heads of all three when the
    # rows are ordered rank by rank (the full tensor as the ranks' tp_slices, concatenated); portable form unchanged
    def _to_mesh(self, full: torch.Tensor) -> torch.Tensor:
        n = self.ctx.layout.tp
        return torch.cat([tp_slice("attn.qkv.weight", full, r, n, False) for r in range(n)])

    def _from_mesh(self, t: torch.Tensor) -> torch.Tensor:
        return tp_unslice("attn.qkv.weight", list(t.chunk(self.ctx.layout.tp)), False)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.layout.cp > 1:
            x = x.chunk(self.ctx.layout.cp, 1)[self.cp_rank]
        if self.sp:  # the gradient is all-gathered back in backward
            tp = self.mesh["tp"]
            x = DTensor.from_local(x, tp, [Replicate()], run_check=False).redistribute(tp, [Shard(1)]).to_local()
        return x

    def _exit(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:
            tp = self.mesh["tp"]
            x = DTensor.from_local(x, tp, [Shard(1)], run_check=False).redistribute(tp, [Replicate()]).to_local()
        return x

    def _shapes(self, s: int, n: int) -> dict[str, torch.Tensor]:
        c, b, lay = self.ctx.model, self.ctx.train.micro_batch_size, self.ctx.layout
        t = c.seq_len // lay.cp
        act = torch.empty(b, t // (lay.tp if self.sp else 1), c.d_model, device="meta", requires_grad=True)
        tokens = torch.empty(b, c.seq_len, dtype=torch.long, device="meta")
        logits = torch.empty(b, t, c.vocab_size, dtype=self.precision.dtype or torch.float32, device="meta",
                             requires_grad=True)
        return {"input_args": tokens if s == 0 else act, "output_args": logits if s == n - 1 else act}

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of this rank's part of the sequence (the mean over cp ranks is the sequence's)."""
        if self.ctx.layout.cp > 1:
            y = y.chunk(self.ctx.layout.cp, 1)[self.cp_rank]
        return super().loss_fn(logits, y)

    def train_step(self, micro_batches, grad_clip):
        return super().train_step(micro_batches, grad_clip) if self.pipelined else \
            Strategy.train_step(self, micro_batches, grad_clip)

    def no_sync(self):
        if self.pipelined or not self.fsdp:
            return contextlib.nullcontext()
        return fsdp2_no_sync(self.model)

    def clip(self, max_norm: float) -> None:
        """The global norm from every rank's local gradient parts: each part's square counted once over the ranks
        that hold a copy of it (a DTensor's replicated mesh dimensions, the other pipelines), summed over the
        world; the head's copy of a tied weight left out (the first stage counts it)."""
        lay = self.ctx.layout
        head = self.module.head.out.weight if self.tied and self.has_last else None
        params = [p for p in self.module.parameters() if p.grad is not None]
        sq = torch.zeros((), device=self.ctx.device, dtype=torch.float64)
        for p in params:
            if p is head:
                continue
            g = p.grad
            shards = 1
            if isinstance(g, DTensor):
                for size, pl in zip(g.device_mesh.shape, g.placements):
                    shards *= size if _splits(pl) else 1
                g = g.to_local()
            sq += g.double().square().sum() * shards / (lay.world // lay.pp)
        dist.all_reduce(sq)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0).float()
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef)

    def global_loss(self, local: torch.Tensor) -> float:
        if self.pipelined:
            return super().global_loss(local)
        return Strategy.global_loss(self, local)

    def probe_comm(self):
        return {}

    # ---- checkpoints: full tensors by GPT name (qkv rows back in the single-process order) ----
    def _portable_names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters() if not (self.tied and n == "head.out.weight")]

    def export_state(self):
        mine = full_state(self.module, self.optimizer, self._portable_names())
        if self.ctx.layout.tp > 1:
            mine = ({n: self._from_mesh(t) if "attn.qkv" in n else t for n, t in mine[0].items()},
                    {n: {k: self._from_mesh(v) if "attn.qkv" in n and v.dim() else v for k, v in st.items()}
                     for n, st in mine[1].items()})
        c = self.coords
        parts = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object(mine if c["dp"] == c["cp"] == c["tp"] == 0 else None, parts, dst=0)
        if self.ctx.rank != 0:
            return None
        return ({n: t for part in parts if part for n, t in part[0].items()},
                {n: st for part in parts if part for n, st in part[1].items()})

    def import_state(self, model, optim) -> None:
        with torch.device("meta"):
            check_names([n for n, _ in GPT(self.ctx.model).named_parameters()], model)
        if self.ctx.layout.tp > 1:
            model = {n: self._to_mesh(t) if "attn.qkv" in n else t for n, t in model.items()}
            optim = {n: {k: self._to_mesh(v) if "attn.qkv" in n and v.dim() else v for k, v in st.items()}
                     for n, st in optim.items()}
        source = {n: "embed.tok.weight" if self.tied and n == "head.out.weight" else n
                  for n, _ in self.module.named_parameters()}
        if not self.tied and self.ctx.model.tie_weights:
            source.pop("head.out.weight", None)
        load_full_state(self.module, self.optimizer, model, optim, source)

    def describe(self) -> dict:
        o, lay = self.opts, self.ctx.layout
        facts = super().describe() if self.pipelined else {}
        shard = dp_shard_of(lay, o)
        facts.update({
            "mesh": dict(zip(MESH, (lay.pp, o.dp_replicate, shard, lay.cp, lay.tp))),
            "sharded": ", ".join(x for x in [
                f"parameters, gradients and optimizer state over {shard * lay.cp} ranks (dp_shard x cp)" if shard * lay.cp > 1 else "",
                f"replicated over {o.dp_replicate} (HSDP)" if o.dp_replicate > 1 else "",
                f"heads and MLP units over {lay.tp} tensor-parallel ranks" + (" with sequence parallelism" if o.sequence_parallel else "")
                if lay.tp > 1 else "",
                f"each sequence over {lay.cp} ranks ({o.cp_mode})" if lay.cp > 1 else "",
                f"layers over {lay.pp} pipeline stages" if lay.pp > 1 else ""] if x) or "nothing",
            "replicated": "embeddings and the (tied) head over the tensor-parallel ranks" if lay.tp > 1 else None,
        })
        return facts


def block_plan(sequence_parallel: bool, llama: bool = False) -> dict:
    """A block's tensor-parallel plan (torchtitan's, on our names): the GPT's (fused qkv, fc, LayerNorms) or our
    Llama's (q, k, v, gate and up column-wise; o and down row-wise; RMSNorms)."""
    cols, rows = (["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
                  ["attn.o_proj", "mlp.down_proj"]) if llama else (["attn.qkv", "mlp.fc"], ["attn.proj", "mlp.proj"])
    norms = ["attn_norm", "mlp_norm"] if llama else ["ln1", "ln2"]
    plan = {**{n: ColwiseParallel() for n in cols}, **{n: RowwiseParallel() for n in rows}}
    if not sequence_parallel:
        return plan
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return {**plan, **{n: SequenceParallel() for n in norms}, "attn": gather, "mlp": gather,
            **{n: RowwiseParallel(output_layouts=Shard(1)) for n in rows}}


# ---- context parallelism ----
def ulysses_attention(group):
    """DeepSpeed-Ulysses: q, k and v all-to-all'd from (1/cp of the sequence, every head) to (the whole sequence,
    1/cp of the heads), causal attention there, and back (DeepSpeed's ``DistributedAttention``)."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_init_required=False)  # DeepSpeed's comm wraps our process group

    def local(q, k, v):  # (B, T, heads / cp, hs)
        return causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    dist_attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def attend(q, k, v):  # (B, heads, T / cp, hs)
        t = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
        return dist_attn(*t, batch_dim_idx=0).transpose(1, 2)

    return attend


def _shift(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each tensor to the next rank of the ring; the previous rank's received (one batch of sends and receives)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prev = dist.get_global_rank(group, (r + 1) % n), dist.get_global_rank(group, (r - 1) % n)
    outs = [torch.empty_like(t) for t in tensors]
    ops = [op for t, o in zip(tensors, outs)
           for op in (dist.P2POp(dist.isend, t.contiguous(), nxt, group), dist.P2POp(dist.irecv, o, prev, group))]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return outs


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _splits(placement) -> bool:
    """Whether a DTensor placement splits the tensor over its mesh dimension: Shard, and FSDP2's _StridedShard
    (its dp shard of a tensor-parallel shard), which torch 2.13 no longer makes a Shard."""
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


class _RingAttention(torch.autograd.Function):
    """Pass-KV ring attention over contiguous sequence chunks (rank c of the ring holds chunk c of q, k and v).

    Forward: keys and values go round the ring (cp - 1 shifts); rank c attends to chunk j < c whole and to its own
    causally (later chunks are masked out entirely), with the fused CPU attention kernel, which also returns each
    row's log-sum-exp; the partial outputs merge by it. Backward: the same ring again, each chunk's key and value
    gradients travelling with it and arriving home after the last shift; the kernel's backward, given the merged
    output and log-sum-exp, yields each chunk's exact share. Memory is O(sequence / cp): no score matrix is kept."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        out = lse = None
        kv = [k, v]
        for step in range(n):
            if step:
                kv = _shift(kv, group)
            j = (r - step) % n
            if j > r:
                continue
            o, l = _FLASH(q, kv[0], kv[1], 0.0, j == r)
            if out is None:
                out, lse = o.float(), l
            else:
                new = torch.logaddexp(lse, l)
                out = out * torch.exp(lse - new).unsqueeze(-1) + o.float() * torch.exp(l - new).unsqueeze(-1)
                lse = new
        out = out.to(q.dtype)
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        n, r = dist.get_world_size(group), dist.get_rank(group)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        travel = [k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(n):
            if step:
                travel = _shift(travel, group)
            j = (r - step) % n
            if j <= r:
                gq, gk, gv = _FLASH_BACKWARD(dout, q, travel[0], travel[1], out, lse, 0.0, j == r)
                dq += gq
                travel[2] += gk
                travel[3] += gv
        dk, dv = _shift(travel[2:], group) if n > 1 else travel[2:]  # home: chunk r's gradients, from rank r + 1
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class RingAttention:
    """Causal attention over a sequence split into contiguous chunks over the ring's ranks (``_RingAttention``)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q, k, v):  # (B, heads, T / cp, hs)
        if q.device.type != "cpu":
            raise RuntimeError("strategy.cp_mode=ring runs its ring on the fused CPU attention kernel; on a GPU use "
                               "strategy.cp_mode=ulysses (torch's context_parallel is not wired in yet)")
        return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), self.group)
