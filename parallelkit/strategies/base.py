"""The Strategy template: the common work once, hooks where backends differ.

A backend is one file: an ``Options`` dataclass (its typed options and their defaults, the
only place a default lives), the class methods that run before any worker starts
(``layout``, ``check``, ``label``, ``memory``), and the hooks it overrides. The base class
does device placement, precision (autocast, fp16 scaler, unscale before clip), clipping,
the optimizer from ``optim.py``, accumulation with ``no_sync`` and the optimizer step.

Hooks, in the order ``setup`` calls them: ``build_model`` (default: the whole GPT on the
device), ``wrap`` (DDP, FSDP, ...), ``make_optimizer`` (default: AdamW over
``param_groups``), ``wrap_with_optimizer`` (DeepSpeed's engine, ShardedDDP). Per step: ``forward_loss`` / ``loss_fn``, ``backward``, ``no_sync``,
``clip``, ``optimizer_step``; pipelines replace ``train_step`` whole. ``global_loss`` turns
what a rank holds into the global batch's loss: the loop records that value for every
strategy, whatever ranks hold the loss.

Checkpoints: ``export_state`` / ``import_state`` turn a strategy's state into the portable form
(full fp32 tensors under the single-process GPT's parameter names, AdamW moments beside them)
and back, so any strategy resumes from any other's checkpoint; ``save`` / ``load`` are the
backend's own format (``checkpoint.format=native``). Every backend implements both pairs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from torch import nn

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPTConfig, lm_loss
from parallelkit.strategies.shared.by_name import load_by_name, state_by_name
from parallelkit.strategies.shared.optim import build_optimizer, param_groups
from parallelkit.strategies.shared.precision import Precision
from parallelkit.util.markers import OPTIMIZER, marker


@dataclass
class Options:
    """Options every strategy has. A backend subclasses this with its own fields."""

    name: str = ""  # the preset's name, shown in tables

    def validate(self) -> None:
        """Checks of values the types allow but the backend does not (choices, ranges)."""

    def choice(self, key: str, allowed: tuple) -> None:
        """Refuse a value outside ``allowed`` in one line naming the key and the choices."""
        v = getattr(self, key)
        if v not in allowed:
            raise ConfigError(f"strategy.{key}={v!r}: choose one of {', '.join(map(str, allowed))}")

    def at_least(self, key: str, minimum: int) -> None:
        v = getattr(self, key)
        if v is not None and v < minimum:
            raise ConfigError(f"strategy.{key}={v!r}: must be an integer >= {minimum}")


@dataclass
class Context:
    """What a strategy may know about the run and the process it is in."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: Layout
    precision: str = "fp32"
    seed: int = 0
    model: GPTConfig | None = None
    optim: Any = None  # optim.* (lr, betas, eps, weight_decay, schedule)
    train: Any = None  # train.* (micro_batch_size, grad_accum, grad_clip, ...)
    run_dir: Path | None = None
    instrument: bool = False  # count communication on every step (the slower, instrumented path)
    cfg: Any = None  # the whole run config, for backends whose own config mirrors the run's (DeepSpeed)
    malloc: str | None = None  # glibc's mmap threshold in effect (measure/metrics.py fix_mmap_threshold)


ModelBuilder = Callable[..., nn.Module]  # (device=..., init=...) -> GPT


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "bool": "true or false", "String": "a string"}


