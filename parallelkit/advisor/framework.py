"""Framework time: what a backend spends in a step beyond the projection's compute, optimizer traffic and
collective bytes, measured on a narrow copy of the run and added to the projection as its ``framework`` part.

The projection's other parts come from FLOPs, bytes and a collective model, so they scale with the model's width.
A backend's own cost does not: its hooks and Python between operators, the dispatch of a DTensor operator, the
waits of each of its many small collective calls, its flattening and bookkeeping. These grow with the number of
layers, tensors and calls, which the width leaves alone. So they are measured on a *narrow copy* of the run:

- the same strategy (its resolved options), world size, precision, depth (``n_layer``), architecture, heads and
  activation checkpointing, but a width of 8-16 per head (``d_model`` 64 for up to 4 heads), a vocabulary of 512,
  a sequence of at most 64 tokens, micro-batch 2 and synthetic data; trained for ``STEPS`` steps (``UNTIMED``
  untimed) at two schedules, a and 2a micro-batches per step (a: 1, or the pipeline's stages), all in one process
  group (``measure_all``: many strategies share one start-up, as ``tune`` and ``python -m parallelkit.calibrate
  --framework`` need);
- at each schedule the residual is the median timed step less the projection of that narrow run without this
  term; the two give a part per step (the optimizer's bookkeeping, a once-a-step gather) and a part per
  micro-batch (hooks and dispatch in forward and backward), so a run with m micro-batches per step has a residual
  of per_step + m x per_micro_batch, the line through the two schedules. Where it is positive, that is the run's
  framework time. Where it is negative, the projection charged the narrow copy more than it took: its
  collective waits (the calls a narrow copy makes are the run's, at the run's count), up to the narrow copy's
  projected exposed communication, are taken back from the run's (``overcharge``; ring attention's send/recv,
  projected 24-36% over its narrow copy's steps). A pair whose schedule of 2a stepped faster than that of a is
  the host's noise: both are trained again and their timed steps pooled (``_slower_with_more``, ``_pooled``);
- it is cached per strategy, world size, depth and machine (versions included), as the other calibrations are,
  and added as is to the projection of the full-width run.

The narrow runs also count the collective calls of a step by kind (their probe step; ``calls``): the projection
charges each call its latency, and each wait for a peer its run-like cost (projection.comm_seconds), at the full
run's compute between waits, which the narrow copy's short compute does not show.

What it cannot see: costs that grow with the bytes (a ZeRO-3 partition copy, an offload's host copies beyond the
optimizer's traffic). A Hugging Face model (``model.arch=hf``) has no narrow copy: no term, and a call per 25 MiB.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

import parallelkit.measure.calibrate as calibrate
from parallelkit.config.compose import CONF_DIR

STEPS, UNTIMED = 12, 3  # the narrow run's steps: 9 timed, after the warm-up steps
NARROW = {"vocab_size": 512, "seq_len": 64, "micro_batch_size": 2}
JOB_S = 60  # the spawn's deadline: a start-up allowance and this much per narrow run
PROJECTED_BY = 22  # the version of the projection its residuals are taken from: a new one measures them again
# (19: a pair that steps faster with more work is measured again, ``_slower_with_more``; 22: FairScale TP's waits
# placed, ``Strategy.wait_gaps``)


def narrow(cfg, accum: int | None = None):
    """The narrow copy of a resolved run config (see the module doc) at ``accum`` micro-batches per step (None: the
    run's), or None for a Hugging Face model."""
    m = cfg.model
    if m.get("arch") == "hf":
        return None
    heads = int(m.n_head)
    head_dim = max(8, math.ceil(64 / heads))
    head_dim += head_dim % 2  # RoPE rotates pairs
    shape = {"d_model": heads * head_dim, "vocab_size": NARROW["vocab_size"],
             "seq_len": min(int(m.seq_len), NARROW["seq_len"])}
    if m.get("d_ff") is not None:
        shape["d_ff"] = 4 * shape["d_model"]
    n = copy.deepcopy(cfg)
    OmegaConf.set_readonly(n, False)
    with open_dict(n):
        n.model.update(shape)
        n.model.name = f"{m.get('name', 'model')} (narrow)"
        n.data = OmegaConf.load(Path(CONF_DIR) / "data" / "synthetic.yaml")
        n.train.update(steps=STEPS, untimed_steps=UNTIMED, micro_batch_size=NARROW["micro_batch_size"],
                       global_batch_size=None, breakdown=False, instrument=False, tensorboard=False, timeout_s=None,
                       grad_accum=accum or cfg.train.grad_accum)
        n.checkpoint.update(dir=None, resume=None, every=0, save_final=False)
        n.preflight = False
        n.pop("hydra", None)
    return n


def key(cfg, processes: int) -> dict:
    """What the measurement depends on: the machine and versions, the strategy and the run's schedule."""
    from parallelkit.advisor import bench_comm
    from parallelkit.measure.host import versions
    from parallelkit.measure.metrics import cpu_threads

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    t, m = cfg.train, cfg.model
    comm = bench_comm.load_calibration(processes) if processes > 1 and device.type == "cpu" else None
    return {**calibrate.cache_key(t.precision, cpu_threads(processes), device), "versions": versions(),
            # the residual is taken from a projection with these collective timings: new ones measure it again
            "comm_measured_at": (comm or {}).get("measured_at"),
            "strategy": OmegaConf.to_container(cfg.strategy, resolve=True), "world_size": int(cfg.world_size),
            "arch": m.get("arch") or "gpt", "n_layer": int(m.n_layer), "n_head": int(m.n_head),
            "n_kv_head": m.get("n_kv_head"), "tie_weights": bool(m.get("tie_weights", True)),
            "activation_checkpointing": bool(t.activation_checkpointing),
            "narrow": NARROW, "steps": [STEPS, UNTIMED], "projected_by": PROJECTED_BY}


def cached(cfg, processes: int) -> dict | None:
    return calibrate.read_cache(key(cfg, processes), "framework")


def seconds(cfg, processes: int, measure: bool = True, project=None) -> tuple[float | None, str]:
    """(framework seconds per step, where they come from) for a resolved run config; measured now (one start-up
    of the run's processes, seconds) when not cached and ``measure``."""
    from parallelkit.config.env import under_torchrun

    if narrow(cfg) is None:
        return None, "not measured for a Hugging Face model (no narrow copy)"
    entry = cached(cfg, processes)
    if entry is None and measure and not under_torchrun():  # a torchrun job's ranks: never a second set of processes
        entry = measure_all([cfg], project)[0]
    if entry is None:
        return None, ("not measured (none cached for this strategy: python -m parallelkit.calibrate --framework "
                      "with the run's overrides, on one node)")
    if entry.get("error"):
        return None, f"its narrow run failed: {entry['error']}"
    m = int(cfg.train.grad_accum)
    (a1, t1, p1), (a2, t2, p2) = entry["schedules"]
    over = _overcharge(entry, m)
    return max(0.0, _net(entry, m)), (
        f"measured: {_parts(entry)}, from a narrow copy ({entry['d_model']} wide, {entry['n_layer']} layers) stepped in "
        f"{t1 * 1e3:.1f} and {t2 * 1e3:.1f} ms at {a1} and {a2} micro-batches, projected without it "
        f"{p1 * 1e3:.1f} and {p2 * 1e3:.1f} ms ({entry['measured_at']})"
        + (f"; below its projection: {over * 1e3:.1f} ms of its collective waits taken back from the run's exposed "
           f"communication" if over else ""))


def _parts(entry: dict) -> str:
    """'4.5 ms a step + 1.2 ms a micro-batch' (either may be below 0: the line through the two residuals)."""
    mb = entry["per_micro_batch_s"] * 1e3
    return f"{entry['per_step_s'] * 1e3:.1f} ms a step {'-' if mb < 0 else '+'} {abs(mb):.1f} ms a micro-batch"


def _line(entry: dict, values: list[float], m: int) -> float:
    """The value at m micro-batches on the line through the narrow copy's two schedules."""
    (a1, *_), (a2, *_) = entry["schedules"]
    return values[0] + (m - a1) * (values[1] - values[0]) / (a2 - a1)


def _net(entry: dict, m: int) -> float:
    """The narrow copy's residual at m micro-batches: per step + m x per micro-batch."""
    return entry["per_step_s"] + m * entry["per_micro_batch_s"]


def _overcharge(entry: dict, m: int) -> float:
    """Seconds of collective waits the projection charges a run of m micro-batches beyond what they take, as its
    narrow copy showed: its residual's negative part, at most the narrow copy's projected exposed communication."""
    net = _net(entry, m)
    if net >= 0 or not entry.get("narrow_comm_s"):
        return 0.0
    return min(-net, max(0.0, _line(entry, entry["narrow_comm_s"], m)))


def overcharge(cfg, processes: int) -> float:
    """``_overcharge`` of the cached narrow copy of this run (0 when there is none)."""
    entry = cached(cfg, processes) if narrow(cfg) is not None else None
    if not entry or entry.get("error") or "schedules" not in entry:
        return 0.0
    return _overcharge(entry, int(cfg.train.grad_accum))


def calls(cfg, processes: int) -> dict[str, float] | None:
    """The collective calls per step by kind of a run with the config's micro-batches: the narrow copy's counts
    (its probe step, the busiest rank) at its two schedules give a part per step and a part per micro-batch, as
    its time does. None: not measured (or measured before the counts were kept)."""
    entry = cached(cfg, processes)
    if not entry or entry.get("error") or not entry.get("calls"):
        return None
    c1, c2 = entry["calls"]
    m = int(cfg.train.grad_accum)
    return {k: max(0.0, _line(entry, [c1.get(k, 0), c2.get(k, 0)], m)) for k in set(c1) | set(c2)}


def counted_calls(summary: dict) -> dict[str, int]:
    """{kind: calls} a run's probe step counted, on its busiest rank."""
    out: dict[str, int] = {}
    for rank in summary.get("comm_by_kind") or []:
        for kind, v in (rank or {}).items():
            out[kind] = max(out.get(kind, 0), int(v.get("calls", 0)))
    return out


def prefetch(cfgs: list, project) -> None:
    """Measure, in one process group, the framework time of those composed configs (planned here) that will
    project with one and have none cached: what ``tune`` does before it predicts its candidates."""
    from parallelkit.runtime.plan import build_plan

    todo, seen = [], set()
    for cfg in cfgs:
        try:
            plan = build_plan(cfg, quiet=True)
        except Exception:  # noqa: BLE001 - the candidate's own check says why, later
            continue
        c = plan.cfg
        if OmegaConf.select(c, "projection.framework") is False or narrow(c) is None \
                or OmegaConf.select(c, "projection.device"):
            continue
        k = json.dumps(key(c, plan.layout.processes), sort_keys=True)  # micro-batch sizes share one
        if k not in seen and cached(c, plan.layout.processes) is None:
            seen.add(k)
            todo.append(c)
    if todo:
        measure_all(todo, project)


def sweep_configs(argv: list[str]) -> list:
    """A sweep's jobs' composed configs (those that compose; none for a sweep of one job), for what is measured
    once before its first job: the jobs' framework times in one process group (``prefetch``, else each job would
    measure its own, a start-up each), and fresh training rates."""
    from parallelkit.config.compose import compose_config
    from parallelkit.config.sweep import sweep_jobs

    jobs = sweep_jobs(argv)
    if len(jobs) < 2:
        return []
    cfgs = []
    for job in jobs:
        try:
            cfgs.append(compose_config(job)[0])
        except Exception:  # noqa: BLE001 - the job itself reports it
            continue
    return cfgs


def _train_all(rank: int, run_dirs: list[str]) -> None:
    """One rank of the narrow runs, one after another in this process group; a run that fails writes its error."""
    import dataclasses
    import os

    from parallelkit.config.plan import RunPlan
    from parallelkit.measure.results import base_summary
    from parallelkit.runtime.loop import init_distributed, train
    from parallelkit.util.jsonio import write_json

    log = open(Path(run_dirs[0]).parent / f"rank{rank}.log", "w")  # the narrow runs' progress: not the user's run
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    ctx0 = None
    for d in map(Path, run_dirs):
        plan = RunPlan.load(d)
        ctx0 = ctx0 or init_distributed(plan.layout)
        try:
            s = train(plan, dataclasses.replace(ctx0, layout=plan.layout), d, base_summary(plan))
        except Exception as e:  # noqa: BLE001 - the next run still runs; this one says why
            s = {"status": "failed", "error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
        if rank == 0:
            write_json(d / "summary.json", s)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the backends' teardown at exit: the group has done its work


def measure_all(cfgs: list, project, quiet: bool = False) -> list[dict | None]:
    """Measure (and cache) the framework time of each resolved run config, its narrow copies trained one after
    another in one process group per process count. Returns each one's entry (None: no narrow copy).
    ``project``: projection.project_plan, which the narrow runs' residuals are taken from (passed in by the
    callers, so that the projection, which reads this module's cache, is not imported back from here)."""
    from parallelkit.config.plan import planned_strategy
    from parallelkit.runtime.plan import build_plan

    out: list[dict | None] = [None] * len(cfgs)
    todo: dict[int, list[tuple[int, object, dict]]] = {}  # processes -> (index, narrow plan, key), two a config
    for i, cfg in enumerate(cfgs):
        if narrow(cfg) is None:
            continue
        try:
            a = planned_strategy(cfg)[2].pp  # micro-batches per step: a pipeline's stages, else 1; then twice that
            plans = [build_plan(narrow(cfg, a * k), quiet=True) for k in (1, 2)]
        except Exception as e:  # noqa: BLE001 - a strategy that cannot take the narrow shape: said, not fatal
            out[i] = {"error": f"no narrow copy ({' '.join(str(e).split())[:200]})"}
            continue
        k = key(cfg, plans[0].layout.processes)
        todo.setdefault(plans[0].layout.processes, []).extend((i, p, k) for p in plans)
    for procs, jobs in todo.items():
        if not quiet:
            n = len(jobs) // 2
            print(f"parallelkit: measuring the framework time of {n} strateg{'y' if n == 1 else 'ies'} on narrow "
                  f"copies of the model ({procs} process{'es' if procs > 1 else ''}, two schedules each; cached for "
                  f"later)", file=sys.stderr, flush=True)
        # model-parallel backends last: some leave global state (FairScale's and DeepSpeed's model-parallel groups)
        # that a later backend in the same processes trips on; what fails in company is run again on its own
        jobs.sort(key=lambda job: job[1].layout.tp * job[1].layout.pp > 1)
        done = _run_group(jobs, procs)
        retry = [job for job, s in zip(jobs, done) if s.get("status") != "ok"]
        if retry and len(retry) < len(jobs):
            again = dict(zip((id(j) for j in retry), _run_group(retry, procs)))
            done = [again.get(id(j), s) for j, s in zip(jobs, done)]
        # a config whose schedule of twice the micro-batches stepped faster than its schedule of one measured the
        # host, not the backend (zero1's narrow copy once: 32.7 ms a step at one micro-batch, 27.4 at two, and a
        # framework time 7 ms over zero2's): both of its runs are trained again, the schedule of two first (the
        # first run in a new process group can be the slower), and their timed steps pooled
        faster = [k for j in range(0, len(jobs), 2) if not _slower_with_more(done[j:j + 2]) for k in (j + 1, j)]
        if faster:
            if not quiet:
                print(f"parallelkit: {len(faster) // 2} of them stepped faster at twice the micro-batches: "
                      f"measured again", file=sys.stderr, flush=True)
            for k, s in zip(faster, _run_group([jobs[k] for k in faster], procs)):
                done[k] = _pooled(done[k], s)
        for j in range(0, len(jobs), 2):
            (i, _, k), runs = jobs[j], done[j:j + 2]
            bad = next((s for s in runs if s.get("status") != "ok"), None)
            entry = {"error": bad.get("error") or bad.get("status")} if bad else _entry(jobs[j:j + 2], runs, project)
            entry["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            calibrate.write_cache(k, entry, "framework")
            out[i] = {"key": k, **entry}
    return out


def _slower_with_more(runs: list[dict]) -> bool:
    """Whether a config's two narrow runs (a and 2a micro-batches a step) stepped as more work must: the second no
    faster than the first. True where either failed (nothing to measure again)."""
    if any(s.get("status") != "ok" or not s.get("step_times_s") for s in runs):
        return True
    one, two = (statistics.median(s["step_times_s"]) for s in runs)
    return two >= one


def _pooled(first: dict, again: dict) -> dict:
    """A narrow run's summary with the timed steps of its run again added, so that its median spans both (the
    first alone if the second did not end ok)."""
    if again.get("status") != "ok" or not again.get("step_times_s"):
        return first
    return {**first, "step_times_s": [*first["step_times_s"], *again["step_times_s"]]}


def _entry(jobs: list, runs: list[dict], project) -> dict:
    """The cache entry of one config from its two narrow runs: the framework time per step and per micro-batch."""
    sched, counts, comm_s = [], [], []
    for (_, plan, _), s in zip(jobs, runs):
        comm = plan.cls.comm(plan.cfg, plan.opts, plan.layout) or {}
        parts = plan.cls.memory(plan.cfg, plan.opts, plan.layout, None)
        counts.append(counted_calls(s))
        proj = project(plan, {kind: v for kind, v in comm.items() if v}, parts, framework=False, calls=counts[-1])
        sched.append((int(plan.cfg.train.grad_accum), statistics.median(s["step_times_s"]), proj["step_s"] or 0.0))
        comm_s.append(proj["parts_s"]["exposed_comm"] or 0.0)
    (a1, t1, p1), (a2, t2, p2) = sched
    r1, r2 = t1 - p1, t2 - p2  # what the projection leaves out at each schedule (below 0: what it charges over)
    per_mb = (r2 - r1) / (a2 - a1)
    plan = jobs[0][1]
    return {"per_step_s": r1 - a1 * per_mb, "per_micro_batch_s": per_mb, "schedules": sched, "calls": counts,
            "narrow_comm_s": comm_s, "d_model": int(plan.cfg.model.d_model), "n_layer": int(plan.cfg.model.n_layer)}


def _run_group(jobs: list, procs: int) -> list[dict]:
    """Train the narrow plans of ``jobs`` one after another in one spawn of ``procs`` processes: their summaries
    (a failed one's status and error)."""
    from parallelkit.runtime.processes import spawn
    from parallelkit.util.jsonio import read_json

    with tempfile.TemporaryDirectory(prefix="parallelkit-framework-") as tmp:
        dirs = []
        for j, (_, plan, _) in enumerate(jobs):
            plan.save(Path(tmp) / str(j))
            dirs.append(str(Path(tmp) / str(j)))
        why = ""
        try:
            spawn(_train_all, procs, dirs, timeout=JOB_S * (1 + len(jobs)))
        except Exception as e:  # noqa: BLE001 - a run that hung or killed its group: those without a summary say so
            why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        out = []
        for d in dirs:
            try:
                out.append(read_json(Path(d) / "summary.json"))
            except (OSError, ValueError):
                out.append({"status": "failed", "error": why or "the narrow run wrote no summary"})
        return out


def main(argv: list[str], project) -> None:
    """``python -m parallelkit.calibrate --framework [--force] [overrides]``: every preset (that can run here) at
    the overrides' world size, depth and precision: those not cached (``--force``: all) measured in one process
    group, then each one's two parts."""
    from parallelkit.config.compose import compose_config, preset, strategy_presets
    from parallelkit.runtime.plan import build_plan

    force = "--force" in argv
    base, _ = compose_config([a for a in argv if a != "--force"])
    plans = {}
    for name in strategy_presets():
        c = copy.deepcopy(base)
        OmegaConf.set_readonly(c, False)
        c.strategy = preset(name)
        try:
            plans[name] = build_plan(c, quiet=True)
        except Exception as e:  # noqa: BLE001 - e.g. a GPU-only backend here
            print(f"  {name}: not measured: {' '.join(str(e).split())[:160]}")
    todo = {n: p for n, p in plans.items() if force or cached(p.cfg, p.layout.processes) is None}
    t0 = time.perf_counter()
    fresh = dict(zip(todo, measure_all([p.cfg for p in todo.values()], project))) if todo else {}
    for name, p in plans.items():
        e = fresh.get(name) if name in todo else cached(p.cfg, p.layout.processes)
        got = "no narrow copy" if e is None else e.get("error") or _parts(e)
        print(f"  {name}: {got}{'' if name in todo else ' (cached)'}")
    print("  (the line through the narrow copy's residuals at its two schedules; where a run's micro-batches put it "
          "below 0, no framework time, and that much of its collective waits is taken back)")
    print(f"parallelkit: framework time of {len(plans)} strategies, {len(todo)} measured now in "
          f"{time.perf_counter() - t0:.0f} s (--force: all of them)")
