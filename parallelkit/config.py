"""Config checks that run in the launching process, before any worker starts.

Every failure is a ``ConfigError`` whose message is one line naming the key and the fix.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


STRATEGY_DIR = Path(__file__).resolve().parent.parent / "conf" / "strategy"


def shipped_default(key: str):
    """A setting's default as conf/config.yaml ships it (for what runs outside a composed run config)."""
    return OmegaConf.select(OmegaConf.load(STRATEGY_DIR.parent / "config.yaml"), key)


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


def explicit_keys(overrides, strategy: str | None = None) -> set[str]:
    """The keys set on the command line (``key=v``, ``+key=v``, ``++key=v``; a deletion ``~key`` sets nothing),
    plus those the chosen strategy preset sets.

    A preset is a choice made by name: ``strategy=zero3`` says "stage 3" as plainly as
    ``strategy.zero_stage=3`` does, so what a preset sets beyond the base it extends (zero3 over
    deepspeed.yaml: zero_stage) counts as given and wins over a DeepSpeed JSON. The base itself
    (``strategy=deepspeed``) only carries defaults, so with it the JSON decides everything it states.
    """
    keys = {o.lstrip("+").split("=", 1)[0] for o in overrides if "=" in o and not o.startswith("~")}
    return keys | {f"strategy.{k}" for k in _preset_keys(strategy)} if strategy else keys


def _preset_keys(name: str) -> set[str]:
    """Keys conf/strategy/<name>.yaml and the presets it extends set, less those of the base they extend."""
    path = STRATEGY_DIR / f"{name}.yaml"
    if not path.is_file():
        return set()
    node = OmegaConf.to_container(OmegaConf.load(path))
    parents = [d for d in node.pop("defaults", None) or [] if isinstance(d, str) and d != "_self_"]
    if not parents:  # a family's base (deepspeed.yaml): defaults, not choices
        return set()
    return (set(node) - {"name", "_target_"}).union(*map(_preset_keys, parents))


def preset(name: str) -> DictConfig:
    """A conf/strategy preset as Hydra composes it: the presets in its ``defaults`` first, then itself
    (``_self_`` last when unlisted). A fraction of the cost of composing the whole config again."""
    node = OmegaConf.load(STRATEGY_DIR / f"{name}.yaml")
    with open_dict(node):
        defaults = list(node.pop("defaults", None) or [])
    order = defaults if "_self_" in defaults else [*defaults, "_self_"]
    return OmegaConf.merge(*(node if d == "_self_" else preset(d) for d in order))


def plan(cfg):
    """(strategy class, its typed options, the layout): computed once from the config, used everywhere."""
    cls = strategy_class(cfg)
    opts = cls.options(cfg)
    return cls, opts, cls.layout(cfg, opts)


def migrate_untimed_steps(cfg: DictConfig) -> None:
    """``train.warmup_steps`` was the old name of ``train.untimed_steps`` (not the lr warmup, optim.warmup_steps)."""
    old = OmegaConf.select(cfg, "train.warmup_steps")
    if old is not None:
        print(f"parallelkit: note: train.warmup_steps is deprecated (it is easily confused with the learning-rate "
              f"warmup optim.warmup_steps): write train.untimed_steps={old}", file=sys.stderr)
        cfg.train.untimed_steps, cfg.train.warmup_steps = old, None


def resolve(cfg: DictConfig, explicit: set[str] | None = None) -> DictConfig:
    """Fill the values that depend on the machine (world_size: null -> auto) and check the rest.

    ``explicit``: the keys given on the command line; a backend may fill the others from its own config
    (``Strategy.prepare``: a user's DeepSpeed JSON).
    """
    migrate_untimed_steps(cfg)
    ws = cfg.world_size
    if ws is None:
        if under_torchrun():
            ws = int(os.environ["WORLD_SIZE"])
        else:
            ws = max(1, __import__("torch").cuda.device_count()) if cuda_available() else 2
        cfg.world_size = ws
    strategy_class(cfg).prepare(cfg, explicit or set())
    validate(cfg)
    return cfg