class Strategy:
    Options = Options
    one_process = False  # one process drives every device (FairScale Pipe)
    autocast_forward = True  # False when the backend casts the model itself
    scaler_class = None  # fp16 loss scaler; None: torch.amp.GradScaler (sharded gradients need a sharded one)
    families = ("gpt", "llama", "hf")  # model.arch it runs; one that cuts the model into stages or shards: ("gpt",)
    portable = True  # export_state / import_state implemented (checked before launch: False refuses the portable form)
    reference: int | None = None  # the report compares losses with the ok run whose reference is lowest (single 0, ddp 1)
    candidate = True  # tune measures it (False: not a way to train on world_size devices)

    def __init__(self, opts: Options):
        self.opts = opts
        self.model: nn.Module | None = None  # what forward calls (the wrapper)
        self.module: nn.Module | None = None  # the GPT inside it
        self.optimizer: torch.optim.Optimizer | None = None
        self.measuring = False  # set by the loop on the untimed probe step

    # ---- before any worker starts (in the launching process; again in each worker) ----
    @classmethod
    def options(cls, cfg) -> Options:
        """``cfg.strategy`` checked against ``Options``: one line for a wrong type or an unknown option. The config
        is not changed (the plan builder writes the complete options into the plan's copy)."""
        raw = OmegaConf.to_container(cfg.strategy, resolve=True) if isinstance(cfg.strategy, DictConfig) else dict(cfg.strategy)
        raw.pop("_target_", None)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.Options), raw)
            opts = OmegaConf.to_object(merged)
        except ConfigKeyError as e:
            names = ", ".join(f.name for f in dataclasses.fields(cls.Options) if f.name != "name")
            raise ConfigError(f"strategy.{e.key}: no such option of strategy {raw.get('name')}; its options are "
                              f"{names or '(none)'}") from None
        except OmegaConfBaseException as e:
            first = str(e).splitlines()[0]
            want = next((w for k, w in _TYPE_WORDS.items() if k in first), "of the documented type")
            value = OmegaConf.select(OmegaConf.create(raw), str(e.full_key).split("[")[0])
            raise ConfigError(f"strategy.{e.full_key}={value!r}: must be {want}") from None
        opts.name = opts.name or OmegaConf.select(cfg, "strategy.name") or cls.__name__
        opts.validate()
        return opts

    @classmethod
    def prepare(cls, cfg, explicit: set[str]) -> list[str]:
        """Planning, before the checks, on the plan's private copy of the config: fill what the command line
        (``explicit``: the keys it set) leaves unsaid from a backend's own config file (DeepSpeed: the user's
        JSON is the source of truth for the rest). Returns what it did, as notes."""
        return []

    @classmethod
    def layout(cls, cfg, o: Options) -> Layout:
        return Layout.data_parallel(cfg.world_size)

    @classmethod
    def check(cls, cfg, o: Options) -> None:
        """Raise ConfigError for a layout or an option this backend cannot run."""

    @classmethod
    def after_run(cls, cfg) -> None:
        """In the launching process, once every worker has ended however the run ended: remove what the backend
        leaves outside the run folder (DeepSpeed: NVMe swap folders of workers that died)."""

    @classmethod
    def label(cls, cfg, o: Options) -> str:
        return o.name

    @classmethod
    def memory(cls, cfg, o: Options, layout: Layout, mem: int | None) -> dict | None:
        """Predicted bytes per rank by part (``shared/memory_model.py``: params, grads, optimizer, buffers,
        activations, offloaded; pipelines add ``stages``). None: this backend does not predict its memory, and
        the estimate, the pre-flight and the report say "not predicted" (never a guess)."""
        return None

    @classmethod
    def comm(cls, cfg, o: Options, layout: Layout) -> dict[str, float] | None:
        """Predicted communication per optimizer step on the busiest rank, by kind (all_reduce, reduce_scatter,
        all_gather, broadcast, send_recv), in the units ``metrics.CommCounter`` measures: the payload a rank
        hands to each call, not wire traffic. ``{}``: nothing is sent. None: not predicted."""
        return None

    @classmethod
    def compute_share(cls, cfg, o: Options, layout: Layout) -> float:
        """The busiest rank's FLOPs over an even split of the step's FLOPs between the processes, for the
        projection: above 1 where every rank of a group repeats some work (a head kept whole on each
        tensor-parallel rank). 1.0: an even split."""
        return 1.0

    @classmethod
    def pipeline_shares(cls, cfg, o: Options, layout: Layout) -> tuple[list[float], int] | None:
        """A pipeline's (share of the model's FLOPs on each pipeline rank, model chunks per rank), for the
        projection's slowest stage and bubble. None: not a pipeline."""
        return None

    @classmethod
    def proxy_held(cls, cfg, o: Options, layout: Layout) -> dict | None:
        """How the run holds its model where that changes the time of a step beyond its FLOPs, bytes and
        collectives, for the projection's proxies (the training rate's and the optimizer's), held the same way:
        ``{"pipe": [stages, chunks]}`` where one process steps the model as a pipeline on this machine's CPU;
        ``{"fsdp2": {"reshard": bool, "mesh": [replicate, shard]}}`` for FSDP2's ``fully_shard`` (its copies into
        and out of the flat buffers, its hooks, and an optimizer over DTensors). None: a plain model."""
        return None

    # ---- in the worker: the template ----
    @classmethod
    def optimizer_elements(cls, cfg, o: Options, parts: dict) -> int | None:
        """Parameter elements one rank's optimizer updates, from its predicted state (``memory()``'s parts): AdamW's
        two moments, 8 bytes per element in fp32 (12 with the fp32 master copy of 16-bit training), offloaded
        state included."""
        per = 8 if cfg.train.precision == "fp32" else 12
        return int((parts.get("optimizer", 0) + parts.get("offloaded", 0)) // per) or None

    @classmethod
    def overlap(cls, cfg, o: Options) -> dict[str, str]:
        """The communication this backend runs under compute, for the projection: kind -> the compute it can
        hide under ("backward", or "forward+backward" for a prefetch). {}: it waits for all of it."""
        return {}

    @classmethod
    def wait_gaps(cls, cfg, o: Options, layout: Layout) -> dict[str, list[tuple[float, float]]]:
        """Per kind, where its waits sit in a micro-batch, for the projection: [(waits, the share of a micro-batch's
        compute before each)]; a wait after more compute waits longer for its peer, less than in proportion
        (``projection.comm_seconds``). The kind's other waits split the rest evenly. {}: all split it evenly."""
        return {}

    @classmethod
    def bursts(cls, cfg, o: Options, layout: Layout) -> dict[str, float]:
        """Per kind, the share of its calls that follow compute, for the projection; the others follow another
        call of the same burst at once, and cost their back-to-back time (``projection.waits``). {}: every call
        follows compute."""
        return {}

    def setup(self, ctx: Context, build: ModelBuilder) -> None:
        self.ctx = ctx
        self.precision = Precision(ctx.precision, ctx.device, self.scaler_class)
        self.module = self.build_model(build)
        self.model = self.wrap(self.module)
        self.optimizer = self.make_optimizer(self.module)
        self.model, self.optimizer = self.wrap_with_optimizer(self.model, self.optimizer)

    def build_model(self, build: ModelBuilder) -> nn.Module:
        return build(device=self.ctx.device)

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def param_groups(self, module: nn.Module) -> list[dict]:
        return param_groups(module, self.ctx.optim.weight_decay)

    def make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(self.ctx.optim, self.param_groups(module))

    def wrap_with_optimizer(self, model: nn.Module, optimizer) -> tuple[nn.Module, Any]:
        """For backends that wrap model and optimizer together (DeepSpeed's engine, ShardedDDP + OSS)."""
        return model, optimizer

    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state this rank holds (a sharding wrapper's inner one)."""
        return self.optimizer

    def data_ranks(self) -> list[int]:
        """The sampler ranks whose micro-batches this process consumes."""
        return self.ctx.layout.data_ranks_of(self.dp_rank)

    @property
    def coords(self) -> dict[str, int]:
        """This rank's place on the layout's mesh, {pp, dp, tp} (config/layout.py: the one rank map)."""
        return self.ctx.layout.coords(self.ctx.rank)

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    def autocast(self):
        return self.precision.autocast() if self.autocast_forward else contextlib.nullcontext()

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, y)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        return self.loss_fn(logits, y)

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def no_sync(self):
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self, max_norm: float) -> None:
        """Clip to the global gradient norm (gradients already unscaled)."""
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def optimizer_step(self, grad_clip: float) -> None:
        with marker(OPTIMIZER):
            if grad_clip:
                self.precision.unscale(self.optimizer)
                self.clip(grad_clip)
            self.precision.step(self.optimizer)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns their mean loss (this rank's view)."""
        self.zero_grad()
        total = torch.zeros((), device=self.ctx.device)
        n = len(micro_batches)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
            with self.no_sync() if i < n - 1 else contextlib.nullcontext():
                loss = self.forward_loss(x, y)
                self.backward(loss / n)
            total += loss.detach().float()
        self.optimizer_step(grad_clip)
        return total / n

    def global_loss(self, local: torch.Tensor) -> float:
        """The global batch's loss from each rank's mean: the mean over ranks (tensor-parallel peers hold
        the same value, so the world mean is the data-parallel mean). Pipelines override it."""
        if self.ctx.layout.processes > 1 and dist.is_initialized():
            local = local.detach().clone()
            dist.all_reduce(local)
            local /= dist.get_world_size()
        return float(local)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ---- measurement, on untimed steps ----
    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """This rank's parameters, gradients and optimizer state, for ``model_state_bytes``."""
        params = list(self.module.parameters())
        state = self.inner_optimizer().state
        optim = [v for s in state.values() for v in s.values() if torch.is_tensor(v)]
        return {"params": params, "grads": [p.grad for p in params], "optimizer": optim}

    def probe_comm(self) -> dict[str, tuple[int, int]]:
        """{kind: (calls, bytes)} moved on the probe step by C++ paths the Python counter cannot see."""
        return {}

    # ---- checkpoints ----
    # The portable form (the default, ``checkpoint.format=portable``): every strategy can write it and
    # every strategy can resume from any strategy's. The loop (checkpoint/format.py) writes the files, the step,
    # schedule, RNG and data position; a strategy only turns its state into names and back.
    #
    # Names are the single-process GPT's: ``GPT.named_parameters()`` of an unwrapped model, so a tied
    # output projection appears once, as ``embed.tok.weight``. Values are the full, unsharded fp32
    # tensors on the CPU (the fp32 master copy where the backend keeps one). Optimizer state is AdamW's,
    # per parameter name: ``{"exp_avg": full fp32 tensor, "exp_avg_sq": ..., "step": 0-dim fp32 tensor}``;
    # a parameter the optimizer has not stepped yet has no entry. Hyperparameters (lr, betas, weight
    # decay) are not state: they come from ``optim.*`` and the schedule of the run that resumes.
    # Moments and step counts must round-trip exactly: a resume continues the trajectory to the parity
    # tolerance (1e-5 relative in fp32). Shared helpers: ``strategies/shared/by_name.py`` (``state_by_name`` / ``load_by_name``
    # for a torch optimizer over whole parameters, ``check_names``); tensor-parallel cutting by name:
    # ``shared/tensor_parallel.py`` (``split_of`` / ``tp_slice`` / ``tp_unslice``); pipelines: ``fairscale/pipe.py``'s ``portable_params``.
    # ``tests/test_checkpoint_matrix.py`` checks every strategy against every other: add yours to its lists.

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]] | None:
        """(model, optimizer state) by single-process name, full fp32 on the CPU, on rank 0; None on others.

        COLLECTIVE: every rank calls it (sharded backends gather). The default serves strategies whose
        ranks hold the whole model and a torch optimizer over it (single, ddp); a backend that shards
        (parameters, optimizer partitions, pipeline stages, tensor slices) overrides it and gathers.
        """
        model, optim = state_by_name(self.portable_params(), self.inner_optimizer())
        return (model, optim) if self.ctx.rank == 0 else None

    def import_state(self, model: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load the portable state: every rank receives the full dicts and takes its own part (its shards,
        its optimizer partition, its stage's layers, its tensor-parallel slice). COLLECTIVE where the
        backend needs it. Afterwards the next ``train_step`` must compute what the exporting run's would
        have. A name missing from ``model`` is an error (the config's model differs); ``optim`` may be
        empty (weights only: AdamW starts again from zero moments)."""
        load_by_name(self.portable_params(), self.inner_optimizer(), model, optim)

    def portable_params(self) -> list[tuple[str, nn.Parameter]]:
        """(single-process name, parameter) of what this rank holds whole; tied parameters once."""
        return list(self.module.named_parameters())

    # The native form (``checkpoint.format=native``): the backend's own files, written by each rank in
    # parallel with no gather to rank 0 (the one that fits for models whose full state does not fit on
    # one rank). Only the same strategy and layout resume from it; ``python -m parallelkit.export``
    # turns it into the portable form.
    def save(self, path: Path) -> None:
        """Default: rank 0 writes the whole model and optimizer as one file."""
        if self.ctx.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, path / "state.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "state.pt", map_location=self.ctx.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def describe(self) -> dict[str, Any]:
        """Facts for the report: what is sharded, anything the reader should know."""
        return {"sharded": "nothing"}

    def teardown(self) -> None:
        pass

