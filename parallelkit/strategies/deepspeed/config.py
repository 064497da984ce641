"""The DeepSpeed config of a run: generated from the run's settings, sized for the model and the
machine, with the user's DeepSpeed JSON (``strategy.config_file``) and dict (``strategy.config``)
merged over it.

DeepSpeed's defaults (5e8-element buckets, 1e9 sub-groups and live parameters) allocate
gigabytes per rank whatever the model's size, so every buffer is scaled here, and rounded to meet
DeepSpeed's alignment asserts (see ALIGN). The user's DeepSpeed config is the source of truth for
what the command line does not say: adopt_user_config (called while the plan is built, ``Strategy.prepare``) takes its stage,
offloads, batch sizes, precision and clipping into the run; what both still set must then agree
(or be ``"auto"``): a conflict is a ConfigError naming both values, raised before any worker starts.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig

OFFLOAD = ("none", "cpu", "nvme")


def option(cfg, key: str, default=None):
    """strategy.<key> as a plain Python value."""
    v = cfg.strategy.get(key, default)
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v


def settings(cfg) -> tuple[int, str, str]:
    """(zero_stage, offload_optimizer, offload_param), checked."""
    stage = option(cfg, "zero_stage", 2)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={stage!r}: choose 0, 1, 2 or 3")
    oo, op = (str(option(cfg, k) or "none").lower() for k in ("offload_optimizer", "offload_param"))
    for key, v in (("offload_optimizer", oo), ("offload_param", op)):
        if v not in OFFLOAD:
            raise ConfigError(f"strategy.{key}={v!r}: choose none, cpu or nvme")
    if op != "none" and stage != 3:
        raise ConfigError(f"strategy.offload_param={op} needs strategy.zero_stage=3 (got {stage}): only ZeRO-3 partitions parameters")
    if oo != "none" and stage == 0:
        raise ConfigError(f"strategy.offload_optimizer={oo} needs strategy.zero_stage >= 1 (got 0)")
    if oo == "nvme" and stage != 3:
        raise ConfigError(f"strategy.offload_optimizer=nvme needs strategy.zero_stage=3 (got {stage}); use offload_optimizer=cpu")
    return stage, oo, op


def machine_memory(cfg) -> int:
    """Bytes one rank may use: host RAM shared by the local ranks, and the GPU's memory on CUDA."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size or 1))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)
    if torch.cuda.is_available():
        mem = min(mem, torch.cuda.get_device_properties(0).total_memory)
    return mem


# What DeepSpeed 0.19 requires of the sizes generated here (read from its source):
# - zero_optimization.allgather_bucket_size: a multiple of nccl_start_alignment_factor = 2, asserted when the
#   stage 1/2 optimizer is built, in the workers (runtime/zero/stage_1_and_2.py); params // 10 is odd for
#   some shapes (small at seq_len 256, tiny at 128).
# - reduce_bucket_size > 0; every other size an integer >= 0 (pydantic fields in runtime/zero/config.py and
#   offload_config.py).
# - offload_param.buffer_size (NVMe): a buffer holds one parameter's partition (partitioned_param_swapper.py)
#   and, with the optimizer on NVMe too, the largest optimizer sub-group's partition (swap_tensor/
#   optimizer_utils.py asserts "numel of fp16 buffers ... is too small"). A sub-group collects parameter
#   partitions until it reaches sub_group_size, so it can exceed it by one partition.
# - Swapped tensors are padded by DeepSpeed to its AIO alignment (1 KiB): nothing to do here.
# Every buffer size is rounded up to ALIGN elements, a multiple of all of these alignments (and of 2 x dp
# for any power-of-two dp up to 256), so no model shape or seq_len can produce an odd size.
ALIGN = 512


