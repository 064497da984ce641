"""``python -m parallelkit.estimate [overrides] [--json]``: per-rank memory of every strategy, no model built.

The run's config (Hydra compose: nothing written); every conf/strategy preset for its model, batch
and world size, the configured one with the user's ``strategy.*`` overrides. Per rank (or stage):
model state by the ZeRO paper (Rajbhandari et al. 2020, sec. 3: fp32 AdamW 4+4+8 bytes/param, 16-bit
2+2+K=12; DeepSpeed keeps an fp32 master even in fp32), buffers (DDP buckets, FSDP's gathered units,
DeepSpeed's buckets, autocast's weight cache), activations (Korthikanti et al. 2022: 34·s·b·h bytes
per block in 16-bit less two dropout masks = 16·s·b·h values; SDPA keeps no a·s² scores) and a fixed
allowance. The total is their sum: an upper bound (gradients and activations do not peak together).
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from itertools import accumulate
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import ConfigError, resolve, strategy_class, validate
from .model import GPTConfig
from .run import CONF_DIR, check_group_choices

GiB = 2**30
OVERHEAD = GiB  # allowance, not a measurement: CUDA context (~0.5 GB), cuBLAS workspace, allocator slack
PARTS = ("params", "grads", "optimizer", "buffers", "activations")
UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}  # powers of 1000 (or of 1024 with an "i")
ASSUMPTIONS = ("bytes/param: fp32 AdamW 4+4+8 (DeepSpeed: +4 fp32 master in stages 1-3; 16-bit: 2+2+12); "
               "activations 16·s·b·h values/block (Korthikanti 2022 less dropout masks, SDPA keeps no a·s² scores), "
               "checkpointing: 1 value/block + one block; logits 8·b·s·V bytes; 1 GiB allowance for a GPU's context; "
               "total = sum (an upper bound)")


def parse_bytes(value) -> int | None:
    """``gpu_memory``: bytes, or a size string: 80GB (GB = 1e9), 24GiB (GiB = 2^30)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(value), re.I)
    if isinstance(value, bool) or not m or (m[3] and not m[2]) or float(m[1]) <= 0:
        raise ConfigError(f"gpu_memory={value!r}: give bytes or a size such as 80GB (1e9) or 24GiB (2^30)")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** UNITS[m[2].lower()])


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """The run's config for these overrides (no output folder) and its strategy preset name."""
    from hydra import compose, initialize_config_dir

    if (err := check_group_choices(overrides)) is not None:
        raise ConfigError(err)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - Hydra's messages span lines: keep them to one
        raise ConfigError(" ".join(str(e).split())) from None
    choice = cfg.hydra.runtime.choices.strategy
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choice


def preset(name: str) -> DictConfig:
    """A conf/strategy preset as Hydra composes it: the presets in its ``defaults`` first, then itself
    (``_self_`` last when unlisted). A fraction of the cost of composing the whole config again."""
    node = OmegaConf.load(Path(CONF_DIR) / "strategy" / f"{name}.yaml")
    with open_dict(node):
        defaults = list(node.pop("defaults", None) or [])
    order = defaults if "_self_" in defaults else [*defaults, "_self_"]
    return OmegaConf.merge(*(node if d == "_self_" else preset(d) for d in order))


def stage_split(costs: list[int], parts: int) -> list[int]:
    """Layers per stage: the contiguous split into ``parts`` stages with the smallest largest stage."""
    n, pre = len(costs), [0, *accumulate(costs)]
    best = {(0, 0): (0, [])}  # (stages, layers) -> (largest stage, layers per stage)
    for k in range(1, parts + 1):
        for j in range(k, n - parts + k + 1):
            best[k, j] = min((max(best[k - 1, i][0], pre[j] - pre[i]), best[k - 1, i][1] + [j - i])
                             for i in range(k - 1, j) if (k - 1, i) in best)
    return best[parts, n][1]


