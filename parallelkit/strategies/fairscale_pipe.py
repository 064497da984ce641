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

import contextlib
import os
import warnings

import torch
from fairscale.nn import Pipe
from fairscale.nn.pipe.balance import blockpartition
from torch import nn

from ..config import ConfigError, cuda_available, under_torchrun
from ..model import GPTConfig, lm_loss
from ..train import param_groups
from .base import Strategy, check_positive_int

CHECKPOINT_MODES = ("never", "except_last", "always")


def layer_costs(c: GPTConfig) -> list[int]:
    """Parameters per layer of ``GPT.layers()``; the tied head counts its V x d matmul too."""
    d, V = c.d_model, c.vocab_size
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return [V * d + c.seq_len * d, *[block] * c.n_layer, 2 * d + V * d]


def stage_balance(cfg) -> list[int]:
    """The configured balance, or a contiguous split of the layers by parameter count."""
    pp = cfg.strategy.get("pp_size", 2)
    balance = cfg.strategy.get("balance")
    if balance is None:
        return [len(p) for p in blockpartition.solve(layer_costs(GPTConfig.from_cfg(cfg.model)), pp)]
    return list(balance)


class _Autocast(nn.Module):
    """Pipe runs each stage in its own worker thread, where the caller's autocast does not reach."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.layer(x)


class FairScalePipeStrategy(Strategy):
    one_process = True

    @classmethod
    def check(cls, cfg) -> None:
        pp = check_positive_int(cfg.strategy.get("pp_size", 2), "strategy.pp_size")
        chunks = check_positive_int(cfg.strategy.get("chunks", 1), "strategy.chunks")
        n = cfg.model.n_layer + 2
        if pp > n:
            raise ConfigError(f"strategy.pp_size={pp} is more stages than the model's {n} layers "
                              f"(embedding + {cfg.model.n_layer} blocks + head)")
        if cfg.train.micro_batch_size % chunks:
            raise ConfigError(f"strategy.chunks={chunks} does not divide train.micro_batch_size="
                              f"{cfg.train.micro_batch_size}: each micro-batch is cut into chunks pipeline micro-batches")
        if cfg.strategy.get("checkpoint", "never") not in CHECKPOINT_MODES:
            raise ConfigError(f"strategy.checkpoint={cfg.strategy.get('checkpoint')!r}: choose one of {', '.join(CHECKPOINT_MODES)}")
        balance = cfg.strategy.get("balance")
        if balance is not None:
            ok = all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in balance)
            if not ok or len(balance) != pp or sum(balance) != n:
                raise ConfigError(f"strategy.balance={list(balance)} must be {pp} positive layer counts (strategy.pp_size) "
                                  f"summing to the model's {n} layers (embedding + {cfg.model.n_layer} blocks + head); "
                                  f"or null to split by parameter count")
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError("strategy=fairscale_pipe is one process driving every stage: start it with "
                              "python -m parallelkit.run, or torchrun --nproc_per_node=1")
        if cuda_available() and torch.cuda.device_count() < pp:
            raise ConfigError(f"strategy.pp_size={pp} needs {pp} CUDA devices, found {torch.cuda.device_count()}: "
                              f"lower strategy.pp_size")

    @classmethod
    def layout(cls, cfg) -> dict[str, int]:
        pp = check_positive_int(cfg.strategy.get("pp_size", 2), "strategy.pp_size")  # layout runs before check
        return {"world": pp, "dp": 1, "tp": 1, "pp": pp, "processes": 1, "virtual_dp": cfg.world_size}

    @classmethod
    def label(cls, cfg) -> str:
        return f"fairscale pipe pp{cfg.strategy.get('pp_size', 2)} (1 process)"

    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        pp = self.options.get("pp_size", 2)
        self.gpt = model_factory()  # on the CPU; Pipe moves each stage to its device
        head, embed = self.gpt.head.out, self.gpt.embed.tok
        self.tied = head.weight is embed.weight
        self.params = list(self.gpt.parameters())  # what the optimizer steps: the tied weight once
        if self.tied:
            head.weight = nn.Parameter(embed.weight.detach().clone())
        layers = self.gpt.layers()
        if ctx.autocast_dtype is not None:
            layers = [_Autocast(layer, ctx.autocast_dtype) for layer in layers]
        self.devices = [f"cuda:{i}" for i in range(pp)] if ctx.device.type == "cuda" else ["cpu"] * pp
        self.balance = stage_balance(cfg)
        with warnings.catch_warnings():  # "deprecated, upstreamed to torch.distributed.pipeline.sync" (since removed)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = Pipe(nn.Sequential(*layers), balance=self.balance, devices=self.devices,
                              chunks=self.options.get("chunks", 1), checkpoint=self.options.get("checkpoint", "never"))
        groups = param_groups(self.gpt, cfg.optim.weight_decay)
        for g in groups:  # the head's copy of a tied weight is refreshed, not stepped
            g["params"] = [p for p in g["params"] if not (self.tied and p is head.weight)]
        self.optimizer = optimizer_factory(groups)
        if ctx.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    def dp_ranks_per_process(self) -> list[int]:
        return list(range(self.ctx.cfg.world_size))

    def autocast(self):
        return contextlib.nullcontext()  # done per stage (_Autocast)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x.to(self.devices[0]))
        return lm_loss(logits, y.to(logits.device)).to(self.ctx.device)

    def optimizer_step(self, grad_clip: float) -> None:
        head, embed = self.gpt.head.out.weight, self.gpt.embed.tok.weight
        if self.tied and head.grad is not None:  # d loss / d tied weight = sum of both uses
            embed.grad = head.grad.to(embed.device) if embed.grad is None else embed.grad.add_(head.grad.to(embed.device))
            head.grad = None
        super().optimizer_step(grad_clip)
        if self.tied:
            with torch.no_grad():
                head.copy_(embed)

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        params = list(self.gpt.parameters())  # all stages, on all devices: this one process holds them
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {"params": params, "grads": [p.grad for p in params], "optimizer": optim}

    def model_for_export(self):
        return self.gpt  # same keys as single's GPT (the head copy saves under head.out.weight)

    def load(self, path) -> int:
        step = super().load(path)
        if self.tied:
            with torch.no_grad():
                self.gpt.head.out.weight.copy_(self.gpt.embed.tok.weight)
        return step

    def describe(self) -> dict:
        pp = len(self.devices)
        return {
            "sharded": f"layers split into {pp} pipeline stages, balance {self.balance}",
            "one_process": True, "devices": self.devices, "chunks": self.options.get("chunks", 1),
            "note": (f"one process driving {pp} devices ({', '.join(self.devices)}) over the global batch of "
                     f"{self.ctx.cfg.world_size} data-parallel ranks; throughput is not comparable with data-parallel runs"
                     + ("; on CPU the stages share the same cores, so nothing overlaps" if self.devices[0] == "cpu" else "")
                     + ("; peak memory is cuda:0's only" if self.devices[0] != "cpu" else "")),
        }
