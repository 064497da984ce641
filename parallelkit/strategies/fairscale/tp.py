"""FairScale tensor parallelism (Megatron-style, ``fairscale.nn.model_parallel``) x data parallelism.

``tp_size`` consecutive ranks share one model: in every block ``attn.qkv`` and ``mlp.fc`` are
``ColumnParallelLinear`` (each rank computes its own heads / hidden units, no gather) and
``attn.proj`` and ``mlp.proj`` are ``RowParallelLinear`` (one all-reduce of the output). The
token embedding is a ``VocabParallelEmbedding`` and the tied head a column-parallel linear
over the same vocabulary slice, so the loss is ``vocab_parallel_cross_entropy`` and full
logits never exist (``vocab_parallel: false`` keeps embedding and head replicated instead).

The sharded layers are cut out of the reference GPT built with the run's seed, so the model
is exactly ``single``'s at step 0 on every device (fairscale's model-parallel RNG is CUDA-only
and only matters for dropout, which the GPT does not use). The ``world / tp_size`` replicas
are data parallel: torch DDP over fairscale's data-parallel group, and every rank of a tensor
parallel group reads the same micro-batches (``dp_rank``).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPT, GPTConfig
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.by_name import load_by_name, state_by_name
from parallelkit.strategies.shared.comm_model import (
    FP32,
    clip_norm,
    gpt,
    one_process,
    tensor_parallel,
    total,
    word,
)
from parallelkit.strategies.shared.ddp import ddp_probe_comm, ddp_wrap
from parallelkit.strategies.shared.lazy import lazy
from parallelkit.strategies.shared.memory_model import activations, replica_state
from parallelkit.strategies.shared.tensor_parallel import (  # noqa: F401
    check_heads,
    split_of,
    tp_slice,
    tp_unslice,
)

mp = lazy("fairscale.nn.model_parallel")
layers = lazy("fairscale.nn.model_parallel.layers")


@dataclass
class TPOptions(Options):
    tp_size: int = 2  # ranks per model; world_size / tp_size data-parallel replicas
    vocab_parallel: bool = True  # split embedding + tied head over the vocabulary; false = keep them replicated

    def validate(self) -> None:
        self.at_least("tp_size", 1)


def _keep(w: torch.Tensor) -> torch.Tensor:  # init_method: the weights are copied in afterwards
    return w


def shard_gpt(gpt: GPT, r: int, n: int, vocab_parallel: bool) -> None:
    """Swap the GPT's layers for tensor-parallel ones holding rank ``r``'s slices (``tp_slice``). Split parameters
    get ``tp_split = True``; the others are replicated across the tensor-parallel group."""

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        return tp_slice(name, t, r, n, vocab_parallel)

    def column(lin: nn.Linear, name: str) -> "layers.ColumnParallelLinear":
        new = layers.ColumnParallelLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, gather_output=False,
                                   init_method=_keep)
        with torch.no_grad():
            new.weight.copy_(cut(f"{name}.weight", lin.weight))
            if lin.bias is not None:
                new.bias.copy_(cut(f"{name}.bias", lin.bias))
        for p in new.parameters():
            p.tp_split = True
        return new

    def row(lin: nn.Linear, name: str) -> "layers.RowParallelLinear":
        new = layers.RowParallelLinear(lin.in_features, lin.out_features, bias=True, input_is_parallel=True, init_method=_keep)
        with torch.no_grad():
            new.weight.copy_(cut(f"{name}.weight", lin.weight))
            new.bias.copy_(lin.bias)  # added once, after the all-reduce: replicated
        new.weight.tp_split = True
        return new

    for i, b in enumerate(gpt.blocks):
        b.attn.qkv, b.attn.proj = column(b.attn.qkv, f"blocks.{i}.attn.qkv"), row(b.attn.proj, f"blocks.{i}.attn.proj")
        b.mlp.fc, b.mlp.proj = column(b.mlp.fc, f"blocks.{i}.mlp.fc"), row(b.mlp.proj, f"blocks.{i}.mlp.proj")
    if vocab_parallel:
        tok, out = gpt.embed.tok, gpt.head.out
        tied = out.weight is tok.weight
        emb = layers.VocabParallelEmbedding(tok.num_embeddings, tok.embedding_dim, init_method=_keep)
        with torch.no_grad():
            emb.weight.copy_(cut("embed.tok.weight", tok.weight))
        emb.weight.tp_split = True
        gpt.embed.tok = emb
        gpt.head.out = column(out, "head.out")
        if tied:
            gpt.head.out.weight = emb.weight  # same vocabulary slice on both sides: tying survives


class FairScaleTPStrategy(Strategy):
    families = ("gpt",)  # cuts the GPT into stages / shards by its layout
    Options = TPOptions

    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout.model_parallel(cfg.world_size, tp=o.tp_size)

    @classmethod
    def check(cls, cfg, o) -> None:
        tp = o.tp_size
        check_heads(cfg, tp)
        if o.vocab_parallel and cfg.model.vocab_size % tp:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is not divisible by strategy.tp_size={tp}: "
                              f"pad the vocabulary or set strategy.vocab_parallel=false")

    @classmethod
    def label(cls, cfg, o) -> str:
        return f"fairscale tp{o.tp_size}"

    @classmethod
    def compute_share(cls, cfg, o, layout):
        """With vocab_parallel=false every tensor-parallel rank computes the whole head (``whole_head_share``)."""
        if o.vocab_parallel or layout.tp == 1:
            return 1.0
        from parallelkit.strategies.shared.pipeline import whole_head_share

        return whole_head_share(GPTConfig.from_cfg(cfg.model), layout.tp)

    @classmethod
    def wait_gaps(cls, cfg, o, layout):
        """A micro-batch's all-reduces: four per block, after a quarter of its compute each (the row-parallel
        outputs forward, the column-parallel inputs' gradients backward); with vocab_parallel also the
        embedding's, after its lookup, the loss's three, within the head's forward (a third of the head's
        compute), and the head's input gradient, after its backward. The head of `small` is most of a rank's
        FLOPs: its few waits come after tens of milliseconds, the blocks' after a few."""
        if layout.tp == 1:
            return {}
        from parallelkit.strategies.shared.pipeline import block_flops

        c = GPTConfig.from_cfg(cfg.model)
        blocks = c.n_layer * block_flops(c)
        head = (c.flops_per_token() - blocks) * (1 if o.vocab_parallel else layout.tp)  # per rank: x 1/tp
        b, h = blocks / (blocks + head), head / (blocks + head)
        if not o.vocab_parallel:  # the first backward wait also follows the head's backward
            return {"all_reduce": [(4 * c.n_layer - 1, b / (4 * c.n_layer)), (1, h * 2 / 3)]}
        return {"all_reduce": [(4 * c.n_layer, b / (4 * c.n_layer)), (1, 0.0), (3, h / 9), (1, h * 2 / 3)]}

    @classmethod
    def proxy_held(cls, cfg, o, layout):
        """Each rank computes half-width (1/tp) layers: its proxy too (projection._tp_proxy)."""
        return {"tp": [layout.tp, bool(o.vocab_parallel)]} if layout.tp > 1 else None

    @classmethod
    def rank_params(cls, cfg, o, layout) -> float:
        """Parameters one rank holds: the block matmuls (and with vocab_parallel the embedding and head) split
        over tp, the rest replicated."""
        c, tp = GPTConfig.from_cfg(cfg.model), layout.tp
        split = c.n_layer * c.block_matmul_params() + (c.vocab_size * c.d_model if o.vocab_parallel and tp > 1 else 0)
        return c.num_params() - split * (1 - 1 / tp)

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        """The block matmuls (and with vocab_parallel the embedding and head) split over tp; the rest replicated."""
        vocab = o.vocab_parallel and layout.tp > 1
        psi = cls.rank_params(cfg, o, layout)
        r = replica_state(cfg, psi)
        if layout.dp > 1:
            r["buffers"] += 4 * psi  # DDP's buckets over the data-parallel group
        return {**r, "activations": activations(cfg, layout.tp, vocab)}

    @classmethod
    def comm(cls, cfg, o, layout):
        """all_reduce only. Over the tensor-parallel group, per micro-batch (``comm_model.tensor_parallel``): 4 s·b·h per
        block (fairscale's RowParallelLinear output in forward, ColumnParallelLinear input gradient in backward),
        with vocab_parallel the embedding's output, the head's input gradient and the cross-entropy's 3 s·b
        scalars; under autocast the row outputs are 16-bit, the rest fp32. Over the data-parallel group, when dp > 1:
        DDP's all-reduce of this rank's fp32 gradients once per step. Plus the clip norm's one scalar. Measured on
        tiny (tp 2; fp32 and bf16; grad_accum 1 and 2) to the byte."""
        if one_process(layout) or (layout.tp == 1 and layout.dp == 1):
            return {}
        dp = {"all_reduce": FP32 * cls.rank_params(cfg, o, layout)} if layout.dp > 1 else {}
        tp = tensor_parallel(cfg, gpt(cfg).n_layer, word(cfg.train.precision), FP32, o.vocab_parallel) if layout.tp > 1 else {}
        return total(tp, dp, clip_norm(cfg))

    def build_model(self, build):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its group sizes on rank 0
            mp.initialize_model_parallel(self.opts.tp_size)
        if self.ctx.device.type == "cuda":  # the model-parallel RNG streams (dropout in tp regions); CUDA only
            mp.model_parallel_cuda_manual_seed(self.ctx.seed)
        self.mp_group = mp.get_model_parallel_group()
        # FairScale's groups are the layout's rank map (pp 1, dp, tp fastest): its tensor group is ours
        assert mp.get_model_parallel_rank() == self.tp_rank and mp.get_data_parallel_rank() == self.dp_rank, \
            (self.ctx.rank, mp.get_model_parallel_rank(), self.coords)
        gpt = build(device="cpu")  # the full reference model, then cut
        shard_gpt(gpt, self.tp_rank, self.opts.tp_size, self.opts.vocab_parallel)
        return gpt.to(self.ctx.device)

    def wrap(self, module):
        if mp.get_data_parallel_world_size() == 1:
            return module
        return ddp_wrap(module, self.ctx, group=mp.get_data_parallel_group())

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.opts.vocab_parallel:
            return super().loss_fn(logits, y)
        return mp.vocab_parallel_cross_entropy(logits.float(), y).mean()  # logits: this rank's vocabulary slice

    def no_sync(self):
        return self.model.no_sync() if isinstance(self.model, DDP) else contextlib.nullcontext()

    def clip(self, max_norm: float) -> None:
        """Global norm: split parameters' squares summed over the tp group, replicated ones once."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        zero = torch.zeros((), device=self.ctx.device)
        split = sum((p.grad.float().pow(2).sum() for p in params if getattr(p, "tp_split", False)), zero.clone())
        dist.all_reduce(split, group=self.mp_group)
        rest = sum((p.grad.float().pow(2).sum() for p in params if not getattr(p, "tp_split", False)), zero)
        total = (split + rest).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))

    def probe_comm(self):
        return ddp_probe_comm(self.model, self.ctx.instrument)

    # ---- checkpoints ----
    # Portable: each split tensor (and its moments) all-gathered over the tensor-parallel group and put back
    # together (``tp_unslice``); on import each rank cuts its part (``tp_slice``), as at build time.
    def export_state(self):
        model, optim = state_by_name(self.portable_params(), self.optimizer)
        model = {k: self._full(k, v) for k, v in model.items()}
        optim = {k: {s: v if s == "step" else self._full(k, v) for s, v in st.items()} for k, st in optim.items()}
        return (model, optim) if self.ctx.rank == 0 else None

    def _full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if split_of(name, self.opts.vocab_parallel) is None:
            return t
        t = t.to(self.ctx.device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.opts.tp_size)]
        dist.all_gather(parts, t, group=self.mp_group)
        return tp_unslice(name, [p.cpu() for p in parts], self.opts.vocab_parallel)

    def import_state(self, model, optim) -> None:
        r, n, vp = self.tp_rank, self.opts.tp_size, self.opts.vocab_parallel
        mine = {k: tp_slice(k, v, r, n, vp) for k, v in model.items()}
        moments = {k: {s: v if s == "step" else tp_slice(k, v, r, n, vp) for s, v in st.items()} for k, st in optim.items()}
        load_by_name(self.portable_params(), self.optimizer, mine, moments)

    # Native: one file per tensor-parallel rank, written by data-parallel replica 0 (same tp_size to resume).
    def save(self, path: Path) -> None:
        if self.dp_rank == 0:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "tp_size": self.opts.tp_size}
            torch.save(state, path / f"tp_rank{self.tp_rank}.pt")

    def load(self, path: Path) -> None:
        state = torch.load(Path(path) / f"tp_rank{self.tp_rank}.pt", map_location=self.ctx.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def describe(self) -> dict:
        what = "attention heads and MLP units" + (", vocabulary (embedding + tied head)" if self.opts.vocab_parallel else "")
        return {"sharded": f"{what} over {self.opts.tp_size} tensor-parallel ranks; {mp.get_data_parallel_world_size()} "
                           f"data-parallel replicas",
                "replicated": "LayerNorms, position embedding, row-parallel biases"
                              + ("" if self.opts.vocab_parallel else ", token embedding and head"),
                "native_checkpoint": "one file per tensor-parallel rank (resume with the same tp_size)"}

    def teardown(self) -> None:
        mp.destroy_model_parallel()
