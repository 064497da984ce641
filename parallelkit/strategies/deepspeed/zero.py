"""DeepSpeed ZeRO stages 0-3, offload to CPU or NVMe (ZeRO-Infinity), bf16/fp16.

DeepSpeed's engine owns accumulation, loss scaling, clipping and the step; the optimizer is
the run's torch AdamW (so every stage matches ddp), or DeepSpeedCPUAdam when the optimizer is
offloaded. The config comes from ``deepspeed/config.py``'s ``build_config`` and is saved as
``deepspeed_config.json`` beside the summary.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig
from parallelkit.strategies.base import Options, Strategy
from parallelkit.strategies.deepspeed import ckpt as deepspeed_ckpt
from parallelkit.strategies.deepspeed.config import (
    OFFLOAD,
    adopt_user_config,
    build_config,
    machine_memory,
    nvme_check,
    settings,
    sizes,
)
from parallelkit.strategies.shared.comm_model import (
    gpt,
    grad_word,
    leaf_modules,
    one_process,
    tensor_sizes,
    total,
    word,
)
from parallelkit.strategies.shared.memory_model import activations, zero_state_bytes
from parallelkit.strategies.shared.optim import (
    adamw_kwargs,
    build_optimizer,
    param_groups,
)
from parallelkit.util.markers import OPTIMIZER, marker
from parallelkit.util.tensors import storages, tensor_bytes

SHARDED = ("nothing (replicated; gradients all-reduced)", "optimizer state", "optimizer state, gradients",
           "optimizer state, gradients, parameters")


@dataclass
class DeepSpeedOptions(Options):
    zero_stage: int = 2  # 0: plain data parallel; 1: + optimizer state sharded; 2: + gradients; 3: + parameters
    offload_optimizer: str = "none"  # none | cpu | nvme (nvme: stage 3 only; needs libaio: bash scripts/setup.sh --nvme)
    offload_param: str = "none"  # none | cpu | nvme (stage 3 only)
    nvme_path: Optional[str] = None  # folder on a local SSD for NVMe offload (a per-run subfolder is made and removed)
    zero_init: Any = "auto"  # build ZeRO-3 models already partitioned (deepspeed.zero.Init): auto | true | false
    config_file: Optional[str] = None  # a DeepSpeed JSON merged over the generated config
    config: Any = None  # a dict merged last, e.g. 'strategy.config={zero_optimization: {overlap_comm: true}}'

    def validate(self) -> None:
        self.choice("zero_stage", (0, 1, 2, 3))
        self.offload_optimizer, self.offload_param = str(self.offload_optimizer).lower(), str(self.offload_param).lower()
        self.choice("offload_optimizer", OFFLOAD)
        self.choice("offload_param", OFFLOAD)
        self.choice("zero_init", ("auto", True, False))
        if self.config is not None and not isinstance(self.config, dict):
            raise ConfigError("strategy.config must be a mapping, e.g. 'strategy.config={zero_optimization: {overlap_comm: false}}'")


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


def zero3_comm(cfg, zero: dict, p: int) -> dict[str, float]:
    """ZeRO-3's all-gathers in one step, ``p`` bytes a parameter. Tensors of at most stage3_param_persistence_threshold
    elements (LayerNorms, biases) stay gathered; they are all-gathered once, after the step. The others are gathered
    when a module needs them and released after it unless DeepSpeed's trace shows their next use within
    stage3_max_reuse_distance elements (the parameters of the modules in between: ``zero3_gathered``); every
    micro-batch starts with them all released. So the ZeRO paper's 3Ψ only where the distance is short against the
    model. The generated distance (5 x the bucket cap: 1e8 elements on this machine, 6.25e8 on an 80 GB GPU) keeps
    tiny and small gathered from forward to backward (2Ψ in all); here gpt_125m gathers its non-persistent
    parameters 1.6 times per micro-batch and gpt_350m and larger 2.1 times (3Ψ in all, and the tied matrix again
    for the head and in backward). Measured to the byte on tiny (distance 0, 4e4, 1e8) and small (2e6; 8e6: the
    blocks and the position embedding gathered again, the tied matrix not), stage3_max_live_parameters set to the
    same value as the generated config does. Not modelled: DeepSpeed's prefetcher also keeps what it fetched ahead,
    within stage3_max_live_parameters, so a live budget near Ψ_np with a shorter distance gathers less (tiny with
    both at 0.6 and 0.9 Ψ: predicted +8% and +35%; distance 0 with live 1e8: -26%)."""
    c, m = gpt(cfg), cfg.train.grad_accum
    threshold = zero.get("stage3_param_persistence_threshold", 100_000)
    persistent = sum(n for n in tensor_sizes(c).values() if n <= threshold)
    distance = zero.get("stage3_max_reuse_distance", 1_000_000_000)
    return {"all_gather": p * (m * zero3_gathered(leaf_modules(c), threshold, distance) + persistent)}


def zero3_gathered(forward: list[list[tuple[str, int]]], threshold: int, distance: float) -> int:
    """Elements ZeRO-3 all-gathers in one forward and backward: ``forward`` modules as (name, elements) of their
    parameters; backward runs them in reverse. After each module, its parameters are released unless one of the
    modules DeepSpeed looks at next (until it has traversed ``distance`` elements) uses them again."""
    trace, held, gathered = forward + forward[::-1], set(), 0
    for k, module in enumerate(trace):
        for name, n in module:
            if n > threshold and name not in held:
                gathered += n
                held.add(name)
        soon, seen = set(), 0
        for later in trace[k + 1:]:
            if seen >= distance:
                break
            soon.update(name for name, _ in later)
            seen += sum(n for _, n in later)
        held -= {name for name, _ in module} - soon
    return gathered


class DeepSpeedStrategy(Strategy):
    Options = DeepSpeedOptions
    autocast_forward = False  # DeepSpeed casts the module itself for bf16/fp16

    @classmethod
    def prepare(cls, cfg, explicit: set[str]) -> list[str]:
        if cfg.strategy.get("config_file"):  # workers resolve it from the same place, whatever their working directory
            cfg.strategy.config_file = str(Path(cfg.strategy.config_file).expanduser().resolve())
        return adopt_user_config(cfg, explicit)  # what was adopted, overridden or ignored

    @classmethod
    def after_run(cls, cfg) -> None:
        sweep_nvme_of(cfg)  # a worker that failed ended by os._exit, past its atexit removal

    @classmethod
    def check(cls, cfg, o) -> None:
        ds, _ = build_config(cfg)
        nvme_check(cfg, ds)

    @classmethod
    def label(cls, cfg, o) -> str:
        stage, oo, op = settings(cfg)
        devs = {k: v for k, v in (("optimizer", oo), ("params", op)) if v != "none"}
        if not devs:
            return f"deepspeed zero{stage}"
        kinds = set(devs.values())
        where = "offload" if kinds == {"cpu"} else "nvme" if kinds == {"nvme"} else f"offload optimizer={oo} params={op}"
        only = f" ({next(iter(devs))} only)" if stage == 3 and len(devs) == 1 and len(kinds) == 1 else ""
        return f"deepspeed zero{stage} {where}{only}"

    @classmethod
    def memory(cls, cfg, o, layout, mem):
        c, t = GPTConfig.from_cfg(cfg.model), cfg.train
        zero, here = build_config(cfg)[0]["zero_optimization"], sizes(cfg)
        there = sizes(cfg, mem) if mem else here  # buffers as they would be sized on a device of ``mem`` bytes
        buckets = {"overlap_comm": bool(zero.get("overlap_comm", False))}
        for key, s in (("reduce_bucket_size", "bucket"), ("stage3_prefetch_bucket_size", "prefetch"),
                       ("stage3_max_live_parameters", "live")):
            v = zero.get(key, here[s])
            buckets[key] = there[s] if v == here[s] else v
        opts = {"zero_stage": zero.get("stage", o.zero_stage),
                "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
                "offload_param": zero.get("offload_param", {}).get("device", "none")}
        r = zero_state_bytes(opts, c.num_params(), layout.dp, t.precision, buckets, t.grad_accum)
        return {**r, "activations": activations(cfg)}

    @classmethod
    def optimizer_elements(cls, cfg, o, parts):
        """Stages 1-3 keep an fp32 master copy beside the moments, in fp32 training too: 12 bytes per element.
        Offloaded, an element's state is that, a host fp32 gradient (4 bytes) and, with offload_param, its
        parameter (``zero_state_bytes``)."""
        zero = build_config(cfg)[0]["zero_optimization"]
        stage, fp32 = zero.get("stage", o.zero_stage), cfg.train.precision == "fp32"
        per = 12 if stage > 0 or not fp32 else 8
        off = 0
        if zero.get("offload_optimizer", {}).get("device", "none") != "none":
            params = zero.get("offload_param", {}).get("device", "none") != "none" and stage == 3
            off = parts.get("offloaded", 0) // (per + 4 + ((4 if fp32 else 2) if params else 0))
        return int(parts.get("optimizer", 0) // per + off) or None

    @classmethod
    def proxy_held(cls, cfg, o, layout):
        """An offloaded optimizer is DeepSpeed's own CPU Adam (``make_optimizer``): 4x torch's AdamW here."""
        ds = build_config(cfg)[0]
        offloaded = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
        return {"cpu_adam": True} if offloaded and "optimizer" not in ds else None

    @classmethod
    def overlap(cls, cfg, o):
        """Stage 3 prefetches parameters under forward and backward; with overlap_comm the gradient reduction runs
        on its own stream under backward; stage 0's reduction is at the boundary."""
        zero = build_config(cfg)[0]["zero_optimization"]
        stage, out = zero.get("stage", o.zero_stage), {}
        if stage == 3:
            out["all_gather"] = "forward+backward"
        if stage > 0 and zero.get("overlap_comm", False):
            out["reduce_scatter" if stage == 3 else "all_reduce"] = "backward"
        return out

    @classmethod
    def comm(cls, cfg, o, layout):
        """ZeRO as DeepSpeed 0.19 runs it, with the sizes of the generated config (deepspeed_config.json). Gradients
        and parameters move in the training precision (DeepSpeed casts the model itself, so bf16 keeps 16-bit
        gradients); m = train.grad_accum. Measured on tiny and small, 2 ranks, grad_accum 1 and 2 (comm_check.py):

        - stage 0: one all-reduce of every gradient at the accumulation boundary (Ψ).
        - stages 1 and 2: every gradient all-reduced, not reduce-scattered (DeepSpeed all-reduces each bucket and
          each rank keeps its partition); stage 1 once per step, stage 2 after every micro-batch (it partitions
          gradients as backward produces them: m·Ψ). The updated parameters all-gathered once after the step (Ψ).
        - stage 3 (``zero3_comm``): reduce-scatter after every micro-batch (m·Ψ); all-gathers in forward, in backward
          only for what does not stay gathered, and after the step.
        - all_reduce of the gradient norm, one scalar per parameter group (2: with and without weight decay): fp32,
          fp64 in stage 3 without optimizer offload; stage 0 one fp32 norm in fp32 (none seen in bf16).

        The steady state, from the third step on. ZeRO-3 records its parameter trace in the first two: a probe on
        step 2 (train.untimed_steps=2) also counts the trace check's broadcasts (a few hundred bytes of module ids),
        and one on step 1 the release of every parameter after its forward (gathered again in backward).
        """
        if one_process(layout):
            return {}
        zero = build_config(cfg)[0]["zero_optimization"]
        stage, prec, m, groups = zero.get("stage", o.zero_stage), cfg.train.precision, cfg.train.grad_accum, 2
        psi, g, p = gpt(cfg).num_params(), grad_word(prec, True), word(prec)
        if stage == 0:
            return {"all_reduce": g * psi + (4 if prec == "fp32" else 0)}
        if stage in (1, 2):
            return {"all_reduce": g * psi * (m if stage == 2 else 1) + 4 * groups, "all_gather": p * psi}
        offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        return total(zero3_comm(cfg, zero, p), {"reduce_scatter": g * psi * m, "all_reduce": (4 if offloaded else 8) * groups})

    # ---- setup hooks ----
    def build_model(self, build):
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        # DeepSpeed 0.19 calls the collectives torch 2.13 renamed (all_gather_into_tensor, ...): one warning per call
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
        ctx = self.ctx
        self.stage, self.offload_optimizer, self.offload_param = settings(ctx.cfg)
        self.ds_config, self.notes = build_config(ctx.cfg)
        self.nvme_dir = None
        zero = self.ds_config["zero_optimization"]
        if "nvme" in (self.offload_optimizer, self.offload_param):  # a folder of this run's own, removed at teardown
            # named after the run and its launching process (the local ranks' parent: the launcher, or torchrun's agent), so
            # concurrent runs never share one; removed at teardown, on a signal or at exit, and by a later run
            # once every rank that claimed it is dead (sweep_stale_nvme)
            run = f"{Path(ctx.run_dir or 'run').name}_{os.getppid()}"
            parent = zero.get("offload_param", zero.get("offload_optimizer"))["nvme_path"]
            self.nvme_dir = make_nvme_dir(Path(parent), run)
            for k in ("offload_optimizer", "offload_param"):
                if zero.get(k, {}).get("device") == "nvme":
                    zero[k]["nvme_path"] = str(self.nvme_dir)
        deepspeed.init_distributed(dist_init_required=False)  # wrap our process group now: zero.Init needs it
        self.zero_init = self._want_zero_init()
        if not self.zero_init:
            return build(device="cpu")
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            model = build(device=None, init=False)  # each parameter partitioned as it is created
        gathered, rank = deepspeed.zero.GatheredParameters, ctx.rank

        def assign(p, full):  # only one full parameter is ever gathered
            with gathered([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(full)

        model.init_weights(ctx.seed, assign)
        return model

    def _want_zero_init(self) -> bool:
        """Build ZeRO-3 models already partitioned when a full fp32 copy of the model would take more than a
        quarter of a rank's memory, e.g. gpt_1b on 24 GiB and 2 ranks (``strategy.zero_init``: auto | true | false)."""
        want = self.opts.zero_init
        if self.stage != 3 or want is False:
            return False
        return want is True or 4 * self.ctx.model.num_params() > machine_memory(self.ctx.cfg) / 4

    def param_groups(self, module):
        # under zero.Init parameters are empty until gathered: their full shape is ds_shape
        return param_groups(module, self.ctx.optim.weight_decay, shape_of=lambda p: getattr(p, "ds_shape", p.shape))

    def make_optimizer(self, module):
        self._groups = self.param_groups(module)
        if "optimizer" in self.ds_config:  # the user's DeepSpeed optimizer section: DeepSpeed builds it
            self.optimizer_name = f"{self.ds_config['optimizer'].get('type')} (from the DeepSpeed config)"
            return None
        if self.offload_optimizer != "none":  # DeepSpeed steps offloaded state with its own CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer_name = "DeepSpeedCPUAdam (AdamW mode)"
            return DeepSpeedCPUAdam(self._groups, adamw_mode=True, **adamw_kwargs(self.ctx.optim))
        self.optimizer_name = "torch.optim.AdamW"  # the same optimizer as every other strategy, so the stages match ddp
        return build_optimizer(self.ctx.optim, self._groups)

    def wrap_with_optimizer(self, model, optimizer):
        import deepspeed

        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=self._groups if optimizer is None else None,
            config=self.ds_config, dist_init_required=False)
        self._grads, self._grad_bytes, self.host_bytes = None, 0, 0
        if self.ctx.rank == 0 and self.ctx.run_dir is not None:
            Path(self.ctx.run_dir, "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")
        return self.engine, optimizer

    # ---- the step: DeepSpeed accumulates (gradient_accumulation_steps), scales, clips and steps ----
    def train_step(self, micro_batches, grad_clip: float) -> torch.Tensor:
        if self.measuring:  # the previous snapshot, released before new gradients exist
            self._grads, self._grad_bytes = None, 0
        total = torch.zeros((), device=self.ctx.device)
        for x, y in micro_batches:
            loss = self.forward_loss(x.to(self.ctx.device), y.to(self.ctx.device))
            self.engine.backward(loss)
            if self.measuring:  # gradients at their high point (only on the untimed probe step)
                grads = storages(self.held()["grads"])  # numbers only: the tensors are not kept alive
                if (b := tensor_bytes(grads)) > self._grad_bytes:
                    self._grads, self._grad_bytes = grads, b
            with marker(OPTIMIZER):  # a step only at the accumulation boundary (DeepSpeed counts micro-steps)
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
        """Parameters and optimizer state as held after the last step; gradients at their high point in the
        probe step (after the micro-batch backward that left the most gradient bytes alive, before the
        optimizer step frees them). Stage 1 keeps full gradients while it accumulates and only partitions
        them at the accumulation boundary, so with grad_accum=1 stages 1 and 2 hold the same bytes."""
        held = self.held()
        if self._grads is not None:
            held["grads"] = self._grads
        dev = self.ctx.device.type  # on a GPU, state offloaded to host memory is reported apart (describe)
        self.host_bytes = tensor_bytes(t for v in held.values() for t in v if t.device.type != dev)
        return {k: [t for t in v if t.device.type == dev] for k, v in held.items()}

    # ---- checkpoints: portable through DeepSpeed's consolidation API (deepspeed_ckpt.py); native: its own ----
    def export_state(self):
        return deepspeed_ckpt.export_state(self.engine, self.ctx.rank)

    def import_state(self, model, optim) -> None:
        deepspeed_ckpt.import_state(self.engine, model, optim, self.ctx.rank, self.ctx.device)

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed")

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="deepspeed")

    def describe(self) -> dict:
        zero = self.ds_config["zero_optimization"]
        return {"sharded": SHARDED[self.stage], "zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_param": self.offload_param, "optimizer": self.optimizer_name, "zero_init": self.zero_init,
                "reduce_bucket_size": zero.get("reduce_bucket_size"), "deepspeed_config": "deepspeed_config.json",
                "state_measured": "params and optimizer after the last step, gradients at their high point in the "
                                  "probe step; state swapped to NVMe is not counted", "notes": self.notes,
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
        _NVME_DIRS.discard(self.nvme_dir)


# ---- NVMe swap folders: ZeRO-Infinity writes tens of GB there; none may outlive its run ----
NVME_OWNERS = ".parallelkit_owners"  # in a run's NVMe folder: "host pid" of each process that uses it, a line each
_NVME_DIRS: set[Path] = set()  # this process's folders, removed on the way out whatever ends it
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_previous: dict[int, Any] = {}  # the handlers _on_signal replaced, called after it
_armed: list[bool] = [False]  # _remove_on_exit done in this process


def make_nvme_dir(parent: Path, run: str) -> Path:
    """``parent/parallelkit_<run>``, claimed by this process and removed when it ends (teardown, exit, SIGTERM,
    SIGINT, SIGHUP); stale siblings left by dead runs (killed, crashed) are removed first."""
    folder = Path(parent) / f"parallelkit_{run}"
    sweep_stale_nvme(folder.parent, keep=folder)
    folder.mkdir(parents=True, exist_ok=True)
    claim_nvme_dir(folder)
    if not _armed[0]:
        _armed[0] = True
        _remove_on_exit()
    _NVME_DIRS.add(folder)
    return folder


def claim_nvme_dir(folder: Path, pid: int | None = None) -> None:
    """Add a process (this one by default) to the owners of an NVMe folder: it is stale once they are all dead."""
    with open(Path(folder) / NVME_OWNERS, "a") as f:
        f.write(f"{socket.gethostname()} {pid or os.getpid()}\n")


def sweep_stale_nvme(parent: Path, keep: Path | None = None) -> list[Path]:
    """Remove the ``parallelkit_*`` folders under ``parent`` whose owners (NVME_OWNERS) are all dead processes of
    this host; a folder without owners, or with an owner on another host, is left alone. Returns those removed."""
    removed = []
    for folder in sorted(Path(parent).glob("parallelkit_*")) if Path(parent).is_dir() else []:
        if folder != keep and folder.is_dir() and not folder.is_symlink() and _stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _stale(folder: Path) -> bool:
    try:
        owners = [line.split() for line in (folder / NVME_OWNERS).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return False
    host = socket.gethostname()
    return bool(owners) and all(len(o) == 2 and o[0] == host and o[1].isdigit() and not _alive(int(o[1]))
                                for o in owners)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie has ended; only its parent has not reaped it yet
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def sweep_nvme_of(cfg) -> list[Path]:
    """The stale NVMe folders under a DeepSpeed run's nvme_path, removed: for the launcher once the run's workers
    have ended (a worker that fails ends by os._exit, past atexit)."""
    zero = build_config(cfg)[0]["zero_optimization"]
    parents = {z["nvme_path"] for z in (zero.get("offload_param"), zero.get("offload_optimizer"))
               if isinstance(z, dict) and z.get("device") == "nvme" and z.get("nvme_path")}
    return [f for parent in sorted(parents) for f in sweep_stale_nvme(Path(parent))]


def _remove_nvme_dirs() -> None:
    for folder in list(_NVME_DIRS):
        shutil.rmtree(folder, ignore_errors=True)


def _remove_on_exit() -> None:
    """Remove this process's NVMe folders at exit and on SIGTERM, SIGINT or SIGHUP, after which the signal does what
    it did before (ends the process, or calls the handler that was there). A main thread blocked in a collective
    runs no Python handler until the collective returns, so the signal also wakes a thread that removes them (and
    ends the process where the signal would have). SIGKILL and os._exit skip all this: the next run's
    make_nvme_dir, or sweep_nvme_of, removes what is left."""
    atexit.register(_remove_nvme_dirs)
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _STOP_SIGNALS:
        prev = signal.getsignal(s)
        if prev is not None and prev != signal.SIG_IGN:  # None: a handler not set from Python; leave it
            _previous[s] = prev
            signal.signal(s, _on_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    if (theirs := signal.set_wakeup_fd(w, warn_on_full_buffer=False)) != -1:  # someone else's: theirs stays
        signal.set_wakeup_fd(theirs)
        os.close(r)
        os.close(w)
        return

    def watch() -> None:
        while data := os.read(r, 64):
            for signum in set(data) & set(_previous):
                _remove_nvme_dirs()
                if _previous[signum] == signal.SIG_DFL:
                    _die_by(signum)

    threading.Thread(target=watch, name="parallelkit-nvme-cleanup", daemon=True).start()


def _on_signal(signum, frame) -> None:
    _remove_nvme_dirs()
    prev = _previous.get(signum, signal.SIG_DFL)
    if callable(prev):
        return prev(signum, frame)
    _die_by(signum)


def _die_by(signum: int) -> None:
    """End the process by ``signum`` as its default action does (from any thread: Python sets handlers only from
    the main one, so the default is put back through libc there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_DFL)
    else:
        import ctypes

        try:
            ctypes.CDLL(None).signal(ctypes.c_int(signum), ctypes.c_void_p(0))  # SIG_DFL
        except (OSError, AttributeError):  # no libc signal(): the main thread's handler ends it when it can
            return
    os.kill(os.getpid(), signum)