def deepspeed_buckets(cfg, mem: int | None) -> dict:
    """Bucket sizes (elements) as parallelkit's deepspeed strategy generates them (``deepspeed_config``), sized
    for ``mem`` (gpu_memory) instead of this machine where given; values from the user's DeepSpeed config win.
    Without that module: DeepSpeed's defaults with Hugging Face's "auto" buckets (d_model^2)."""
    try:
        from .strategies.deepspeed_config import build_config, sizes
    except ImportError:
        d = cfg.model.d_model
        return {"overlap_comm": cfg.strategy.get("zero_stage") == 3, "reduce_bucket_size": d * d,
                "stage3_prefetch_bucket_size": int(0.9 * d * d), "stage3_max_live_parameters": int(1e9)}
    zero, here = build_config(cfg)[0]["zero_optimization"], sizes(cfg)
    there = sizes(cfg, mem) if mem else here
    out = {"overlap_comm": bool(zero.get("overlap_comm", False))}
    for key, s in (("reduce_bucket_size", "bucket"), ("stage3_prefetch_bucket_size", "prefetch"),
                   ("stage3_max_live_parameters", "live")):
        v = zero.get(key, here[s])
        out[key] = there[s] if v == here[s] else v
    return out


def _acts(c: GPTConfig, b: int, layers: int, tp: int = 1, ckpt: bool = False) -> float:
    """Activation values (not bytes) the blocks keep for backward."""
    sbh = c.seq_len * b * c.d_model
    full = sbh * (4 + 12 / tp)  # LayerNorm, qkv and fc inputs (replicated under TP); qkv, attention, fc, GELU outputs
    return layers * sbh + (full if layers else 0) if ckpt else layers * full


def data_parallel(fam: str, o: dict, c: GPTConfig, n: int, prec: str, ckpt: bool, b: int, tp: int = 1) -> dict:
    """single / ddp / fairscale_oss / fsdp / deepspeed / fairscale_tp: one rank of ``n`` data-parallel ranks."""
    d, L = c.d_model, c.n_layer
    vocab = fam == "fairscale_tp" and o.get("vocab_parallel", True) and tp > 1  # embedding + tied head split too
    split = L * (12 * d * d + 7 * d) + (c.vocab_size * d if vocab else 0)  # TP splits the block matmuls
    psi = c.num_params() - split * (1 - 1 / tp)
    block, mp = 12 * d * d + 13 * d, prec != "fp32"
    root = psi - L * block
    r = {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi, "buffers": 2 * psi if mp else 0, "offloaded": 0}
    if fam in ("ddp", "fairscale_tp") and n > 1 and not o.get("gradient_as_bucket_view"):
        r["buffers"] += 4 * psi  # DDP's bucket storage: a second copy of every gradient
    elif fam == "fairscale_oss":
        r["optimizer"] /= n
        if not o.get("sharded_ddp", True):
            r["buffers"] += 4 * psi
        elif not o.get("reduce_buffer_size", 0):
            r["grads"] /= n  # gradients of other ranks' parameters are dropped once reduced
    elif fam in ("fsdp", "fsdp1", "fairscale_fsdp"):
        r.update({k: r[k] / n for k in ("params", "grads", "optimizer")})
        units = root + (2 * block if o.get("reshard_after_forward", True) else L * block)  # root stays gathered
        grad = 2 if o.get("reduce_dtype") in ("bf16", "fp16") else 4  # unsharded gradients before reduce-scatter
        r["buffers"] = (2 if mp else 4) * units + grad * (root + block)
        if o.get("cpu_offload"):
            r["offloaded"] = r["params"] + r["grads"] + r["optimizer"]
            r.update(params=0, grads=0, optimizer=0)
    elif fam == "deepspeed":
        r.update(deepspeed_state(o, psi, n, prec, o["_buckets"], o["_accum"]))
    logits = 8 * b * c.seq_len * c.vocab_size / (tp if vocab else 1)  # fp32 log-softmax + its gradient
    r["activations"] = (_acts(c, b, L, tp, ckpt) + 2 * c.seq_len * b * d) * (2 if mp else 4) + logits  # + head inputs
    return r


def deepspeed_state(o: dict, psi: float, n: int, prec: str, zc: dict, accum: int = 1) -> dict:
    """ZeRO stage 0-3 partitioning, offload, buckets (Rajbhandari et al. 2020, fig. 1). Stage 1 holds full
    gradients only while it accumulates (grad_accum > 1); at grad_accum=1 it reduces them as stage 2 does."""
    stage, p = int(o.get("zero_stage", 2)), (4 if prec == "fp32" else 2)
    k = 8 if stage == 0 and prec == "fp32" else 12  # stage 0 in fp32 steps the params directly: no master copy
    sharded_grads = stage >= 2 or (stage == 1 and accum == 1)
    r = {"params": p * psi / (n if stage == 3 else 1), "grads": p * psi / (n if sharded_grads else 1),
         "optimizer": k * psi / (n if stage >= 1 else 1), "offloaded": 0}
    if o.get("offload_optimizer") not in (None, False, "none"):
        r["offloaded"] += r["optimizer"] + (r["grads"] if stage >= 2 else 0)
        r["optimizer"], r["grads"] = 0, (0 if stage >= 2 else r["grads"])
    if o.get("offload_param") not in (None, False, "none") and stage == 3:
        r["offloaded"] += r["params"]
        r["params"] = 0
    bucket = p * zc["reduce_bucket_size"] * (2 if zc["overlap_comm"] else 1)
    live = min(psi, zc["stage3_max_live_parameters"] + zc["stage3_prefetch_bucket_size"])
    r["buffers"] = bucket + (p * live if stage == 3 else 0)
    return r


