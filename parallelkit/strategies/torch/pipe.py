"""torch.distributed.pipelining: the GPT cut into stages, one process per stage, x data parallelism.

Ranks sit on the layout's mesh (config/layout.py: pp slowest, then dp): a pipeline is one
``layout.group("pp", rank)`` (its stages ``dp`` ranks apart), the ``world_size / pp_size``
pipelines are data-parallel replicas (``dp_mode``: DDP, or FSDP2 over the mesh's dp dimension). The layers of ``GPT.layers()`` are split into ``pp_size x
stages_per_rank`` stages by ``layout.split_stages`` (what the estimator uses); rank ``i`` of a
pipeline holds stages ``i, i + pp_size, ...`` (interleaved_1f1b runs several per rank).
Each rank builds only its own layers (on the meta device, then ``GPT.init_weights`` by
parameter name, so the weights are ``single``'s bit for bit).

One optimizer step runs the schedule over ``train.grad_accum`` micro-batches; the loss is
computed on the last stage. The tied embedding / output matrix lives on the first stage and,
as its own copy, on the last: before the step the two gradients are summed by an all-reduce
between the two ranks (GPT-NeoX's tied layers do the same), both copies step identically, and
the clipping norm counts the weight once.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPTConfig, assign_full, initial_value
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.by_name import check_names, full_state, load_full_state
from parallelkit.strategies.shared.comm_model import (
    FP32,
    activation,
    busiest,
    clip_norm,
    gpt,
    one_process,
    pipeline_p2p,
    stage_params,
    total,
)
from parallelkit.strategies.shared.ddp import ddp_probe_comm, ddp_wrap
from parallelkit.strategies.shared.memory_model import pipeline_memory
from parallelkit.strategies.shared.pipeline import block_flops, bubble, gpt_layers, rank_shares, stage_balance
from parallelkit.util.tensors import time_in

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


@dataclass
class TorchPipeOptions(Options):
    pp_size: int = 2  # ranks per pipeline; world_size / pp_size data-parallel pipelines
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b; micro-batches per step = train.grad_accum
    stages_per_rank: Optional[int] = None  # model chunks per rank: null = 2 for interleaved_1f1b, else 1
    dp_mode: str = "ddp"  # ddp | fsdp: how the pipelines' copies of a stage share gradients

    def validate(self) -> None:
        self.at_least("pp_size", 2)
        self.choice("schedule", tuple(SCHEDULES))
        self.at_least("stages_per_rank", 1)
        self.choice("dp_mode", ("ddp", "fsdp"))

    @property
    def chunks(self) -> int:
        return self.stages_per_rank or (2 if self.schedule == "interleaved_1f1b" else 1)


class _Stage(nn.Module):
    """Consecutive entries of ``GPT.layers()`` run as one stage (under autocast in bf16: the schedule
    calls each stage itself)."""

    def __init__(self, layers: list[nn.Module], dtype: torch.dtype | None):
        super().__init__()
        self.layers, self.dtype = nn.ModuleList(layers), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext():
            for layer in self.layers:
                x = layer(x)
        return x


class TorchPipeStrategy(Strategy):
    families = ("gpt", "llama", "hf")  # cuts the model's layer list: ours, or a Hugging Face Llama / GPT-NeoX / GPT-2
    Options = TorchPipeOptions
    PP_KEY = "pp_size"  # the option's name in messages (torch_nd calls it pp)
    autocast_forward = False  # per stage (_Stage)

    # ---- before any worker starts ----
    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout.model_parallel(cfg.world_size, pp=o.pp_size)

    @classmethod
    def check(cls, cfg, o) -> None:
        n, p, v, m, pk = cfg.model.n_layer + 2, o.pp_size, o.chunks, cfg.train.grad_accum, cls.PP_KEY
        if o.stages_per_rank not in (None, 1) and o.schedule != "interleaved_1f1b":
            raise ConfigError(f"strategy.stages_per_rank={o.stages_per_rank} needs strategy.schedule=interleaved_1f1b: "
                              f"{o.schedule} runs one stage per rank")
        if p * v > n:
            raise ConfigError(f"strategy.{pk} x stages_per_rank = {p} x {v} = {p * v} stages is more than the model's "
                              f"{n} layers (embedding + {cfg.model.n_layer} blocks + head): lower them or raise model.n_layer")
        if o.schedule == "1f1b" and m < p:
            raise ConfigError(f"strategy.schedule=1f1b needs at least strategy.{pk}={p} micro-batches per step, got "
                              f"train.grad_accum={m}: set train.grad_accum={p} (or a larger train.global_batch_size), "
                              f"or strategy.schedule=gpipe")
        if o.schedule == "interleaved_1f1b" and (m < p or m % (m // p)):
            fits = [k for k in range(p, 4 * p + 1) if k % (k // p) == 0][:4]
            raise ConfigError(f"strategy.schedule=interleaved_1f1b runs micro-batches in rounds of strategy.{pk}={p}: "
                              f"train.grad_accum={m} must be >= {p} and a multiple of the number of rounds "
                              f"(grad_accum // pp_size); use train.grad_accum={' or '.join(map(str, fits))}")
        if cfg.model.get("arch") == "hf" and cfg.model.tie_weights:
            raise ConfigError(f"strategy={o.name} cuts a Hugging Face model with tied embeddings (tie_word_embeddings in "
                              f"its config.json) into stages, which it cannot keep tied yet: use a config with "
                              f"tie_word_embeddings false, or a strategy that does not cut the model (ddp, zero3, fsdp)")
        if cfg.train.precision == "fp16":
            raise ConfigError(f"strategy={o.name} runs train.precision=fp32 or bf16: the schedule runs backward itself, "
                              f"so there is no place for fp16's loss scaler")

    @classmethod
    def label(cls, cfg, o) -> str:
        v = f" v{o.chunks}" if o.chunks > 1 else ""
        dp = cfg.world_size // o.pp_size
        return f"torch pipe {o.schedule} pp{o.pp_size}{v}" + (f" x {o.dp_mode} dp{dp}" if dp > 1 else "")

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        return pipeline_memory(cfg, layout, o.schedule, o.chunks, o.dp_mode == "fsdp",
                               stage_balance(gpt_layers(GPTConfig.from_cfg(cfg.model)), layout.pp * o.chunks))

    @classmethod
    def pipeline_shares(cls, cfg, o, layout):
        if layout.pp == 1:
            return None
        c = GPTConfig.from_cfg(cfg.model)
        flops = [0.0, *[block_flops(c)] * c.n_layer, 6.0 * c.vocab_size * c.d_model]  # embedding, blocks, head
        return rank_shares(flops, stage_balance(gpt_layers(c), layout.pp * o.chunks), layout.pp), o.chunks

    @classmethod
    def comm(cls, cfg, o, layout):
        """The busiest pipeline rank. send_recv (``comm_model.pipeline_p2p``): per micro-batch and stage boundary the
        stage's output forward and its gradient back, s·b·h fp32 each (stages exchange fp32 hidden states even in
        bf16: the residual stream stays fp32 under autocast). all_reduce: the tied embedding's gradient between the
        first and the last rank (V·d fp32) and the clip norm's scalar. With dp > 1, this rank's stage gradients once
        per step (the schedule runs the other micro-batches' backward under no_sync): DDP's all-reduce, or FSDP's
        all-gather (kept gathered: reshard_after_forward false) and reduce-scatter, fp32. Measured on tiny (pp 2,
        grad_accum 1 and 2): all_reduce to the byte; send_recv a few bytes more than the hidden states (pipelining's
        own small messages: 8 B in 6 calls, 24 B in 18), which the tests allow, 4 B a call."""
        if one_process(layout):
            return {}
        c, p, v = gpt(cfg), layout.pp, o.chunks
        params = stage_params(c.layer_params(own_head=True), stage_balance(gpt_layers(c), p * v))
        stages = [[r + k * p for k in range(v)] for r in range(p)]
        rows = []
        for r, p2p in enumerate(pipeline_p2p(cfg, stages, p * v, FP32 * activation(cfg))):
            mine = FP32 * sum(params[s] for s in stages[r])
            tied = {"all_reduce": FP32 * c.vocab_size * c.d_model} if c.tie_weights and r in (0, p - 1) else {}
            dp = {}
            if layout.dp > 1:
                dp = {"all_gather": mine, "reduce_scatter": mine} if o.dp_mode == "fsdp" else {"all_reduce": mine}
            rows.append(total(p2p, tied, dp, clip_norm(cfg)))
        return busiest(rows)

    # ---- in the worker ----
    def build_model(self, build):
        """The GPT on the meta device, all but this rank's layers dropped (names stay GPT names)."""
        ctx, o = self.ctx, self.opts
        p, v = ctx.layout.pp, o.chunks
        self.balance = stage_balance(gpt_layers(ctx.model), p * v)
        starts = [sum(self.balance[:s]) for s in range(p * v + 1)]
        self.stage_ids = [self.pp_rank + k * p for k in range(v)]
        self.stage_layers = {s: range(starts[s], starts[s + 1]) for s in self.stage_ids}
        mine = {i for r in self.stage_layers.values() for i in r}
        gpt = build(device="meta", init=False)
        self.full_names = [n for n, _ in gpt.named_parameters()]  # every stage's, for a checkpoint's names
        last = ctx.model.n_layer + 1
        self.has_first, self.has_last = 0 in mine, last in mine
        self.tied = ctx.model.tie_weights  # pp >= 2: the first and last stage are on different ranks
        gpt.keep_layers(mine)
        return gpt

    def wrap(self, gpt):
        ctx, o = self.ctx, self.opts
        dp, p = ctx.layout.dp, ctx.layout.pp
        timeout = timedelta(seconds=ctx.train.timeout_s) if ctx.train.get("timeout_s") else None
        lay = ctx.layout  # its rank map: a pipeline's stages are lay.group("pp", rank), a stage's replicas "dp"
        grid = torch.tensor([[lay.rank_of(pp=s, dp=d) for s in range(p)] for d in range(dp)])  # [dp, pp]
        pp_group = dist.new_subgroups_by_enumeration([list(g) for g in lay.groups("pp")], timeout=timeout)[0]
        dp_group = dist.new_subgroups_by_enumeration([list(g) for g in lay.groups("dp")], timeout=timeout)[0]
        self.mesh = DeviceMesh.from_group([dp_group, pp_group], ctx.device.type, mesh=grid, mesh_dim_names=("dp", "pp"))
        self.tie_group = dist.new_subgroups_by_enumeration([[g[0], g[-1]] for g in lay.groups("pp")], timeout=timeout)[0]
        layers = gpt.layers()
        parts = [_Stage([layers[i] for i in self.stage_layers[s]], self.precision.dtype) for s in self.stage_ids]
        fsdp = o.dp_mode == "fsdp" and dp > 1
        if fsdp:  # sharded on meta, then each rank materialises its shards (as fsdp.py does)
            blocks = {id(b) for b in gpt.blocks}
            for part in parts:
                for layer in part.layers:
                    if id(layer) in blocks and not isinstance(layer, nn.Identity):
                        fully_shard(layer, mesh=self.mesh["dp"], reshard_after_forward=False)
                fully_shard(part, mesh=self.mesh["dp"], reshard_after_forward=False)  # one gather per step, not per micro-batch
        gpt.to_empty(device=ctx.device)
        gpt.init_weights(ctx.seed)
        if self.tied and self.has_last:  # the head's copy starts as the embedding it stands for
            w = gpt.head.out.weight
            with torch.no_grad():
                assign_full(w, initial_value(gpt.head.out, "embed.tok.weight", tuple(w.shape), ctx.seed, ctx.model.n_layer))
        if dp > 1 and not fsdp:
            parts = [ddp_wrap(part, ctx, group=dp_group) for part in parts]
        self.parts = parts
        self.stages = [PipelineStage(part, s, p * o.chunks, ctx.device, group=pp_group, **self._shapes(s, p * o.chunks))
                       for part, s in zip(parts, self.stage_ids)]
        cls, m = SCHEDULES[o.schedule], ctx.train.grad_accum
        target = self.stages if o.schedule == "interleaved_1f1b" else self.stages[0]
        # looked up per call, so the probe step can time it (_measure_idle)
        self.schedule = cls(target, n_microbatches=m, loss_fn=lambda logits, y: self._loss(logits, y), scale_grads=True)
        self._idle: float | None = None
        self.idle_by_rank: list[float] | None = None
        return nn.ModuleList(parts)

    def _shapes(self, s: int, n: int) -> dict[str, torch.Tensor]:
        """Each stage's input and output, given up front: no shape exchange between ranks at the first step."""
        c, b = self.ctx.model, self.ctx.train.micro_batch_size
        act = torch.empty(b, c.seq_len, c.d_model, device="meta", requires_grad=True)  # gradients flow back
        tokens = torch.empty(b, c.seq_len, dtype=torch.long, device="meta")
        logits = torch.empty(b, c.seq_len, c.vocab_size, dtype=self.precision.dtype or torch.float32, device="meta",
                             requires_grad=True)
        return {"input_args": tokens if s == 0 else act, "output_args": logits if s == n - 1 else act}

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, y)

    def train_step(self, micro_batches, grad_clip):
        """The schedule over this pipeline's micro-batches (mean loss on the last stage), then the step."""
        dev = self.ctx.device
        self.zero_grad()
        losses: list[torch.Tensor] = []
        args = (torch.cat([x for x, _ in micro_batches]).to(dev),) if self.has_first else ()
        kw = {"target": torch.cat([y for _, y in micro_batches]).to(dev), "losses": losses} if self.has_last else {}
        with self._measure_idle() if self.measuring else contextlib.nullcontext():
            self.schedule.step(*args, return_outputs=False, **kw)
        self.optimizer_step(grad_clip)
        return torch.stack([x.detach().float() for x in losses]).mean() if losses else torch.zeros((), device=dev)

    @contextlib.contextmanager
    def _measure_idle(self):
        """Probe step only: the share of the schedule's time this rank spends outside its stages' forward,
        backward and loss (waiting on send/recv, mostly)."""
        names = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
        t0 = time.perf_counter()
        with time_in([(st, n) for st in self.stages for n in names] + [(self, "_loss")]) as busy:
            yield
        total = time.perf_counter() - t0
        self._idle = max(0.0, 1 - busy[0] / total) if total > 0 else None

    def _tied_weights(self) -> list[nn.Parameter]:
        if not self.tied:
            return []
        gpt = self.module
        return ([gpt.embed.tok.weight] if self.has_first else []) + ([gpt.head.out.weight] if self.has_last else [])

    def optimizer_step(self, grad_clip: float) -> None:
        for w in self._tied_weights():  # d loss / d tied weight = the sum of both uses
            dist.all_reduce(_local(w.grad), group=self.tie_group)
        super().optimizer_step(grad_clip)

    def clip(self, max_norm: float) -> None:
        """The global norm: this rank's gradients (the head's copy of the tied weight left out: the first
        stage counts it), summed over the pipeline and, when sharded, over the data-parallel ranks."""
        head = self.module.head.out.weight if self.tied and self.has_last else None
        grads = [_local(p.grad) for p in self.module.parameters() if p.grad is not None]
        counted = [_local(p.grad) for p in self.module.parameters() if p.grad is not None and p is not head]
        sq = torch.stack([torch.linalg.vector_norm(g) for g in counted]).square().sum() if counted \
            else torch.zeros((), device=self.ctx.device)
        fsdp = self.opts.dp_mode == "fsdp" and self.ctx.layout.dp > 1
        dist.all_reduce(sq, group=None if fsdp else self.mesh.get_group("pp"))
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ does
        for g in grads:
            g.mul_(coef)

    def global_loss(self, local: torch.Tensor) -> float:
        """The last stages' losses summed over the world, divided by the ranks of a stage (dp, and under torch_nd cp x tp): the global batch's mean on every
        rank. After the probe step the same all-reduce carries each rank's idle share."""
        world = self.ctx.world_size
        t = torch.zeros(1 + (world if self._idle is not None else 0), device=self.ctx.device, dtype=torch.float64)
        t[0] = float(local) if self.has_last else 0.0
        if self._idle is not None:
            t[1 + self.ctx.rank] = self._idle
        dist.all_reduce(t)
        if self._idle is not None:
            self.idle_by_rank, self._idle = [round(float(x), 4) for x in t[1:]], None
        lay = self.ctx.layout
        return float(t[0]) / (lay.world // lay.pp)  # every last-stage rank holds its replica's (or sequence part's) loss

    def probe_comm(self):
        out: dict[str, tuple[int, int]] = {}
        for part in self.parts:  # DDP's buckets (C++ all-reduce)
            for kind, (calls, nbytes) in ddp_probe_comm(part, self.ctx.instrument).items():
                c, b = out.get(kind, (0, 0))
                out[kind] = (c + calls, b + nbytes)
        return out

    # ---- checkpoints. Each rank's layers already carry the single-process GPT's names ("blocks.3.mlp.fc.weight").
    # Portable: the first pipeline's ranks send their stages' full fp32 state to rank 0 (FSDP gathers each
    # stage's shards first); the head's copy of a tied weight is left out and filled from embed.tok.weight.
    def export_state(self):
        names = [n for n, _ in self.module.named_parameters() if not (self.tied and n == "head.out.weight")]
        mine = full_state(self.module, self.optimizer, names)
        parts = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        dist.gather_object(mine if self.dp_rank == 0 else None, parts, dst=0)
        if self.ctx.rank != 0:
            return None
        return ({n: t for part in parts if part for n, t in part[0].items()},
                {n: st for part in parts if part for n, st in part[1].items()})

    def import_state(self, model, optim) -> None:
        check_names(self.full_names, model)
        load_full_state(self.module, self.optimizer, model, optim, {
            n: "embed.tok.weight" if self.tied and n == "head.out.weight" else n for n, _ in self.module.named_parameters()})

    # Native: torch.distributed.checkpoint, each rank its own layers (and shards). The optimizer's state and
    # hyperparameters are flattened per parameter name: the stages' param groups differ, and unflattened
    # groups would be written once, by rank 0 (torchtitan does the same for pipelines).
    FLAT = StateDictOptions(flatten_optimizer_state_dict=True)

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self.FLAT)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self.FLAT)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=self.FLAT)

    def describe(self) -> dict:
        o, lay = self.opts, self.ctx.layout
        m, p, v = self.ctx.train.grad_accum, lay.pp, o.chunks
        facts = {
            "sharded": f"layers split into {p * v} pipeline stages over {p} ranks, balance {self.balance}"
                       + (f"; {lay.dp} data-parallel pipelines ({o.dp_mode})" if lay.dp > 1 else ""),
            "schedule": o.schedule, "micro_batches": m, "pp": p, "dp": lay.dp, "stages_per_rank": v,
            "dp_mode": o.dp_mode if lay.dp > 1 else None, "bubble_estimate": round(bubble(m, p, v if o.schedule == "interleaved_1f1b" else 1), 4),
            "balance": self.balance, "stage_of_rank": [lay.coords(r)["pp"] for r in range(lay.world)],
            "tied": "the last stage holds a copy of the token embedding; gradients all-reduced between first and "
                    "last stage" if self.tied else None,
            "checkpoint": "portable (gathered by name) or native: torch.distributed.checkpoint per stage, GPT names",
        }
        if self.idle_by_rank is not None:  # measured on the probe step
            facts["idle_share_by_rank"] = self.idle_by_rank
            per = lay.world // p
            facts["stage_idle_share"] = [round(sum(self.idle_by_rank[r] for r in range(lay.world)
                                                   if lay.coords(r)["pp"] == s) / per, 4) for s in range(p)]
        return facts


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP-sharded) tensor, in place."""
    return t.to_local() if hasattr(t, "to_local") else t
