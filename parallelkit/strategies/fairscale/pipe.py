"""FairScale Pipe (GPipe): ONE process drives ``pp_size`` devices, the GPT cut into stages.

The GPT is the flat ``nn.Sequential(Embedding, Block * n_layer, Head)``; ``strategy.balance``
says how many of those layers each stage gets (computed from the layers' parameter counts
when null), ``strategy.chunks`` how many pipeline micro-batches each micro-batch is cut into.
Stages live on ``cuda:0..pp_size-1``, or all on ``cpu`` (the schedule runs, nothing overlaps).

Being one process, it consumes the global batch of ``world_size`` data-parallel ranks (as
``single`` does), so its losses compare with ``single``; its throughput is that of one
process on ``pp_size`` devices and is not comparable with data-parallel rows.

Tied weights: Pipe refuses a parameter shared by stages on different devices, so the head
gets its own copy of the token embedding; before each step the head's gradient is added
to the embedding's (what tying does in autograd) and after it the copy is refreshed. The
optimizer and the gradient norm see the tied weight once, as in ``single``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from parallelkit.config.env import cuda_available, under_torchrun
from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout, split_stages
from parallelkit.models.gpt import GPTConfig, lm_loss
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.shared.memory_model import activation_values, parts_total
from parallelkit.strategies.shared.pipeline import gpt_layers, stage_balance


@dataclass
class PipeOptions(Options):
    pp_size: int = 2  # pipeline stages (= devices)
    balance: Optional[list[int]] = None  # layers per stage (embedding + n_layer blocks + head); null = by parameter count
    chunks: int = 2  # pipeline micro-batches per micro-batch; must divide train.micro_batch_size
    checkpoint: str = "never"  # never | except_last | always: recompute activations of pipeline micro-batches

    def validate(self) -> None:
        self.at_least("pp_size", 1)
        self.at_least("chunks", 1)
        self.choice("checkpoint", ("never", "except_last", "always"))


class _Autocast(nn.Module):
    """Pipe runs each stage in its own worker thread, where the caller's autocast does not reach."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.layer(x)


def untie_head(gpt) -> bool:
    """Give the head its own copy of a tied token embedding (Pipe refuses a parameter shared by stages); whether
    it was tied."""
    tied = gpt.head.out.weight is gpt.embed.tok.weight
    if tied:
        gpt.head.out.weight = nn.Parameter(gpt.embed.tok.weight.detach().clone())
    return tied


def pipe(gpt, balance: list[int], devices: list[str], chunks: int, checkpoint: str = "never",
         dtype: torch.dtype | None = None) -> nn.Module:
    """The GPT's layers (head untied: ``untie_head``) as a FairScale Pipe of ``balance`` layers on ``devices``."""
    layers = gpt.layers()
    if dtype is not None:
        layers = [_Autocast(layer, dtype) for layer in layers]
    with warnings.catch_warnings():  # "deprecated, upstreamed to torch.distributed.pipeline.sync" (since removed)
        warnings.simplefilter("ignore", DeprecationWarning)
        from fairscale.nn import Pipe

        return Pipe(nn.Sequential(*layers), balance=balance, devices=devices, chunks=chunks, checkpoint=checkpoint)