def check_text(path, seq_len: int) -> None:
    """A text data.path must hold at least one sequence (seq_len + 1 bytes, and one to choose where it starts)."""
    if not path or not Path(path).exists():
        raise ConfigError(f"data.path={path!r} does not exist: give a local text file or folder (data=text data.path=...)")
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"data.path={path} is an empty folder: put text files in it, or give a text file")
    size, need = sum(f.stat().st_size for f in files), seq_len + 2
    if size < need:
        what = "is empty" if not size else f"holds {size} bytes"
        where = f" in {len(files)} file(s)" if p.is_dir() else ""
        raise ConfigError(f"data.path={path} {what}{where}; one sequence needs model.seq_len + 2 = {need} bytes: "
                          f"give more text or lower model.seq_len")


def validate(cfg: DictConfig) -> None:
    _int(cfg, "world_size")
    _int(cfg, "seed", 0)
    _int(cfg, "repeats")
    _int(cfg, "train.steps")
    _int(cfg, "train.untimed_steps", 0)
    _int(cfg, "train.micro_batch_size")
    _int(cfg, "train.grad_accum")
    _num(cfg, "train.grad_clip")
    _int(cfg, "train.timeout_s", 1, allow_none=True)
    _int(cfg, "train.cpu_mmap_threshold", 0, allow_none=True)
    from .metrics import MMAP_THRESHOLD_MAX

    if (cfg.train.get("cpu_mmap_threshold") or 0) > MMAP_THRESHOLD_MAX:
        raise ConfigError(f"train.cpu_mmap_threshold={cfg.train.cpu_mmap_threshold}: glibc takes at most "
                          f"{MMAP_THRESHOLD_MAX} (32 MiB); use a smaller value, or null for glibc's own")
    _num(cfg, "optim.lr")
    _num(cfg, "optim.weight_decay")
    from .resume import validate_checkpoint

    validate_checkpoint(cfg)  # a resume may lower train.untimed_steps to the steps it leaves
    if cfg.train.untimed_steps >= cfg.train.steps:
        raise ConfigError(f"train.untimed_steps={cfg.train.untimed_steps} leaves no timed step of "
                          f"train.steps={cfg.train.steps}: lower train.untimed_steps or raise train.steps")
    if not isinstance(cfg.train.get("instrument", False), bool):
        raise ConfigError(f"train.instrument={cfg.train.instrument!r}: must be true or false")
    if not isinstance(cfg.get("preflight", True), bool):
        raise ConfigError(f"preflight={cfg.preflight!r}: must be true or false")
    if cfg.get("projection") is not None:
        from .projection import check as check_projection

        check_projection(cfg)
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={cfg.train.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.train.precision == "fp16" and not cuda_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (no fp16 training on CPU): use train.precision=bf16")
    m = cfg.model
    for k in ("n_layer", "n_head", "d_model", "vocab_size", "seq_len"):
        _int(cfg, f"model.{k}")
    if m.d_model % m.n_head:
        fits = [h for h in range(1, min(m.d_model, 64) + 1) if m.d_model % h == 0]
        raise ConfigError(f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}: use model.n_head="
                          f"{', '.join(map(str, fits[:-1]))} or {fits[-1]}, or a model.d_model divisible by {m.n_head}")
    if cfg.data.name == "text":
        check_text(cfg.data.get("path"), m.seq_len)
        if m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} < 256: byte-level text needs 256 tokens")
    gpu_mem = OmegaConf.select(cfg, "gpu_memory")
    if gpu_mem is not None and not isinstance(gpu_mem, (int, float, str)):
        raise ConfigError(f"gpu_memory={gpu_mem!r}: give bytes or a size such as 80GB")

    cls, opts, lay = plan(cfg)
    gbs = OmegaConf.select(cfg, "train.global_batch_size")
    if gbs is not None:
        dp = lay.data_ranks  # single / one-process pipes run world_size ranks' batches
        per_step = cfg.train.micro_batch_size * dp
        if not isinstance(gbs, int) or gbs % per_step:
            raise ConfigError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x dp = "
                              f"{cfg.train.micro_batch_size} x {dp} = {per_step}: change either")
        cfg.train.grad_accum = gbs // per_step
    cls.check(cfg, opts)
    if under_torchrun() and not cls.one_process:
        if int(os.environ["WORLD_SIZE"]) != lay.processes:
            raise ConfigError(f"world_size={cfg.world_size} but torchrun started {os.environ['WORLD_SIZE']} processes: "
                              f"set world_size=null or match --nnodes x --nproc_per_node")
