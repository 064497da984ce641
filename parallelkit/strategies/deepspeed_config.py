"""The DeepSpeed config of a run: generated from the run's settings, sized for the model and the
machine, with the user's DeepSpeed JSON (``strategy.config_file``) and dict (``strategy.config``)
merged over it.

DeepSpeed's defaults (5e8-element buckets, 1e9 sub-groups and live parameters) allocate
gigabytes per rank whatever the model's size, so every buffer is scaled here (and rounded to meet
DeepSpeed's alignment asserts, see ALIGN). A value the run
also sets (batch sizes, precision, clipping, stage, offload) must agree or be ``"auto"``: a
conflict is a ConfigError naming both values, raised before any worker starts.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..model import GPTConfig

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
    largest = max(c.vocab_size * d, c.seq_len * d, 4 * d * d)
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
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"strategy.config_file={path!r} is not valid JSON: {e}") from None
    if not isinstance(extra, dict) or not isinstance(data, dict):
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


def _agree(user: dict, keys: str, run_value, run_text: str, origin: str):
    """The user's value at ``keys`` (dotted) if it agrees with the run's, else a ConfigError naming both."""
    v = user
    for k in keys.split("."):
        v = v.get(k, "auto") if isinstance(v, dict) else "auto"
    if v in ("auto", None) or v == run_value:
        return
    raise ConfigError(f"{origin} sets {keys}={v!r} but the run has {run_text}: make them agree (or write \"auto\" in the DeepSpeed config)")


def build_config(cfg) -> tuple[dict, list[str]]:
    """The DeepSpeed config for this run and notes for the report. Pure: check() and setup() agree."""
    stage, oo, op = settings(cfg)
    t, dp = cfg.train, cfg.world_size
    file_cfg, extra, origin = _user_config(cfg)
    notes = []
    for src, user in ((origin, file_cfg), ("strategy.config", extra)):
        mb, ga = t.micro_batch_size, t.grad_accum
        _agree(user, "train_batch_size", mb * ga * dp, f"train.micro_batch_size x train.grad_accum x dp = "
               f"{mb} x {ga} x {dp} = {mb * ga * dp}", src)
        _agree(user, "train_micro_batch_size_per_gpu", mb, f"train.micro_batch_size={mb}", src)
        _agree(user, "gradient_accumulation_steps", ga, f"train.grad_accum={ga}", src)
        _agree(user, "gradient_clipping", float(t.grad_clip), f"train.grad_clip={t.grad_clip}", src)
        for kind in ("fp16", "bf16"):
            _agree(user, f"{kind}.enabled", t.precision == kind, f"train.precision={t.precision}", src)
        _agree(user, "zero_optimization.stage", stage, f"strategy.zero_stage={stage}", src)
        for key, dev in (("offload_optimizer", oo), ("offload_param", op)):
            _agree(user, f"zero_optimization.{key}.device", dev, f"strategy.{key}={dev}", src)
    user = _merge(file_cfg, extra)
    if user.pop("scheduler", None) is not None:
        notes.append("the DeepSpeed config's scheduler is ignored: the run's warmup + cosine schedule (optim.*) sets the lr")
    if "optimizer" in user:
        o = cfg.optim
        fill = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        user["optimizer"]["params"] = _merge(fill, user["optimizer"].get("params") or {})
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


def aio_available() -> bool:
    """DeepSpeed's own test: can its async_io op compile and link against libaio here?"""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False))


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
