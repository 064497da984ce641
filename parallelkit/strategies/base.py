"""The Strategy interface: everything that differs between backends, and nothing else."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..model import lm_loss
from ..metrics import DTYPES


@dataclass
class Context:
    """What a strategy needs to know about the run and the process it is in."""

    cfg: Any  # the resolved run config (OmegaConf)
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str = "fp32"
    comm: Any = None  # metrics.CommCounter
    extra: dict = field(default_factory=dict)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else DTYPES[self.precision]


ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]  # params or param groups -> optimizer


class Strategy:
    """Default behaviour is plain PyTorch on one process; subclasses override what differs.

    The training loop only calls: ``setup``, ``train_step``, ``set_lr``, ``state_tensors``,
    ``save`` / ``load``, ``describe`` and ``teardown``. ``train_step`` is built from
    ``forward_loss``, ``backward``, ``no_sync`` and ``optimizer_step``, which most
    backends override one at a time; pipelines override ``train_step`` whole.
    """

    one_process = False  # True when one process drives every device (e.g. FairScale Pipe)

    def __init__(self, name: str, **options: Any):
        self.name, self.options = name, options
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = None

    # ---- checks before any worker starts (run in the launching process) ----
    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError for a layout or option this backend cannot run."""

    @classmethod
    def layout(cls, cfg) -> dict[str, int]:
        """Degrees of parallelism for the configured world size: world, dp, tp, pp, processes."""
        w = cfg.world_size
        return {"world": w, "dp": w, "tp": 1, "pp": 1, "processes": w}

    @classmethod
    def label(cls, cfg) -> str:
        return cfg.strategy.name

    # ---- in the worker ----
    def setup(self, ctx: Context, model_factory: ModelFactory, optimizer_factory: OptimizerFactory) -> None:
        self.ctx = ctx
        self.model = model_factory().to(ctx.device)
        self.optimizer = optimizer_factory(self.model)
        if ctx.precision == "fp16":
            self.scaler = torch.amp.GradScaler(ctx.device.type)

    @property
    def dp_rank(self) -> int:
        return self.ctx.rank

    def dp_ranks_per_process(self) -> list[int]:
        """The data-parallel ranks whose micro-batches this process consumes."""
        return [self.dp_rank]

    def autocast(self):
        dt = self.ctx.autocast_dtype
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=dt)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        return lm_loss(logits, y)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def no_sync(self):
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def optimizer_step(self, grad_clip: float) -> None:
        if grad_clip:
            self.clip_grad_norm(grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns their mean loss."""
        self.zero_grad()
        total = torch.zeros((), device=self.ctx.device)
        n = len(micro_batches)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
            with self.no_sync() if i < n - 1 else contextlib.nullcontext():
                loss = self.forward_loss(x, y)
                self.backward(loss / n)
            total += loss.detach()
        self.optimizer_step(grad_clip)
        return total / n

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """Mean of the step's loss over the data-parallel ranks (the global batch's loss)."""
        if dist.is_initialized() and self.ctx.world_size > 1:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= self.ctx.world_size  # tp/pp peers hold the same value, so world mean = dp mean
        return float(loss)

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """This rank's parameters, gradients and optimizer state, for ``model_state_bytes``."""
        params = list(self.model.parameters())
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {"params": params, "grads": [p.grad for p in params], "optimizer": optim}

    def model_for_export(self) -> nn.Module:
        return self.model

    # ---- checkpoints: rank 0 writes one consolidated file; every rank reads it ----
    def save(self, path: Path, step: int) -> None:
        if self.ctx.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            state = {"model": self.model_for_export().state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}
            torch.save(state, path / "state.pt")

    def load(self, path: Path) -> int:
        state = torch.load(path / "state.pt", map_location=self.ctx.device, weights_only=False)
        self.model_for_export().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["step"]

    def describe(self) -> dict[str, Any]:
        """Facts for the report: what is sharded, anything the reader should know."""
        return {"sharded": "nothing"}

    def teardown(self) -> None:
        pass


def check_positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a positive integer")
    return value
