"""Checks of a run config, before any worker starts. Each raises a ``ConfigError`` whose message is one line
naming the key and the fix, or returns what it derived; none of them changes the config (the plan builder,
``runtime.plan.build_plan``, is the one place that writes a derived value into the plan's copy)."""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from parallelkit.config.env import cuda_available, under_torchrun
from parallelkit.config.errors import ConfigError
from parallelkit.data import corpus, tokens
from parallelkit.models.hf import hf_fields
from parallelkit.util.devices import CUDA_PEAK_TFLOPS, device_with_peak

PRECISIONS = ("fp32", "bf16", "fp16")
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's cap on M_MMAP_THRESHOLD (64-bit); its dynamic threshold rises to it


def _int(cfg, key: str, minimum: int = 1, allow_none: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key}={v!r}: must be an integer >= {minimum}")


def _num(cfg, key: str, minimum: float = 0.0) -> None:
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < minimum:
        raise ConfigError(f"{key}={v!r}: must be a finite number >= {minimum}")


_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}  # powers of 1000 (or of 1024 with an "i")


def parse_bytes(value, key: str = "gpu_memory") -> int | None:
    """Bytes, or a size string: 80GB (GB = 1e9), 24GiB (GiB = 2^30); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(value), re.I)
    if isinstance(value, bool) or not m or (m[3] and not m[2]) or float(m[1]) <= 0:
        raise ConfigError(f"{key}={value!r}: give bytes or a size such as 80GB (1e9) or 24GiB (2^30)")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** _POWERS[m[2].lower()])


def untimed_steps_key(cfg: DictConfig) -> tuple[int | None, str | None]:
    """``train.warmup_steps`` was the old name of ``train.untimed_steps`` (not the lr warmup, optim.warmup_steps):
    (its value, a note) when the old name is used."""
    old = OmegaConf.select(cfg, "train.warmup_steps")
    if old is None:
        return None, None
    return old, (f"train.warmup_steps is deprecated (it is easily confused with the learning-rate warmup "
                 f"optim.warmup_steps): write train.untimed_steps={old}")


def default_world_size() -> int:
    """world_size=null: torchrun's WORLD_SIZE, else every local GPU, else 2 CPU processes."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if cuda_available():
        import torch

        return max(1, torch.cuda.device_count())
    return 2


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


ARCHS = ("gpt", "llama", "hf")  # model.arch: models/gpt.py, models/llama.py, models/hf.py


