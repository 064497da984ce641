"""DeepSpeed ZeRO stages 0-3, offload to CPU or NVMe (ZeRO-Infinity), bf16/fp16.

DeepSpeed's engine owns accumulation, loss scaling, clipping and the step; the optimizer is
the run's torch AdamW (so every stage matches ddp), or DeepSpeedCPUAdam when the optimizer is
offloaded. The config comes from ``deepspeed_config.build_config`` and is saved as
``deepspeed_config.json`` beside the summary.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..metrics import tensor_bytes
from ..model import GPTConfig
from .base import Strategy
from .deepspeed_config import build_config, machine_memory, nvme_check, option, settings

SHARDED = ("nothing (replicated; gradients all-reduced)", "optimizer state", "optimizer state, gradients",
           "optimizer state, gradients, parameters")


def _walk(obj, name: str, depth: int = 3):
    """(attribute name, tensor) pairs inside lists, tuples and dicts (values) up to ``depth`` levels."""
    if torch.is_tensor(obj):
        if obj.device.type != "meta" and obj.numel():
            yield name, obj
    elif depth and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, name, depth - 1)
    elif depth and isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, name, depth - 1)


class DeepSpeedStrategy(Strategy):
    @classmethod
    def check(cls, cfg) -> None:
        path = option(cfg, "config_file")
        if path:  # workers resolve it from the same place, whatever their working directory
            cfg.strategy.config_file = str(Path(path).expanduser().resolve())
        ds, _ = build_config(cfg)
        nvme_check(cfg, ds)

    @classmethod
    def label(cls, cfg) -> str:
        stage, oo, op = settings(cfg)
        devs = {k: v for k, v in (("optimizer", oo), ("params", op)) if v != "none"}
        if not devs:
            return f"deepspeed zero{stage}"
        kinds = set(devs.values())
        where = "offload" if kinds == {"cpu"} else "nvme" if kinds == {"nvme"} else f"offload optimizer={oo} params={op}"
        only = f" ({next(iter(devs))} only)" if stage == 3 and len(devs) == 1 and len(kinds) == 1 else ""
        return f"deepspeed zero{stage} {where}{only}"

    def setup(self, ctx, model_factory, optimizer_factory) -> None:
        import logging

        import deepspeed

        from ..train import optimizer_kwargs, param_groups

        deepspeed.utils.logger.setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls the collectives torch 2.13 renamed (all_gather_into_tensor, ...): one warning per call
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
        self.ctx, cfg = ctx, ctx.cfg
        self.stage, self.offload_optimizer, self.offload_param = settings(cfg)
        self.ds_config, self.notes = build_config(cfg)
        self.nvme_dir = None
        zero = self.ds_config["zero_optimization"]
        if "nvme" in (self.offload_optimizer, self.offload_param):  # a folder of this run's own, removed at teardown
            run = Path(ctx.extra.get("run_dir", "run")).name
            self.nvme_dir = Path(zero.get("offload_param", zero.get("offload_optimizer"))["nvme_path"]) / f"parallelkit_{run}"
            for k in ("offload_optimizer", "offload_param"):
                if zero.get(k, {}).get("device") == "nvme":
                    zero[k]["nvme_path"] = str(self.nvme_dir)
        deepspeed.init_distributed(dist_init_required=False)  # wrap our process group now: zero.Init needs it
        self.zero_init = self._want_zero_init(cfg)
        if self.zero_init:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = model_factory()
            _replay_gpt_init(model, cfg.seed, deepspeed)
        else:
            model = model_factory()
        groups = _groups(model, cfg.optim.weight_decay) if self.zero_init else param_groups(model, cfg.optim.weight_decay)
        if "optimizer" in self.ds_config:  # the user's DeepSpeed optimizer section: DeepSpeed builds it
            optimizer, self.optimizer_name = None, f"{self.ds_config['optimizer'].get('type')} (from the DeepSpeed config)"
        elif self.offload_optimizer != "none":  # DeepSpeed steps offloaded state with its own CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **optimizer_kwargs(cfg.optim))
            self.optimizer_name = "DeepSpeedCPUAdam (AdamW mode)"
        else:  # the same torch AdamW as every other strategy, so the stages match ddp
            optimizer, self.optimizer_name = optimizer_factory(groups), "torch.optim.AdamW"
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            config=self.ds_config, dist_init_required=False)
        self.model, self._grads, self._grad_bytes, self.host_bytes = self.engine, None, 0, 0
        if ctx.rank == 0 and "run_dir" in ctx.extra:
            Path(ctx.extra["run_dir"], "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")

    def _want_zero_init(self, cfg) -> bool:
        """Build ZeRO-3 models already partitioned when a full fp32 copy of the model would take more than a
        quarter of a rank's memory, e.g. gpt_1b on 24 GiB and 2 ranks (``strategy.zero_init``: auto | true | false)."""
        want = option(cfg, "zero_init", "auto")
        if self.stage != 3 or want is False:
            return False
        if want is True:
            return True
        return 4 * GPTConfig.from_cfg(cfg.model).num_params() > machine_memory(cfg) / 4  # one fp32 copy per rank

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the module itself for bf16/fp16

    def train_step(self, micro_batches, grad_clip: float) -> torch.Tensor:
        """DeepSpeed accumulates (gradient_accumulation_steps), scales, clips and steps at the boundary."""
        self._grads, self._grad_bytes = None, 0  # the previous step's snapshot, released before new gradients exist
        total = torch.zeros((), device=self.ctx.device)
        for x, y in micro_batches:
            loss = self.forward_loss(x.to(self.ctx.device), y.to(self.ctx.device))
            self.engine.backward(loss)
            grads = self.held()["grads"]
            if (b := tensor_bytes(grads)) > self._grad_bytes:
                self._grads, self._grad_bytes = grads, b
            self.engine.step()
            total += loss.detach().float()
        return total / len(micro_batches)

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:  # the optimizer DeepSpeed steps (ZeRO wraps the torch one)
            g["lr"] = lr

    def held(self) -> dict[str, list[torch.Tensor]]:
        """Tensors DeepSpeed holds on this rank now: module params (ZeRO-3: partitions), gradients, and the
        ZeRO optimizer's flat buffers, classified by attribute name (fp32 master copies count as optimizer
        state, as in the ZeRO paper's K=12), plus the inner optimizer's moments."""
        out: dict[str, list[torch.Tensor]] = {"params": [], "grads": [], "optimizer": []}
        for p in self.engine.module.parameters():
            out["params"] += [t for t in (p, getattr(p, "ds_tensor", None)) if t is not None and t.numel()]
            if p.grad is not None:
                out["grads"].append(p.grad)
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", None)
        if inner is None:  # stage 0, fp32: the torch optimizer steps the module's parameters directly
            inner = opt
        else:
            for key, value in vars(opt).items():
                if key == "optimizer":
                    continue
                for _, t in _walk(value, key):
                    kind = "grads" if "grad" in key else "optimizer" if "fp32" in key or "master" in key else "params"
                    out[kind].append(t)
                    if t.grad is not None:
                        out["grads"].append(t.grad)
        out["optimizer"] += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel()]
        return out

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Parameters and optimizer state as held after the last step; gradients at their high point in
        it (after the micro-batch backward that left the most gradient bytes alive, before the optimizer
        step frees them). Stage 1 keeps full gradients while it accumulates and only partitions them at the
        accumulation boundary, so with grad_accum=1 stages 1 and 2 hold the same bytes."""
        held = self.held()
        if self._grads is not None:
            held["grads"] = self._grads
        dev = self.ctx.device.type  # on a GPU, state offloaded to host memory is reported apart (describe)
        self.host_bytes = tensor_bytes(t for v in held.values() for t in v if t.device.type != dev)
        return {k: [t for t in v if t.device.type == dev] for k, v in held.items()}

    def save(self, path: Path, step: int) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", client_state={"step": step})

    def load(self, path: Path) -> int:
        if not (Path(path) / "deepspeed").is_dir():
            raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint (a 'deepspeed' folder written by checkpoint.dir "
                                    "under strategy=deepspeed)")
        _, client = self.engine.load_checkpoint(str(path), tag="deepspeed")
        return int(client["step"])

    def model_for_export(self):
        return self.engine.module

    def describe(self) -> dict:
        zero = self.ds_config["zero_optimization"]
        return {"sharded": SHARDED[self.stage], "zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_param": self.offload_param, "optimizer": self.optimizer_name, "zero_init": self.zero_init,
                "reduce_bucket_size": zero.get("reduce_bucket_size"), "deepspeed_config": "deepspeed_config.json",
                "state_measured": "params and optimizer after the last step, gradients at their high point in it; "
                                  "state swapped to NVMe is not counted", "notes": self.notes,
                "offloaded_to_host_bytes": self.host_bytes}

    def teardown(self) -> None:
        self.engine.destroy()
        # DeepSpeed keeps the process groups alive past destroy_process_group, so gloo's worker threads live
        # until interpreter shutdown. A finished collective's tensors are released on such a thread, which
        # needs the GIL; when the loop's last all_gather is released during shutdown the process aborts
        # ("terminate called without an active exception", SIGABRT, about 1 run in 10 here). Sleeping
        # hands the GIL to that thread first.
        time.sleep(0.2)
        if self.nvme_dir is not None and self.ctx.local_rank == 0:
            shutil.rmtree(self.nvme_dir, ignore_errors=True)


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """train.param_groups for a model built under zero.Init, whose parameters are empty until gathered."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 and "pos" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fresh(m: nn.Module, draw: bool) -> nn.Module:
    """A new fp32 module shaped like ``m``: built normally (drawing its default init from the generator, as
    build_model's constructor did) or with ``skip_init`` (drawing nothing)."""
    if isinstance(m, nn.Linear):
        args, kw = (m.in_features, m.out_features), {"bias": m.bias is not None}
    else:
        args, kw = (m.num_embeddings, m.embedding_dim), {}
    return type(m)(*args, **kw) if draw else torch.nn.utils.skip_init(type(m), *args, **kw)


def _replay_gpt_init(model: nn.Module, seed: int, deepspeed) -> None:
    """Give a model built under zero.Init exactly build_model's weights, one module at a time.

    zero.Init partitions each submodule as soon as it is built, so GPT.__init__'s own initialisation
    (GPT._init on every module, then depth-scaled residual projections) ran on empty tensors. Replay
    build_model's random stream in fp32: the constructors' default inits (drawn and dropped), then
    GPT._init and the projections, copying each result into the gathered parameters. Only one
    module is ever whole; the tests check parity with ddp, so a change to model.py shows there.
    """
    gathered = deepspeed.zero.GatheredParameters
    leaves = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    torch.manual_seed(seed)
    for m in leaves:  # construction order = registration order in GPT
        _fresh(m, draw=True)

    def init(m):  # GPT.__init__: self.apply(self._init)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            tmp = _fresh(m, draw=False)
            model._init(tmp)
            with gathered(list(m.parameters(recurse=False)), modifier_rank=0):
                for name, p in m.named_parameters(recurse=False):
                    p.data.copy_(getattr(tmp, name))

    model.apply(init)
    std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            with gathered([p], modifier_rank=0):
                p.data.copy_(torch.nn.init.normal_(torch.empty(p.shape), 0.0, std))
