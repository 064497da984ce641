"""Config checks that run in the launching process, before any worker starts.

Every failure is a ``ConfigError`` whose message is one line naming the key and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


PRECISIONS = ("fp32", "bf16", "fp16")


def _int(cfg, key: str, minimum: int = 1, allow_none: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key}={v!r}: must be an integer >= {minimum}")


def _num(cfg, key: str, minimum: float = 0.0) -> None:
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key}={v!r}: must be a number >= {minimum}")


def strategy_class(cfg):
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "strategy._target_")
    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001 - turned into one line for the user
        raise ConfigError(f"strategy._target_={target!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"is its backend installed? (bash scripts/setup.sh)") from None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def adopt_slurm_env(env=os.environ) -> bool:
    """Under SLURM with one task per device (Hydra's submitit launcher, ``srun``), set the
    variables torch.distributed reads from SLURM's, so each task runs as a worker in place.

    Only when the job has more than one task and nobody (torchrun) set RANK already.
    """
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return False
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "localhost")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_ADDR", first_host(nodes))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return True


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-005,010],cpu01`` -> ``gpu003``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, rng = head.split("[", 1)
    return prefix + rng.rstrip("]").split(",")[0].split("-")[0]


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def resolve(cfg: DictConfig, explicit: set[str] | None = None) -> DictConfig:
    """Fill the values that depend on the machine (world_size: null -> auto) and check the rest.

    ``explicit``: the keys given on the command line; a user's DeepSpeed config fills the others.
    """
    ws = cfg.world_size
    if ws is None:
        if under_torchrun():
            ws = int(os.environ["WORLD_SIZE"])
        else:
            ws = max(1, __import__("torch").cuda.device_count()) if cuda_available() else 2
        cfg.world_size = ws
    # ds-config: a user's DeepSpeed JSON (strategy.config_file / strategy.config) is the source of truth for
    # what the command line does not say; adopted into cfg before the checks, one line on stderr says what.
    from .strategies.deepspeed_config import adopt_user_config

    adopt_user_config(cfg, explicit or set())
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    _int(cfg, "world_size")
    _int(cfg, "seed", 0)
    _int(cfg, "train.steps")
    _int(cfg, "train.warmup_steps", 0)
    _int(cfg, "train.micro_batch_size")
    _int(cfg, "train.grad_accum")
    _num(cfg, "train.grad_clip")
    _int(cfg, "train.timeout_s", 1, allow_none=True)
    _num(cfg, "optim.lr")
    _num(cfg, "optim.weight_decay")
    if cfg.train.warmup_steps >= cfg.train.steps:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} leaves no timed step of "
                          f"train.steps={cfg.train.steps}: lower warmup_steps or raise steps")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={cfg.train.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.train.precision == "fp16" and not cuda_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (no fp16 training on CPU): use train.precision=bf16")
    m = cfg.model
    for k in ("n_layer", "n_head", "d_model", "vocab_size", "seq_len"):
        _int(cfg, f"model.{k}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
    if cfg.data.name == "text":
        p = cfg.data.get("path")
        if not p or not Path(p).exists():
            raise ConfigError(f"data.path={p!r} does not exist: give a local text file or folder (data=text data.path=...)")
        if m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} < 256: byte-level text needs 256 tokens")
    resume = OmegaConf.select(cfg, "checkpoint.resume")
    if resume and not Path(resume).exists():
        raise ConfigError(f"checkpoint.resume={resume!r} does not exist: give a checkpoint folder written by checkpoint.dir")
    gpu_mem = OmegaConf.select(cfg, "gpu_memory")
    if gpu_mem is not None and not isinstance(gpu_mem, (int, float, str)):
        raise ConfigError(f"gpu_memory={gpu_mem!r}: give bytes or a size such as 80GB")

    cls = strategy_class(cfg)
    lay = cls.layout(cfg)
    if lay["world"] % (lay["tp"] * lay["pp"]):
        raise ConfigError(f"world_size={cfg.world_size} is not divisible by tp x pp = {lay['tp']} x {lay['pp']}")
    gbs = OmegaConf.select(cfg, "train.global_batch_size")
    if gbs is not None:
        dp = max(lay["dp"], lay.get("virtual_dp", 1))  # single / one-process pipes run world_size ranks' batches
        per_step = cfg.train.micro_batch_size * dp
        if not isinstance(gbs, int) or gbs % per_step:
            raise ConfigError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x dp = "
                              f"{cfg.train.micro_batch_size} x {dp} = {per_step}: change either")
        cfg.train.grad_accum = gbs // per_step
    cls.check(cfg)
    if under_torchrun() and not getattr(cls, "one_process", False):
        if int(os.environ["WORLD_SIZE"]) != lay["processes"]:
            raise ConfigError(f"world_size={cfg.world_size} but torchrun started {os.environ['WORLD_SIZE']} processes: "
                              f"set world_size=null or match --nnodes x --nproc_per_node")