def pipeline(fam: str, o: dict, c: GPTConfig, pp: int, dp: int, prec: str, ckpt: bool, b: int, accum: int) -> dict:
    """One pipeline stage (the largest): its layers' state; GPipe keeps every chunk, 1F1B up to pp micro-batches."""
    d, V, T, L = c.d_model, c.vocab_size, c.seq_len, c.n_layer
    block, head = 12 * d * d + 13 * d, 2 * d + V * d  # a tied head gets its own copy on the last stage
    costs = [V * d + T * d, *[block] * L, head]
    balance = list(o.get("balance") or stage_split(costs, pp))
    mp, rows, start = prec != "fp32", [], 0
    for i, n in enumerate(balance):
        layers = list(range(start, start + n))
        start += n
        psi = sum(costs[j] for j in layers)
        blocks = sum(1 for j in layers if 0 < j <= L)
        no_opt = V * d if (c.tie_weights and L + 1 in layers and fam == "fairscale_pipe") else 0
        if fam == "deepspeed_pipe":
            r = deepspeed_state(o, psi, dp, prec, o["_buckets"], accum)
            micro = min(pp - i, accum)  # 1F1B: stage i holds up to pp - i micro-batches in flight
            act = micro * _acts(c, b, blocks, 1, ckpt)
        else:
            r = {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * (psi - no_opt), "buffers": 2 * psi if mp else 0,
                 "offloaded": 0}
            mode, chunk = o.get("checkpoint", "never"), b / o.get("chunks", 1)
            if ckpt or mode == "never":
                act = _acts(c, b, blocks, 1, ckpt)
            else:  # stage inputs of every chunk + the chunks kept whole (except_last: the last one) + one recomputed
                act = blocks * T * b * d + (2 if mode == "except_last" else 1) * _acts(c, chunk, blocks)
        act = (act + (2 * T * b * d if L + 1 in layers else 0)) * (2 if mp else 4)  # + the head's two inputs
        if L + 1 in layers:
            act += 8 * b * T * V * (1 if fam == "fairscale_pipe" else min(pp - i, accum))
        rows.append({**r, "activations": act})
    return max(rows, key=lambda r: sum(r[k] for k in PARTS))


KNOWN = ("single", "ddp", "fairscale_oss", "fairscale_tp", "fsdp", "fsdp1", "fairscale_fsdp", "deepspeed",
         "fairscale_pipe", "deepspeed_pipe")


def family(cfg) -> str:
    """The backend a preset runs on: the module of its ``_target_`` (presets share it with their base)."""
    return str(cfg.strategy.get("_target_", "")).rsplit(".", 2)[-2]


def estimate(cfg, mem: int | None = None, overhead: int = OVERHEAD) -> dict:
    """Per-rank bytes for ``cfg.strategy`` (a resolved config: world_size is set) on devices of ``mem`` bytes."""
    fam, s, t, c = family(cfg), cfg.strategy, cfg.train, GPTConfig.from_cfg(cfg.model)
    o, cls = OmegaConf.to_container(s, resolve=True), strategy_class(cfg)
    lay = cls.layout(cfg)
    if fam.startswith("deepspeed"):
        o["_buckets"], o["_accum"] = deepspeed_buckets(cfg, mem), t.grad_accum
    ckpt = bool(t.activation_checkpointing)
    if fam in ("fairscale_pipe", "deepspeed_pipe"):
        r = pipeline(fam, o, c, lay["pp"], lay["dp"], t.precision, ckpt, t.micro_batch_size, t.grad_accum)
    else:
        r = data_parallel(fam, o, c, lay["dp"], t.precision, ckpt, t.micro_batch_size, lay["tp"])
    r = {k: int(v) for k, v in r.items()}
    return {"strategy": s.name, "label": cls.label(cfg), "devices": lay["world"], "dp": lay["dp"], "tp": lay["tp"],
            "pp": lay["pp"], **r, "model_state": r["params"] + r["grads"] + r["optimizer"], "overhead": overhead,
            "total": sum(r[k] for k in PARTS) + overhead}