def hf_model_values(cfg: DictConfig) -> dict:
    """``model=hf``: the model.* values its folder's config.json gives (layers, width, heads, vocabulary, tying)."""
    path = cfg.model.get("path")
    if not path:
        raise ConfigError("model=hf needs model.path=<a local folder holding a Hugging Face config.json>; nothing is "
                          "downloaded")
    if not (Path(str(path)).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path={path!r}: give a local folder holding a Hugging Face config.json (and "
                          f"optionally model.safetensors); nothing is downloaded")
    try:
        return hf_fields(path)
    except ValueError as e:
        raise ConfigError(" ".join(str(e).split())) from None


def check_family(cfg: DictConfig, cls) -> None:
    """A strategy that cuts the model (pipeline stages, tensor-parallel shards) knows the layouts it names only."""
    arch = cfg.model.get("arch") or "gpt"
    if arch not in cls.families:
        fits = "single, ddp, zero0-3 (and offload), fairscale_oss, fairscale_oss_ddp, the fsdp (FSDP2) presets" + (
            ", torch_pipe" if arch in ("llama", "hf") else "") + (", torch_nd (tp, pp, FSDP2)" if arch == "llama" else "")
        raise ConfigError(f"strategy={cfg.strategy.name} cuts the model and knows model.arch={' or '.join(cls.families)} "
                          f"only; model.arch={arch} runs under {fits}")


def check_corpus(data: DictConfig, vocab_size: int) -> None:
    """``data=corpus``: text files to read and a tokenizer whose ids the model's vocabulary covers."""
    path = str(data.get("path"))
    if path != corpus.STDLIB:
        check_text(path, 0)
    tok = data.get("tokenizer")
    if tok and not Path(str(tok)).expanduser().is_file():
        raise ConfigError(f"data.tokenizer={tok}: no such tokenizer.json (null: a BPE trained on the corpus)")
    if not tok and (not isinstance(data.get("tokenizer_vocab"), int) or data.tokenizer_vocab < 260):
        raise ConfigError(f"data.tokenizer_vocab={data.get('tokenizer_vocab')!r}: a whole number of at least 260 "
                          f"(256 bytes and some merges)")
    try:
        need = corpus.tokenizer_vocab(data)
    except Exception as e:  # noqa: BLE001 - a tokenizer.json that does not load
        raise ConfigError(f"data.tokenizer={tok}: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    if need > vocab_size:
        raise ConfigError(f"data=corpus: the tokenizer has {need} tokens, model.vocab_size={vocab_size} fewer: set "
                          f"model.vocab_size={need} (or more)")


def check_settings(cfg: DictConfig) -> None:
    """The run's own settings (everything but the strategy's options and the checkpoint to resume)."""
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
    if (cfg.train.get("cpu_mmap_threshold") or 0) > MMAP_THRESHOLD_MAX:
        raise ConfigError(f"train.cpu_mmap_threshold={cfg.train.cpu_mmap_threshold}: glibc takes at most "
                          f"{MMAP_THRESHOLD_MAX} (32 MiB); use a smaller value, or null for glibc's own")
    _num(cfg, "optim.lr")
    _num(cfg, "optim.weight_decay")
    if cfg.train.untimed_steps >= cfg.train.steps:
        raise ConfigError(f"train.untimed_steps={cfg.train.untimed_steps} leaves no timed step of "
                          f"train.steps={cfg.train.steps}: lower train.untimed_steps or raise train.steps")
    for key in ("train.instrument", "train.tensorboard", "preflight"):
        if not isinstance(OmegaConf.select(cfg, key, default=False), bool):
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: must be true or false")
    if (bd := OmegaConf.select(cfg, "train.breakdown", default=True)) not in (True, False, "trace"):
        raise ConfigError(f"train.breakdown={bd!r}: must be true, false, or trace (also write the profiled step's "
                          f"trace per rank)")
    if bd == "trace" and cfg.train.untimed_steps < 2:
        raise ConfigError(f"train.breakdown=trace profiles an untimed step after the first: it needs "
                          f"train.untimed_steps >= 2, got {cfg.train.untimed_steps}")
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
    arch = m.get("arch") or "gpt"
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r}: choose {' or '.join(ARCHS)}")
    if arch == "llama":
        for k in ("n_kv_head", "d_ff"):
            _int(cfg, f"model.{k}")
        if m.n_head % m.n_kv_head:
            raise ConfigError(f"model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head}: each key/value "
                              f"head serves a whole group of query heads")
    gpu_mem = OmegaConf.select(cfg, "gpu_memory")
    if gpu_mem is not None and not isinstance(gpu_mem, (int, float, str)):
        raise ConfigError(f"gpu_memory={gpu_mem!r}: give bytes or a size such as 80GB")
    if cfg.get("projection") is not None:
        for key in PROJECTION:
            projection_setting(cfg, key)
        if not isinstance(fw := OmegaConf.select(cfg, "projection.framework", default=True), bool):
            raise ConfigError(f"projection.framework={fw!r}: must be true or false")


def check_inputs(cfg: DictConfig) -> None:
    """What the run reads or names outside its config: the data files (and the tokenizer), and the GPU that
    ``projection.device`` names. Checked last, once the settings and the strategy's options are sound."""
    m, data = cfg.model, cfg.data
    if data.name == "text":
        check_text(data.get("path"), m.seq_len)
    elif data.name == "corpus":
        check_corpus(data, m.vocab_size)
    elif data.name in tokens.FORMATS:
        if not data.get("path"):
            raise ConfigError(f"data={data.name} needs data.path=<its token file>")
        try:
            tokens.check(data.name, str(data.path), data.get("dtype"), m.vocab_size, m.seq_len)
        except (tokens.TokenFileError, OSError) as e:
            text = " ".join(str(e).split())
            raise ConfigError(text if text.startswith("data.") else f"data.path={text}") from None
        if m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} < 256: byte-level text needs 256 tokens")
    name, prec = OmegaConf.select(cfg, "projection.device"), cfg.train.precision
    if name and device_with_peak(name, prec) is None:
        known = ", ".join(k for k, v in CUDA_PEAK_TFLOPS.items() if v.get(prec))
        raise ConfigError(f"projection.device={name!r}: no {prec} peak known for it; choose one of {known}")


def grad_accum_of(cfg: DictConfig, data_ranks: int) -> int | None:
    """The accumulation ``train.global_batch_size`` implies (None when it is not set)."""
    gbs = OmegaConf.select(cfg, "train.global_batch_size")
    if gbs is None:
        return None
    per_step = cfg.train.micro_batch_size * data_ranks  # single / one-process pipes run world_size ranks' batches
    if not isinstance(gbs, int) or isinstance(gbs, bool) or gbs % per_step:
        raise ConfigError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x dp = "
                          f"{cfg.train.micro_batch_size} x {data_ranks} = {per_step}: change either")
    return gbs // per_step


def check_world(cfg: DictConfig, processes: int, one_process: bool) -> None:
    """Under torchrun, the processes it started must be the layout's."""
    if under_torchrun() and not one_process and int(os.environ["WORLD_SIZE"]) != processes:
        raise ConfigError(f"world_size={cfg.world_size} but torchrun started {os.environ['WORLD_SIZE']} processes: "
                          f"set world_size=null or match --nnodes x --nproc_per_node")


# ---- projection.* (the step-time projection's settings) ----
PROJECTION = {"efficiency": ("a number in (0, 1]", lambda v: 0 < v <= 1),
              "latency_us": ("a number >= 0", lambda v: v >= 0), "bandwidth_GBps": ("a number > 0", lambda v: v > 0),
              "memory_GBps": ("a number > 0", lambda v: v > 0)}


def projection_setting(cfg, key: str):
    """``projection.<key>`` (device: a name; the others: checked numbers), or None."""
    v = OmegaConf.select(cfg, f"projection.{key}")
    if v is None or key == "device":
        return v
    want, ok = PROJECTION[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ConfigError(f"projection.{key}={v!r}: must be {want}")
    return float(v)


def named_device(cfg) -> str | None:
    """The data-sheet entry of ``projection.device`` (None when unset; ``check_inputs`` refused an unknown one)."""
    name = projection_setting(cfg, "device")
    return device_with_peak(name, cfg.train.precision) if name else None


def note(text: str) -> None:
    """A note of planning, said once (rank 0 under torchrun, where every rank plans)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"parallelkit: note: {text}", file=sys.stderr, flush=True)
