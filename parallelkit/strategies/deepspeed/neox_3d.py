"""Tensor x pipeline x data parallelism in one run, as GPT-NeoX trains: Megatron-style tensor-parallel
blocks inside the stages of a DeepSpeed ``PipelineModule``, ZeRO-0/1 over the replicas.

``tp_size x pp_size`` ranks hold one model; ``world / (tp_size x pp_size)`` such models are data
parallel. DeepSpeed's ``PipeModelDataParallelTopology`` orders ranks (pipe, data, model), so a
tensor-parallel group is consecutive ranks. Everything else is ``deepspeed_pipe``'s: the same layers,
tied embedding, 1F1B schedule, loss, initialisation by name and norm bookkeeping.

In every block ``attn.qkv`` and ``mlp.fc`` are column-parallel (this rank's heads / hidden units, the
input gradient all-reduced over the tensor group in backward) and ``attn.proj`` and ``mlp.proj``
row-parallel (the output all-reduced in forward, the bias added once after it). Embeddings, LayerNorms
and the head are replicated over the tensor group and get identical gradients there, as in Megatron.
The layers are a few lines of autograd over the tensor group of DeepSpeed's grid, which works on CPU
and gloo (GPT-NeoX's own setup only initialises model parallelism on a GPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallelkit.config.layout import Layout
from parallelkit.models.gpt import Block
from parallelkit.strategies.deepspeed.pipe import DeepSpeedPipeStrategy, PipeOptions
from parallelkit.strategies.shared.tensor_parallel import check_heads, tp_slice


@dataclass
class Neox3DOptions(PipeOptions):
    tp_size: int = 2  # tensor-parallel ranks per stage; dp = world_size / (tp_size x pp_size)

    def validate(self) -> None:
        super().validate()
        self.at_least("tp_size", 1)


class TensorGroup:
    """This rank's place in its tensor-parallel group; the group itself exists once DeepSpeed's grid does."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.group = rank, size, None


class _CopyToTensorGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorGroup(torch.autograd.Function):
    """All-reduce of the partial outputs forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tp: TensorGroup):
        super().__init__()
        self.weight, self.bias, self.tp = nn.Parameter(weight), nn.Parameter(bias), tp
        self.weight.tp_split = self.bias.tp_split = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out / tp)
        return F.linear(_CopyToTensorGroup.apply(x, self.tp.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tp: TensorGroup):
        super().__init__()
        self.weight, self.bias, self.tp = nn.Parameter(weight), nn.Parameter(bias), tp
        self.weight.tp_split = True  # the bias is replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in / tp) -> (..., out)
        return _ReduceFromTensorGroup.apply(F.linear(x, self.weight), self.tp.group) + self.bias


def shard_block(block: Block, tp: TensorGroup) -> None:
    """Replace the block's four linears by tensor-parallel ones holding rank ``tp.rank``'s slices."""
    r, n = tp.rank, tp.size

    def part(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.detach().chunk(n, dim)[r].clone()

    a, m = block.attn, block.mlp
    # qkv's rows are [q; k; v], heads contiguous in each: this rank takes its heads of all three (tp_slice)
    qkv_w, qkv_b = (tp_slice(f"attn.qkv.{k}", getattr(a.qkv, k).detach(), r, n, False).clone() for k in ("weight", "bias"))
    a.qkv = ColumnParallelLinear(qkv_w, qkv_b, tp)
    a.proj = RowParallelLinear(part(a.proj.weight, 1), a.proj.bias.detach().clone(), tp)
    m.fc = ColumnParallelLinear(part(m.fc.weight, 0), part(m.fc.bias, 0), tp)
    m.proj = RowParallelLinear(part(m.proj.weight, 1), m.proj.bias.detach().clone(), tp)


class Neox3DStrategy(DeepSpeedPipeStrategy):
    Options = Neox3DOptions

    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout.model_parallel(cfg.world_size, tp=o.tp_size, pp=o.pp_size)

    @classmethod
    def check(cls, cfg, o) -> None:
        check_heads(cfg, o.tp_size, o.pp_size)
        super().check(cfg, o)

    @classmethod
    def label(cls, cfg, o) -> str:
        lay = cls.layout(cfg, o)
        return f"neox 3d tp{lay.tp} pp{lay.pp} dp{lay.dp}" + ("" if o.zero_stage == 1 else f" zero{o.zero_stage}")

    def shard(self):
        self.tp = TensorGroup(self.tp_rank, self.ctx.layout.tp)
        return functools.partial(shard_block, tp=self.tp) if self.tp.size > 1 else None

    def build_model(self, build):
        pipe = super().build_model(build)
        self.tp.group = pipe.mpu().get_slice_parallel_group()
        return pipe

    def describe(self) -> dict:
        facts = super().describe()
        lay = self.ctx.layout
        facts["sharded"] = (f"attention heads and MLP units over {lay.tp} tensor-parallel ranks; " + facts["sharded"])
        facts["replicated"] = "embeddings, LayerNorms, row-parallel biases and the head over the tensor-parallel group"
        return facts