def cpu_proxy(gpt, stages: int, chunks: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The projection's training-rate proxy (a GPT of few blocks) as this strategy steps it on CPU: ``stages``
    stages (at most one a layer) split by parameter count, each micro-batch cut in ``chunks``."""
    untie_head(gpt)
    balance = stage_balance(gpt_layers(gpt.config), min(stages, gpt.config.n_layer + 2))
    return pipe(gpt, balance, ["cpu"] * len(balance), chunks, dtype=dtype)


class FairScalePipeStrategy(Strategy):
    families = ("gpt",)  # cuts the GPT into stages / shards by its layout
    Options = PipeOptions
    one_process = True
    autocast_forward = False  # done per stage (_Autocast)

    @classmethod
    def layout(cls, cfg, o) -> Layout:
        return Layout(world=o.pp_size, dp=1, pp=o.pp_size, processes=1, ranks_per_process=cfg.world_size)

    @classmethod
    def check(cls, cfg, o) -> None:
        pp, n = o.pp_size, cfg.model.n_layer + 2
        if pp > n:
            raise ConfigError(f"strategy.pp_size={pp} is more stages than the model's {n} layers "
                              f"(embedding + {cfg.model.n_layer} blocks + head): use strategy.pp_size <= {n}")
        if cfg.train.micro_batch_size % o.chunks:
            fits = [d for d in range(1, cfg.train.micro_batch_size + 1) if cfg.train.micro_batch_size % d == 0]
            raise ConfigError(f"strategy.chunks={o.chunks} does not divide train.micro_batch_size="
                              f"{cfg.train.micro_batch_size}: each micro-batch is cut into chunks pipeline micro-batches; "
                              f"use strategy.chunks={' or '.join(map(str, fits))}")
        if o.balance is not None and (len(o.balance) != pp or sum(o.balance) != n or min(o.balance) < 1):
            raise ConfigError(f"strategy.balance={list(o.balance)} must be {pp} positive layer counts (strategy.pp_size) "
                              f"summing to the model's {n} layers (embedding + {cfg.model.n_layer} blocks + head), "
                              f"e.g. {split_stages(GPTConfig.from_cfg(cfg.model).layer_params(), pp)}; "
                              f"or null to split by parameter count")
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError("strategy=fairscale_pipe is one process driving every stage: start it with "
                              "python -m parallelkit.run, or torchrun --nproc_per_node=1")
        if cuda_available() and torch.cuda.device_count() < pp:
            raise ConfigError(f"strategy.pp_size={pp} needs {pp} CUDA devices, found {torch.cuda.device_count()}: "
                              f"lower strategy.pp_size")

    @classmethod
    def label(cls, cfg, o) -> str:
        return f"fairscale pipe pp{o.pp_size} (1 process)"

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        """The largest stage: its layers' state (the last also its head copy, which gets no gradient and is not
        stepped by the optimizer: measured on `small`, params count it, gradients and optimizer state do not) and
        GPipe's activations: every chunk's stage inputs, plus whole chunks where checkpointing keeps them."""
        c, t = GPTConfig.from_cfg(cfg.model), cfg.train
        d, V, T, L, b = c.d_model, c.vocab_size, c.seq_len, c.n_layer, t.micro_batch_size
        costs, mp, ckpt = c.layer_params(own_head=True), t.precision != "fp32", bool(t.activation_checkpointing)
        rows, start = [], 0
        for n in stage_balance(gpt_layers(c), o.pp_size, given=o.balance):
            layers = range(start, start + n)
            start += n
            psi = sum(costs[j] for j in layers)
            blocks = sum(1 for j in layers if 0 < j <= L)
            no_opt = V * d if c.tie_weights and L + 1 in layers else 0
            stepped = psi - no_opt
            r = {"params": 4 * psi, "grads": 4 * stepped, "optimizer": 8 * stepped, "buffers": 2 * psi if mp else 0,
                 "offloaded": 0}
            if ckpt or o.checkpoint == "never":
                act = activation_values(c, b, blocks, 1, ckpt)
            else:  # stage inputs of every chunk + the chunks kept whole (except_last: the last one) + one recomputed
                act = blocks * T * b * d + (2 if o.checkpoint == "except_last" else 1) * activation_values(c, b / o.chunks, blocks)
            act = (act + (2 * T * b * d if L + 1 in layers else 0)) * (2 if mp else 4)  # + the head's two inputs
            if L + 1 in layers:
                act += 12 * b * T * V  # the loss's log-softmax and two gradients, fp32 (memory_model.activations)
            rows.append({**r, "activations": act})
        return {**max(rows, key=parts_total), "stages": rows}  # every stage: one process holds them all

    @classmethod
    def comm(cls, cfg, o, layout):
        return {}  # one process drives every stage: activations move between devices, not between ranks

    @classmethod
    def proxy_held(cls, cfg, o, layout):
        """On CPU, Pipe runs every stage's forward on one worker thread (it keeps a worker a device), chunk by
        chunk, beside the caller's intra-op threads, and the backward on the caller's: 1.4-1.6x the FLOP time
        of a plain step of the micro-batch, so the projection's proxy is stepped as a Pipe too."""
        return None if cuda_available() else {"pipe": [o.pp_size, o.chunks]}

    def build_model(self, build):
        gpt = build(device="cpu")  # Pipe moves each stage to its device
        self.tied = untie_head(gpt)
        return gpt

    def wrap(self, gpt):
        ctx, pp = self.ctx, self.opts.pp_size
        self.devices = [f"cuda:{i}" for i in range(pp)] if ctx.device.type == "cuda" else ["cpu"] * pp
        self.balance = stage_balance(gpt_layers(ctx.model), self.opts.pp_size, given=self.opts.balance)
        return pipe(gpt, self.balance, self.devices, self.opts.chunks, self.opts.checkpoint, self.precision.dtype)

    def param_groups(self, module):
        groups = super().param_groups(module)
        head = module.head.out.weight
        for g in groups:  # the head's copy of a tied weight is refreshed, not stepped
            g["params"] = [p for p in g["params"] if not (self.tied and p is head)]
        return groups

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x.to(self.devices[0]))
        return lm_loss(logits, y.to(logits.device)).to(self.ctx.device)

    def optimizer_step(self, grad_clip: float) -> None:
        head, embed = self.module.head.out.weight, self.module.embed.tok.weight
        if self.tied and head.grad is not None:  # d loss / d tied weight = sum of both uses
            embed.grad = head.grad.to(embed.device) if embed.grad is None else embed.grad.add_(head.grad.to(embed.device))
            head.grad = None
        super().optimizer_step(grad_clip)  # clips over the tied weight once, as single does
        if self.tied:
            with torch.no_grad():
                head.copy_(embed)

    # ---- checkpoints: the GPT's own names; the head's copy of a tied weight is neither saved nor stepped ----
    def portable_params(self):
        return [(n, p) for n, p in self.module.named_parameters() if not (self.tied and n == "head.out.weight")]

    def import_state(self, model, optim) -> None:
        super().import_state(model, optim)
        self._refresh_head()

    def load(self, path) -> None:
        super().load(path)
        self._refresh_head()

    def _refresh_head(self) -> None:
        if self.tied:
            with torch.no_grad():
                self.module.head.out.weight.copy_(self.module.embed.tok.weight)

    def describe(self) -> dict:
        pp, n = len(self.devices), self.ctx.layout.ranks_per_process
        return {
            "sharded": f"layers split into {pp} pipeline stages, balance {self.balance}",
            "one_process": True, "devices": self.devices, "chunks": self.opts.chunks,
            "note": (f"one process driving {pp} devices ({', '.join(self.devices)}) over the global batch of "
                     f"{n} data-parallel ranks; throughput is not comparable with data-parallel runs"
                     + ("; on CPU the stages share the same cores, so nothing overlaps" if self.devices[0] == "cpu" else "")
                     + ("; peak memory is cuda:0's only" if self.devices[0] != "cpu" else "")),
        }

