"""``python -m parallelkit.estimate [overrides] [--json]``: per-rank memory of every strategy, no model built.

The run's config (Hydra compose: nothing written); every conf/strategy preset for its model, batch
and world size, the configured one with the user's ``strategy.*`` overrides. Per rank (pipelines: per stage,
the largest in the row and every stage's total beside it):
model state by the ZeRO paper (Rajbhandari et al. 2020, sec. 3: fp32 AdamW 4+4+8 bytes/param, 16-bit
2+2+K=12; DeepSpeed keeps an fp32 master even in fp32), buffers (DDP buckets, FSDP's gathered units,
DeepSpeed's buckets, autocast's weight cache), activations (Korthikanti et al. 2022: 34·s·b·h bytes
per block in 16-bit less two dropout masks = 16·s·b·h values; SDPA keeps no a·s² scores) and a fixed
allowance. The total is their sum: an upper bound (gradients and activations do not peak together).
Beside the memory: each strategy's communication per step (``Strategy.comm``) and the step time
projection.py projects from it (``projection.*``; calibrations cached, measured once when missing).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys

from omegaconf import OmegaConf

from parallelkit.advisor import framework
from parallelkit.advisor.projection import project_plan
from parallelkit.config.checks import parse_bytes
from parallelkit.config.compose import (
    compose_config,
    explicit_keys,
    preset,
    strategy_presets,
)
from parallelkit.config.errors import ConfigError
from parallelkit.config.plan import RunPlan
from parallelkit.models.gpt import GPTConfig
from parallelkit.runtime.plan import build_plan
from parallelkit.strategies.shared.memory_model import GPU_ALLOWANCE, PARTS
from parallelkit.util.units import GiB, size

OVERHEAD = GPU_ALLOWANCE  # allowance, not a measurement: CUDA context (~0.5 GB), cuBLAS workspace, allocator slack
ASSUMPTIONS = ("bytes/param: fp32 AdamW 4+4+8 (DeepSpeed: +4 fp32 master in stages 1-3; 16-bit: 2+2+12); "
               "activations 16·s·b·h values/block (Korthikanti 2022 less dropout masks, SDPA keeps no a·s² scores), "
               "checkpointing: 1 value/block + one block; logits 12·b·s·V bytes (log-softmax and two gradients, fp32; DeepSpeed's pipeline also keeps the logits of 2 micro-batches on its last stage); 1 GiB allowance for a GPU's context; "
               "total = sum (an upper bound)")


def estimate(plan: RunPlan, mem: int | None = None, overhead: int = OVERHEAD) -> dict:
    """Per-rank bytes for the plan's strategy on devices of ``mem`` bytes: the strategy's own memory model
    (``Strategy.memory``) over the plan's layout; its communication per step (``Strategy.comm``) and the
    projected step time (projection.py)."""
    cfg, cls, opts, lay = plan.cfg, plan.cls, plan.opts, plan.layout
    m = cls.memory(cfg, opts, lay, mem)
    if m is None:
        raise ValueError(f"{cls.__name__} does not predict its memory (not predicted)")
    m = dict(m)
    stages = m.pop("stages", None)  # pipelines: every pipeline rank's parts (the row is the largest)
    r = {k: int(v) for k, v in m.items()}
    row = {"strategy": opts.name, "label": cls.label(cfg, opts), "devices": lay.world, "dp": lay.dp, "tp": lay.tp,
           "pp": lay.pp, **r, "model_state": r["params"] + r["grads"] + r["optimizer"], "overhead": overhead,
           "total": sum(r[k] for k in PARTS) + overhead}
    if stages:
        row["stage_totals"] = [int(sum(st[k] for k in PARTS) + overhead) for st in stages]
    comm = cls.comm(cfg, opts, lay)
    comm = None if comm is None else {k: float(v) for k, v in comm.items() if v}
    row.update(comm_by_kind=comm, comm_bytes=None if comm is None else int(sum(comm.values())), step_s=None)
    try:  # cached calibrations; a missing one is measured once (a line on stderr says so)
        if comm is None:
            raise ValueError("its backend does not predict its communication")
        row["projection"] = project_plan(plan, comm, r)
        row["step_s"] = row["projection"]["step_s"]
    except Exception as e:  # noqa: BLE001 - the memory estimate stands without a projection
        row["projection"] = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:200]}
    return row


def estimate_all(overrides: list[str]) -> dict:
    """Every preset in conf/strategy/ for these overrides; the configured one with its ``strategy.*`` overrides,
    the others as their yaml files say."""
    composed, chosen = compose_config(overrides)
    configured = build_plan(composed, explicit=explicit_keys(overrides, chosen))
    cfg = configured.cfg
    limit, source = parse_bytes(cfg.get("gpu_memory")), f"gpu_memory={cfg.get('gpu_memory')}"
    if limit is None:
        import torch

        if torch.cuda.is_available():
            limit, source = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
        else:
            source = "none (no CUDA device: no fit judged, no GPU allowance; set gpu_memory=80GB)"
    rows, notes, configs = [], [], {}
    for name in strategy_presets():
        configs[name] = pc = copy.deepcopy(cfg)  # the configured run's settings (adopted, derived), another preset
        OmegaConf.set_readonly(pc, False)
        if name != chosen:
            pc.strategy = preset(name)
    if not os.environ.get("PARALLELKIT_NO_PREDICTION"):  # every preset's framework time: one start-up
        framework.prefetch(list(configs.values()), project_plan)
    for name, pc in configs.items():
        plan, note = configured, None
        try:
            if name != chosen:
                try:  # a check that fails here (no GPU, chunks vs batch) still leaves an estimate worth showing
                    plan = build_plan(pc, quiet=True)
                except ConfigError as e:
                    note, plan = str(e), RunPlan.of(pc)
            row = estimate(plan, limit, OVERHEAD if limit else 0)  # the allowance is for a GPU
        except Exception as e:  # noqa: BLE001 - one preset that cannot be estimated must not hide the others
            notes.append(f"{name}: not estimated: {' '.join(str(e).split())}")
            continue
        fits = None if limit is None else row["total"] <= limit
        if limit is not None and "stage_totals" in row:
            row["stage_fits"] = [t <= limit for t in row["stage_totals"]]
        rows.append({**row, "configured": name == chosen, "fits": fits, "note": note})
    c = GPTConfig.from_cfg(cfg.model)
    return {"model": cfg.model.name, "params": c.num_params(), "world_size": cfg.world_size,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": c.seq_len, "precision": cfg.train.precision,
            "activation_checkpointing": bool(cfg.train.activation_checkpointing), "gpu_memory": limit,
            "gpu_memory_source": source, "rows": rows, "notes": notes, "assumptions": ASSUMPTIONS}


def render(rep: dict) -> str:
    import pandas as pd

    unit, div = ("GiB", GiB) if max(r["model_state"] for r in rep["rows"]) >= GiB / 8 else ("MiB", 2**20)
    g = lambda v: f"{v / div:,.2f}"  # noqa: E731
    staged = any(r.get("stage_totals") for r in rep["rows"])
    df = pd.DataFrame([{
        "strategy": ("* " if r["configured"] else "") + r["strategy"] + (" (!)" if r["note"] else ""),
        "label": r["label"], "devices": r["devices"], "model state": g(r["model_state"]), "buffers": g(r["buffers"]),
        "activations": g(r["activations"]), "total/rank": g(r["total"]),
        "offloaded": g(r["offloaded"]) if r["offloaded"] else "-",
        "fits": "-" if r["fits"] is None else ("yes" if r["fits"] else "no"),
        **({"total by stage": _by_stage(r, g)} if staged else {}),
        "comm/step": size(r["comm_bytes"]) if r["comm_bytes"] else "-" if r["comm_bytes"] == 0 else "not predicted", "step (proj.)": _secs(r["step_s"])}
        for r in rep["rows"]])
    mem = rep["gpu_memory"]
    limit = f"{mem / GiB:,.2f} GiB ({rep['gpu_memory_source']})" if mem else rep["gpu_memory_source"]
    ckpt = ", activation checkpointing" if rep["activation_checkpointing"] else ""
    return "\n".join([
        f"model {rep['model']} ({rep['params']:,} params), world_size {rep['world_size']}, micro-batch "
        f"{rep['micro_batch_size']} x seq {rep['seq_len']}, {rep['precision']}{ckpt}; {unit} per rank; "
        f"gpu_memory: {limit}",
        df.to_string(index=False), "* = the configured strategy; (!) = see below. " + rep["assumptions"],
        _projection_note(rep["rows"]),
        *(f"(!) {r['strategy']}: {r['note']}" for r in rep["rows"] if r["note"]), *(f"(!) {n}" for n in rep["notes"])])


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def _projection_note(rows: list[dict]) -> str:
    """How the configured row's step was projected (per-row figures are in --json), or why it was not."""
    r = next((r for r in rows if r["configured"]), rows[0])
    p = r.get("projection") or {}
    if "error" in p:
        return f"step (proj.): not projected: {p['error']}"
    why = "" if r["step_s"] is not None else " (no step projected: see the sources)"
    return (f"step (proj.) = forward + backward + optimizer + exposed comm + pipeline idle + framework{why}; {p.get('assumptions')}; sources ({r['strategy']}): "
            f"{p.get('source')}")


def _by_stage(r: dict, g) -> str:
    """Pipelines: each pipeline rank's total (stage 0 holds the embedding, the last the head), ' no' where it does
    not fit; the row's total is the largest."""
    fits = r.get("stage_fits") or [None] * len(r.get("stage_totals") or [])
    return " / ".join(g(t) + ("" if f is None or f else " no") for t, f in zip(r.get("stage_totals") or [], fits)) or "-"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
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