def estimate_all(overrides: list[str]) -> dict:
    """Every preset in conf/strategy/ for these overrides; the configured one with its ``strategy.*`` overrides,
    the others as their yaml files say."""
    cfg, chosen = compose_config(overrides)
    from .strategies.deepspeed_config import explicit_keys  # ds-config: a DeepSpeed JSON fills what these leave unsaid

    resolve(cfg, explicit=explicit_keys(overrides, chosen))
    limit, source = parse_bytes(cfg.get("gpu_memory")), f"gpu_memory={cfg.get('gpu_memory')}"
    if limit is None:
        import torch

        if torch.cuda.is_available():
            limit, source = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
        else:
            source = "none (no CUDA device: no fit judged, no GPU allowance; set gpu_memory=80GB)"
    rows, notes = [], []
    for name in sorted(p.stem for p in (Path(CONF_DIR) / "strategy").glob("*.yaml")):
        pc, note = cfg, None
        try:
            if name != chosen:
                pc = cfg.copy()
                pc.strategy = preset(name)
                try:  # a check that fails here (no GPU, chunks vs batch) still leaves an estimate worth showing
                    validate(pc)
                except ConfigError as e:
                    note = str(e)
            row = estimate(pc, limit, OVERHEAD if limit else 0)  # the allowance is for a GPU
        except Exception as e:  # noqa: BLE001 - one preset that cannot be estimated must not hide the others
            notes.append(f"{name}: not estimated: {' '.join(str(e).split())}")
            continue
        if family(pc) not in KNOWN:
            note = f"no memory model for backend {family(pc)!r}: shown as a full replica like ddp"
        rows.append({**row, "configured": name == chosen, "fits": None if limit is None else row["total"] <= limit,
                     "note": note})
    c = GPTConfig.from_cfg(cfg.model)
    return {"model": cfg.model.name, "params": c.num_params(), "world_size": cfg.world_size,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": c.seq_len, "precision": cfg.train.precision,
            "activation_checkpointing": bool(cfg.train.activation_checkpointing), "gpu_memory": limit,
            "gpu_memory_source": source, "rows": rows, "notes": notes, "assumptions": ASSUMPTIONS}


def render(rep: dict) -> str:
    import pandas as pd

    unit, div = ("GiB", GiB) if max(r["model_state"] for r in rep["rows"]) >= GiB / 8 else ("MiB", 2**20)
    g = lambda v: f"{v / div:,.2f}"  # noqa: E731
    df = pd.DataFrame([{
        "strategy": ("* " if r["configured"] else "") + r["strategy"] + (" (!)" if r["note"] else ""),
        "label": r["label"], "devices": r["devices"], "model state": g(r["model_state"]), "buffers": g(r["buffers"]),
        "activations": g(r["activations"]), "total/rank": g(r["total"]),
        "offloaded": g(r["offloaded"]) if r["offloaded"] else "-",
        "fits": "-" if r["fits"] is None else ("yes" if r["fits"] else "no")} for r in rep["rows"]])
    mem = rep["gpu_memory"]
    limit = f"{mem / GiB:,.2f} GiB ({rep['gpu_memory_source']})" if mem else rep["gpu_memory_source"]
    ckpt = ", activation checkpointing" if rep["activation_checkpointing"] else ""
    return "\n".join([
        f"model {rep['model']} ({rep['params']:,} params), world_size {rep['world_size']}, micro-batch "
        f"{rep['micro_batch_size']} x seq {rep['seq_len']}, {rep['precision']}{ckpt}; {unit} per rank; "
        f"gpu_memory: {limit}",
        df.to_string(index=False), "* = the configured strategy; (!) = see below. " + rep["assumptions"],
        *(f"(!) {r['strategy']}: {r['note']}" for r in rep["rows"] if r["note"]), *(f"(!) {n}" for n in rep["notes"])])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        with contextlib.redirect_stdout(sys.stderr):  # backends' import-time chatter (DeepSpeed logs to stdout)
            rep = estimate_all([a for a in argv if a != "--json"])
    except ConfigError as e:
        print(f"parallelkit: config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(rep, indent=1) if as_json else render(rep))


if __name__ == "__main__":
    main()