def aligned(n: float, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to`` (at least ``to``)."""
    return max(to, math.ceil(n / to) * to)


def sizes(cfg, mem: int | None = None) -> dict[str, int]:
    """Buffer sizes (elements) scaled to the model and capped by the machine, each a multiple of ALIGN.

    Buckets are a tenth of the model (few collectives per step), at least d_model^2 (Hugging
    Face's "auto") and at most 1/160 of a rank's memory in fp32; live parameters, reuse
    distance and the CPU parameter cache get 5 such caps, optimizer sub-groups 2.5. On this
    2-core, 24 GiB box with 2 ranks that gives 2e7 / 1e8 / 5e7: the values that let gpt_1b
    train under ZeRO-3 NVMe offload where DeepSpeed's defaults (5e8 / 1e9 / 1e9) are killed.
    """
    c = GPTConfig.from_cfg(cfg.model)
    d, n, dp = c.d_model, c.num_params(), max(1, int(cfg.world_size or 1))
    cap = max(d * d, (mem or machine_memory(cfg)) // 640)
    bucket = aligned(min(5e8, cap, max(d * d, n // 10)))
    live, sub_group = aligned(min(1e9, 5 * cap)), aligned(min(1e9, 2.5 * cap))
    largest = max(c.vocab_size * d, c.seq_len * d, 4 * d * d, getattr(c, "d_ff", 0) * d)  # the largest tensor
    # the largest sub-group's partition on one rank: sub_group plus one parameter's partition, at most all of
    # this rank's partitions (each parameter is padded to a multiple of dp: + one element per tensor)
    group = min(sub_group + math.ceil(largest / dp), math.ceil(n / dp) + 12 * c.n_layer + 8)
    return {"bucket": bucket, "prefetch": aligned(0.9 * bucket), "persistence": 10 * d, "live": live,
            "sub_group": sub_group, "param_buffer": aligned(max(10**6, 1.07 * largest, group))}


def _user_config(cfg) -> tuple[dict, dict, str]:
    """(file config, strategy.config, origin label) as plain dicts."""
    path, extra, data = option(cfg, "config_file"), option(cfg, "config") or {}, {}
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"strategy.config_file={path!r} does not exist: give a DeepSpeed JSON file")
        try:
            data = json.loads(p.read_bytes().decode("utf-8-sig"))  # a BOM is allowed
        except UnicodeDecodeError as e:  # a binary file, or text in another encoding
            raise ConfigError(f"strategy.config_file={path!r} is not UTF-8 text ({e.reason} at byte {e.start}): "
                              f"give a DeepSpeed JSON file") from None
        except (OSError, ValueError, RecursionError) as e:  # unreadable, truncated, not JSON, nested too deep
            why = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(f"strategy.config_file={path!r} is not valid JSON ({why}): give a DeepSpeed JSON "
                              f"file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"strategy.config_file={path!r} holds a JSON {type(data).__name__}, not an object: a "
                              f"DeepSpeed config is a JSON object, e.g. {{\"zero_optimization\": {{\"stage\": 2}}}}")
    if not isinstance(extra, dict):
        raise ConfigError("strategy.config must be a mapping, e.g. 'strategy.config={zero_optimization: {overlap_comm: false}}'")
    return data, extra, f"strategy.config_file={path}" if path else "strategy.config"


def _merge(base: dict, over: dict) -> dict:
    """Deep merge; "auto" in ``over`` keeps ``base``'s value (drops the key when base has none)."""
    out = dict(base)
    for k, v in over.items():
        if v == "auto":
            continue
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(d: dict, keys: str):
    """The value at dotted ``keys``; None where absent or "auto"."""
    for k in keys.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return None if d == "auto" else d


def _put(d: dict, keys: str, value) -> None:
    *parents, last = keys.split(".")
    for k in parents:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[last] = value


def _agree(user: dict, keys: str, run_value, run_text: str, origin: str):
    """The user's value at ``keys`` (dotted) if it agrees with the run's, else a ConfigError naming both."""
    v = _get(user, keys)
    if v is None or v == run_value:
        return
    raise ConfigError(f"{origin} sets {keys}={v!r} but the run has {run_text}: make them agree (or write \"auto\" in the DeepSpeed config)")




class _Adoption:
    """adopt_user_config's state: the user's DeepSpeed config, what the command line gave, and what was done."""

    def __init__(self, cfg, explicit: set[str]):
        self.cfg, self.explicit = cfg, explicit
        self.file, self.extra, _ = _user_config(cfg)
        self.user = _merge(self.file, self.extra)
        path = option(cfg, "config_file")
        names = ([f"strategy.config_file {path}"] if path else []) + (["strategy.config"] if self.extra else [])
        self.origin = " + ".join(names)
        self.adopted: list[str] = []
        self.overridden: list[str] = []
        self.ignored: list[str] = []
        self.pins: dict = {}  # the command line's values where they win over the file, merged into strategy.config

    def src(self, ds_key: str) -> str:
        return "strategy.config" if _get(self.extra, ds_key) is not None else self.origin.split(" + ")[0]

    def run(self, key: str):
        v = OmegaConf.select(self.cfg, key)
        return OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v

    def take(self, run_key: str, ds_key: str, value, into: list[str] | None = None, pin: bool = True) -> None:
        """The user's ``ds_key`` (``value``) into ``run_key`` unless the command line gave run_key: then the command
        line wins over the file, and contradicting strategy.config (also given there) is an error."""
        if value is None:
            return
        run = self.run(run_key)
        if run_key in self.explicit:
            if value != run:
                if _get(self.extra, ds_key) is not None:
                    raise ConfigError(f"strategy.config sets {ds_key}={value!r} but the command line has {run_key}={run}: "
                                      "drop one of them")
                self.overridden.append(f"{ds_key}={value} by {run_key}={run}")
                if pin:
                    _put(self.pins, ds_key, run)
            return
        OmegaConf.update(self.cfg, run_key, value, force_add=True)
        (self.adopted if into is None else into).append(f"{run_key.split('.')[-1] if into is None else run_key}={value}")

    def zero(self) -> None:
        self.take("strategy.zero_stage", "zero_optimization.stage", _get(self.user, "zero_optimization.stage"))
        stage = option(self.cfg, "zero_stage")
        for key in ("offload_optimizer", "offload_param"):
            section = _get(self.user, f"zero_optimization.{key}")
            if not isinstance(section, dict):
                continue
            dev = str(section.get("device", "none")).lower()  # DeepSpeed's default device: none
            if dev == "auto":
                continue
            if key == "offload_param" and stage != 3 and dev != "none" and f"strategy.{key}" not in self.explicit:
                self.ignored.append(f"offload_param={dev} (stage {stage} does not partition parameters)")
                continue
            self.take(f"strategy.{key}", f"zero_optimization.{key}.device", dev)
            if option(self.cfg, key) == "nvme" and section.get("nvme_path"):
                self.take("strategy.nvme_path", f"zero_optimization.{key}.nvme_path", section["nvme_path"])

    def batch(self) -> None:
        """Micro-batch and accumulation; the global batch (train_batch_size) is kept as the file says, so a
        config written for 8 GPUs runs the same global batch on 2 with more accumulation."""
        from parallelkit.config.plan import planned_strategy

        t, x = self.cfg.train, self.explicit
        dp = planned_strategy(self.cfg)[2].dp
        mb, gas, tbs = (_get(self.user, k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                      "train_batch_size"))
        target, where = tbs, f"{self.src('train_batch_size')} train_batch_size"
        gbs = t.get("global_batch_size")
        if gbs is not None and ("train.global_batch_size" in x or tbs is None):
            if tbs is not None and tbs != gbs:
                self.overridden.append(f"train_batch_size={tbs} by train.global_batch_size={gbs}")
            target, where = gbs, "train.global_batch_size"
        elif gbs is not None:
            t.global_batch_size = tbs  # the file's global batch instead of the config's (validate derives grad_accum)
        if mb is None and target and gas and "train.micro_batch_size" not in x and target % (gas * dp) == 0:
            mb = target // (gas * dp)  # as DeepSpeed derives it
        self.take("train.micro_batch_size", "train_micro_batch_size_per_gpu", mb)
        micro = t.micro_batch_size
        if target is not None:
            if not isinstance(target, int) or target % (micro * dp):
                fits = [m for m in range(min(micro, int(target) // dp), 0, -1) if target % (m * dp) == 0]
                fix = f"train.micro_batch_size={fits[0]}" if fits else f"a world_size (dp) that divides {target}"
                raise ConfigError(f"{where}={target} is not a multiple of train.micro_batch_size x dp = {micro} x {dp} = "
                                  f"{micro * dp}: use {fix} or change {where.split()[-1]}")
            want = target // (micro * dp)
            if "train.grad_accum" in x and t.grad_accum != want and where.endswith(" train_batch_size"):
                raise ConfigError(f"{where}={target} disagrees with train.micro_batch_size x train.grad_accum x dp = "
                                  f"{micro} x {t.grad_accum} x {dp} = {micro * t.grad_accum * dp}: drop train.grad_accum="
                                  f"{t.grad_accum} (it follows from train_batch_size) or change train.micro_batch_size")
            if gas is not None and gas != want:
                self.overridden.append(f"gradient_accumulation_steps={gas} by train_batch_size / (micro x dp) = {want}")
            if "train.grad_accum" not in x or where == "train.global_batch_size":
                t.grad_accum = want
                self.adopted.append(f"grad_accum={want}")
        else:
            self.take("train.grad_accum", "gradient_accumulation_steps", gas)
        for key, value in (("train_batch_size", micro * t.grad_accum * dp), ("train_micro_batch_size_per_gpu", micro),
                           ("gradient_accumulation_steps", t.grad_accum)):
            if _get(self.user, key) not in (None, value):
                _put(self.pins, key, value)

    def precision(self) -> None:
        fp16, bf16 = _get(self.user, "fp16.enabled"), _get(self.user, "bf16.enabled")
        want = "fp16" if fp16 is True else "bf16" if bf16 is True else "fp32" if False in (fp16, bf16) else None
        if want is None:
            return
        t = self.cfg.train
        if "train.precision" in self.explicit:
            for kind in ("fp16", "bf16"):
                if _get(self.extra, f"{kind}.enabled") not in (None, t.precision == kind):
                    raise ConfigError(f"strategy.config sets {kind}.enabled={_get(self.extra, f'{kind}.enabled')} but the "
                                      f"command line has train.precision={t.precision}: drop one of them")
            if want != t.precision:
                self.overridden.append(f"{want} by train.precision={t.precision}")
        else:
            from parallelkit.config.env import cuda_available

            if want == "fp16" and not cuda_available():
                raise ConfigError(f"{self.src('fp16.enabled')} enables fp16, which needs a CUDA GPU (none here): "
                                  "add train.precision=bf16 (or train.precision=fp32) to train in that instead")
            t.precision = want
            self.adopted.append(f"precision={want}")
        for kind in ("fp16", "bf16"):
            if _get(self.user, f"{kind}.enabled") not in (None, t.precision == kind):
                _put(self.pins, f"{kind}.enabled", t.precision == kind)

    def optimizer(self) -> None:
        """AdamW's hyper-parameters, and the scheduler's warmup and peak lr, into the run's shared schedule (optim.*):
        every strategy steps the same schedule, so a DeepSpeed scheduler is translated, not run."""
        sched, got = _get(self.user, "scheduler"), []
        kind, p = (sched.get("type"), sched.get("params") or {}) if isinstance(sched, dict) else (None, {})
        # the peak lr: WarmupLR and WarmupDecayLR warm up to warmup_max_lr, WarmupCosineLR to the optimizer's lr
        peak = _get(p, "warmup_max_lr") if kind in ("WarmupLR", "WarmupDecayLR") else None
        if kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
            self.take("optim.warmup_steps", "scheduler.params.warmup_num_steps", _get(p, "warmup_num_steps"), got, pin=False)
            self.take("optim.lr", "scheduler.params.warmup_max_lr", peak, got, pin=False)
            if kind == "WarmupLR":  # constant after the warmup: a cosine to lr x 1.0
                self.take("optim.min_lr_ratio", "scheduler WarmupLR's constant lr: min_lr_ratio", 1.0, got, pin=False)
            elif kind == "WarmupCosineLR":
                self.take("optim.min_lr_ratio", "scheduler.params.cos_min_ratio", _get(p, "cos_min_ratio"), got, pin=False)
        if str(_get(self.user, "optimizer.type") or "adamw").lower() in ("adam", "adamw"):
            for k in ("lr", "betas", "eps", "weight_decay"):
                if k != "lr" or peak is None:
                    self.take(f"optim.{k}", f"optimizer.params.{k}", _get(self.user, f"optimizer.params.{k}"), pin=False)
        if kind:
            decay = {"WarmupDecayLR": "; its linear decay to 0 at total_num_steps: the run's cosine decay over train.steps",
                     "WarmupCosineLR": "; its cosine decay over total_num_steps: over train.steps"}.get(kind, "")
            mapped = kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
            self.ignored.append(f"scheduler {kind} (translated: {', '.join(got) or 'nothing the command line left'}{decay})"
                                if mapped else f"scheduler {kind} (the run's warmup + cosine schedule, optim.*, replaces it)")

    def notes(self) -> list[str]:
        groups = [f"{name} {', '.join(items)}" for name, items in
                  (("adopted", self.adopted), ("overridden", self.overridden), ("ignored", self.ignored)) if items]
        return [f"{self.origin}: {groups[0]}", *groups[1:]] if groups else []


def adopt_user_config(cfg, explicit: set[str]) -> list[str]:
    """Make the user's DeepSpeed config (strategy.config over strategy.config_file) the source of truth for what
    the command line does not say (``explicit``: see explicit_keys).

    Takes the ZeRO stage, offloads, micro-batch, accumulation (train_batch_size / (micro x dp)), precision,
    clipping, AdamW's hyper-parameters and the scheduler's warmup into ``cfg`` (strategy.*, train.*, optim.*),
    where the command line did not set them. A command-line value wins over the file's and is pinned into
    strategy.config, so the config handed to DeepSpeed (build_config) agrees with the run; a contradiction it
    cannot settle (a train_batch_size the micro-batch does not divide, fp16 on a CPU) is a ConfigError. Returns
    what it did as notes (the plan builder says them in one line).
    """
    if not (option(cfg, "config_file") or option(cfg, "config")):
        return []
    a = _Adoption(cfg, explicit)
    a.zero()
    a.batch()
    a.precision()
    a.take("train.grad_clip", "gradient_clipping", None if (g := _get(a.user, "gradient_clipping")) is None else float(g))
    a.optimizer()
    if a.pins:
        cfg.strategy.config = _merge(a.extra, a.pins)
    return a.notes()


def build_config(cfg, dp: int | None = None) -> tuple[dict, list[str]]:
    """The DeepSpeed config for this run and notes for the report. Pure: check() and setup() agree.
    ``dp``: the data-parallel size batch sizes count (pipelines: world / pp); default world_size.

    The user's config (strategy.config over strategy.config_file) must agree with the run on what both set;
    adopt_user_config has already made it so for a run started from the command line.
    """
    stage, oo, op = settings(cfg)
    t, dp = cfg.train, dp or cfg.world_size
    file_cfg, extra, origin = _user_config(cfg)
    user = copy.deepcopy(_merge(file_cfg, extra))
    notes = []
    zero_user = user.get("zero_optimization")
    if stage != 3 and isinstance(zero_user, dict) and _get(zero_user, "offload_param.device") not in (None, "none"):
        del zero_user["offload_param"]  # as DeepSpeed does: only ZeRO-3 partitions parameters
        notes.append(f"offload_param of the DeepSpeed config ignored: stage {stage} does not partition parameters")
    mb, ga = t.micro_batch_size, t.grad_accum
    checks = [("train_batch_size", mb * ga * dp,
               f"train.micro_batch_size x train.grad_accum x dp = {mb} x {ga} x {dp} = {mb * ga * dp}"),
              ("train_micro_batch_size_per_gpu", mb, f"train.micro_batch_size={mb}"),
              ("gradient_accumulation_steps", ga, f"train.grad_accum={ga}"),
              ("gradient_clipping", float(t.grad_clip), f"train.grad_clip={t.grad_clip}"),
              *((f"{kind}.enabled", t.precision == kind, f"train.precision={t.precision}") for kind in ("fp16", "bf16")),
              ("zero_optimization.stage", stage, f"strategy.zero_stage={stage}"),
              *((f"zero_optimization.{key}.device", dev, f"strategy.{key}={dev}")
                for key, dev in (("offload_optimizer", oo), ("offload_param", op)))]
    for keys, value, text in checks:
        _agree(user, keys, value, text, "strategy.config" if _get(extra, keys) is not None else origin)
    if user.pop("scheduler", None) is not None:
        notes.append("the DeepSpeed config's scheduler is not run: the run's warmup + cosine schedule (optim.*, translated "
                     "from it where it maps) sets the lr")
    if "optimizer" in user:  # the run's values: adopt_user_config took the file's unless the command line said otherwise
        o = cfg.optim
        fill = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        user["optimizer"]["params"] = {**(user["optimizer"].get("params") or {}), **fill}
        notes.append(f"optimizer {user['optimizer'].get('type')} from the DeepSpeed config; the run's schedule sets its lr")

    sz, cuda = sizes(cfg), torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": sz["bucket"], "allgather_bucket_size": sz["bucket"],
                            "contiguous_gradients": True, "overlap_comm": stage == 3}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=sz["prefetch"], stage3_param_persistence_threshold=sz["persistence"],
                    stage3_max_live_parameters=sz["live"], stage3_max_reuse_distance=sz["live"],
                    sub_group_size=sz["sub_group"])
    nvme = option(cfg, "nvme_path")
    if "nvme" in (oo, op):
        if not nvme:
            key = "offload_param" if op == "nvme" else "offload_optimizer"
            raise ConfigError(f"strategy.{key}=nvme needs strategy.nvme_path=<a folder on a local SSD>")
        nvme = str(Path(nvme).expanduser().resolve())
    if oo != "none":
        zero["offload_optimizer"] = {"device": oo, "pin_memory": cuda, "buffer_count": 4, "fast_init": False,
                                     **({"nvme_path": nvme} if oo == "nvme" else {})}
    if op != "none":
        zero["offload_param"] = {"device": op, "pin_memory": cuda, "buffer_count": 5, "buffer_size": sz["param_buffer"],
                                 "max_in_cpu": sz["live"], **({"nvme_path": nvme} if op == "nvme" else {})}
    gen = {"train_batch_size": t.micro_batch_size * t.grad_accum * dp, "train_micro_batch_size_per_gpu": t.micro_batch_size,
           "gradient_accumulation_steps": t.grad_accum, "gradient_clipping": float(t.grad_clip),
           "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False, "zero_allow_untested_optimizer": True,
           "zero_force_ds_cpu_optimizer": False, "zero_optimization": zero,
           "bf16": {"enabled": t.precision == "bf16"},
           "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                    "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
    ds = _merge(gen, user)
    _check_sizes(ds["zero_optimization"], extra, origin)
    return ds, notes


def _check_sizes(zero: dict, extra: dict, origin: str) -> None:
    """DeepSpeed's constraints (see ALIGN) on sizes the user's config set; the generated ones meet them."""
    def src(key: str) -> str:
        return "strategy.config" if _get(extra, f"zero_optimization.{key}") is not None else origin

    ag, rb = zero.get("allgather_bucket_size"), zero.get("reduce_bucket_size")
    if zero.get("stage") in (1, 2) and isinstance(ag, (int, float)) and ag % 2:
        raise ConfigError(f"{src('allgather_bucket_size')} sets zero_optimization.allgather_bucket_size={ag}: DeepSpeed "
                          f"needs a multiple of 2 (its nccl_start_alignment_factor), e.g. {aligned(ag)}")
    if isinstance(rb, (int, float)) and rb <= 0:
        raise ConfigError(f"{src('reduce_bucket_size')} sets zero_optimization.reduce_bucket_size={rb}: DeepSpeed needs > 0")


@functools.lru_cache(maxsize=None)
def aio_available() -> bool:
    """DeepSpeed's own test: can its async_io op compile and link against libaio here? Asked once per process, and
    quietly: the test compiles a probe with gcc, whose command lines (and DeepSpeed's accelerator warning) would
    otherwise be logged at INFO under Hydra, before the one line a refusal should be."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False))
    finally:
        logging.disable(previous)


def nvme_check(cfg, ds: dict) -> None:
    """NVMe offload needs libaio (DeepSpeed's async_io op), a real disk and room for the swapped state."""
    zero = ds["zero_optimization"]
    devs = [zero.get(k, {}).get("device") for k in ("offload_optimizer", "offload_param")]
    if "nvme" not in devs:
        return
    path = Path(zero.get("offload_param", zero.get("offload_optimizer"))["nvme_path"])
    key = "offload_param" if devs[1] == "nvme" else "offload_optimizer"
    if not aio_available():
        raise ConfigError(f"strategy.{key}=nvme needs libaio (DeepSpeed's async_io op), which is missing: "
                          "install it with `bash scripts/setup.sh --nvme` (Debian/Ubuntu: apt-get install libaio-dev)")
    existing = next(p for p in [path, *path.parents] if p.exists())
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()] if Path("/proc/mounts").exists() else []
    fstype = max(((m, f) for m, f in mounts if str(existing).startswith(m)), key=lambda x: len(x[0]), default=("", ""))[1]
    if fstype in ("tmpfs", "ramfs"):
        raise ConfigError(f"strategy.nvme_path={path} is on {fstype} (memory, not a disk): point it at a local SSD")
    n = GPTConfig.from_cfg(cfg.model).num_params()
    need = n * ((4 if devs[1] == "nvme" else 0) + (16 if devs[0] == "nvme" else 0))  # fp32 params; master, moments, grads
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"strategy.nvme_path={path} has {free / 1e9:.1f} GB free but this model's offloaded state "
                          f"needs about {need / 1e9:.1f} GB: point strategy.nvme_path at a bigger disk")
