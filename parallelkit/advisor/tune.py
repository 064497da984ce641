"""``python -m parallelkit.tune [overrides]``: the fastest way to train the configured model on its world size.

1. Candidates: every preset in conf/strategy (or ``tune.strategies``; ``single`` only when listed, since it
   uses one device, not world_size), less those whose options equal another's (sweep.distinct_presets), x
   micro-batch sizes at one fixed global batch G (``train.global_batch_size``, else micro-batch x grad_accum x
   dp of the configured run; ``tune.micro_batch_sizes``, else every divisor of G / dp; a size that does not
   divide G / dp of a candidate's own layout is dropped), x ``tune.activation_checkpointing``.
2. Pruned before anything runs (a row each, with the reason): a config check that fails (the plan builder, runtime/plan.py),
   a predicted peak per rank over what a rank has (predict.fits: with predict.MARGIN). With ``gpu_memory`` on
   a machine without CUDA the tune plans for a GPU cluster: the predicted device bytes (model state, buffers,
   activations; neither offloaded state nor the CPU process's own footprint) against gpu_memory less the CUDA
   context; otherwise the predicted peak against what this machine gives a rank (predict.available_per_rank).
3. Measured: each survivor as its own ``python -m parallelkit.run`` (the same launcher: fresh processes and
   process group), ``tune.steps`` steps of which 2 untimed, ``train.timeout_s`` = the smaller of
   ``tune.trial_timeout_s`` and the budget left less LAUNCH_S, ``preflight=false`` (judged above). Likely best
   first (ORDER), and no trial is started that the budget left cannot see to its end (``need``: its steps at its
   predicted step time, plus what the finished trials took beyond their steps), so that none is stopped by its
   timeout a step short of a measurement.
4. Written to the tune dir (``hydra.run.dir=DIR``, default outputs/tune/<time>): a folder per trial, the sweep
   report of the measured trials (report.write_report: comparison.md, .csv, .html, plots) and tune.md /
   tune.csv with every candidate and the winner as a ready-to-run command.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from parallelkit.advisor import framework
from parallelkit.advisor.predict import (
    CUDA_CONTEXT,
    MARGIN,
    available_per_rank,
    fits,
    judged,
    on_cuda,
    predict,
)
from parallelkit.advisor.projection import project_plan, refresh_rates
from parallelkit.config.checks import _int, _num, parse_bytes
from parallelkit.config.compose import (
    STRATEGY_DIR,
    check_keys,
    compose_config,
    explicit_keys,
    preset,
)
from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import divisors
from parallelkit.config.plan import planned_strategy, strategy_class
from parallelkit.config.sweep import distinct_presets
from parallelkit.runtime.launch import (
    SIGNALS,
    Interrupted,
    raise_on_signals,
    with_package_path,
)
from parallelkit.runtime.plan import build_plan
from parallelkit.util.units import gib

UNTIMED = 2  # untimed steps per trial
LAUNCH_S = 5  # allowance for a trial's start and end outside train.timeout_s (Python, Hydra, the checks): 3.1 s
# measured (a trial stopped by train.timeout_s=21 took 24.1 s)
FIRST_TRIAL_S = 20  # the least budget left to start the first trial (later ones: ``need``)
STEP_MARGIN = 1.1  # a trial's steps are allowed its predicted step time and this much more (the projection's 10%)
ORDER = ("predicted step time, fastest first",
         "no step-time prediction, so: activation checkpointing off first (it recomputes the forward), then nothing "
         "offloaded, then fewer micro-batches per step (grad_accum), then fewer predicted communication bytes per "
         "step, then a lower predicted peak")
LISTS = ("tune.strategies", "tune.micro_batch_sizes", "tune.activation_checkpointing")
SET_PER_TRIAL = {"strategy", "model", "world_size", "preflight", "repeats", "train.micro_batch_size",
                 "train.grad_accum", "train.global_batch_size", "train.activation_checkpointing", "train.steps",
                 "train.untimed_steps", "train.warmup_steps", "train.timeout_s"}


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def _candidate(name: str) -> bool:
    """A preset the tune measures unless told otherwise (its class says; a class that cannot load: no)."""
    try:
        return strategy_class(OmegaConf.create({"strategy": preset(name)})).candidate
    except ConfigError:
        return False


def settings(cfg) -> dict:
    """The ``tune.*`` keys, checked (ConfigError, one line)."""
    _num(cfg, "tune.budget_s")
    _int(cfg, "tune.steps", UNTIMED + 1)
    _int(cfg, "tune.trial_timeout_s")
    _int(cfg, "tune.finalists", 1)
    _int(cfg, "tune.repeats", 0)
    t = OmegaConf.to_container(cfg.tune)
    names = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))
    strategies = t["strategies"] if t["strategies"] is not None else [n for n in names if _candidate(n)]
    strategies = [strategies] if isinstance(strategies, str) else strategies
    bad = [s for s in strategies if s not in names] if isinstance(strategies, list) else [strategies]
    if bad or not strategies:
        raise ConfigError(f"tune.strategies={t['strategies']!r}: no such strategy {bad[0] if bad else '(none given)'}; "
                          f"list presets of conf/strategy: {', '.join(names)}")
    sizes = t["micro_batch_sizes"]
    sizes = [sizes] if isinstance(sizes, int) and not isinstance(sizes, bool) else sizes
    if sizes is not None and (not isinstance(sizes, list) or not sizes or
                              any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in sizes)):
        raise ConfigError(f"tune.micro_batch_sizes={t['micro_batch_sizes']!r}: give null (every divisor of the "
                          f"per-rank batch) or a list of integers >= 1, e.g. [1,2,4]")
    ckpt = t["activation_checkpointing"]
    ckpt = [ckpt] if isinstance(ckpt, bool) else ckpt
    if not isinstance(ckpt, list) or not ckpt or any(not isinstance(c, bool) for c in ckpt):
        raise ConfigError(f"tune.activation_checkpointing={t['activation_checkpointing']!r}: give true, false or "
                          f"[false,true]")
    return {**t, "strategies": strategies, "micro_batch_sizes": sizes, "activation_checkpointing": ckpt}


def split_args(argv: list[str]) -> tuple[Path, list[str], list[str]]:
    """(the tune dir, the overrides to compose, those every trial keeps: the user's model, seed, data, ...).
    ``tune.strategies=ddp,zero2`` is read as the list ``[ddp,zero2]`` (likewise the other list keys)."""
    argv = [f"{a.split('=', 1)[0]}=[{a.split('=', 1)[1]}]" if _key(a) in LISTS and "," in a and "=[" not in a else a
            for a in argv]
    for a in argv:
        if _key(a).startswith("strategy."):
            raise ConfigError(f"{a}: the tune searches presets, not options; list presets in tune.strategies=[...] "
                              f"(add one as conf/strategy/NAME.yaml)")
    if (err := check_keys(argv)) is not None:  # compose_config checks the group choices
        raise ConfigError(err)
    out = next((a.split("=", 1)[1] for a in argv if _key(a) == "hydra.run.dir"), None)
    out = Path(out or f"outputs/tune/{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    overrides = [a for a in argv if _key(a) != "hydra.run.dir"]
    keep = [a for a in overrides if _key(a) not in SET_PER_TRIAL and not _key(a).startswith(("tune.", "hydra."))]
    return out, overrides, keep


def _row(strategy: str, **kw) -> dict:
    return {"strategy": strategy, "label": strategy, "micro_batch_size": None, "grad_accum": None,
            "activation_checkpointing": None, "dp": None, "status": "pruned", "why": "", "tokens_per_s": None,
            "step_time_s": None, "peak_mem_bytes": None, "comm_bytes_per_step": None, "predicted_peak_mem_bytes": None,
            "judged_bytes": None, "available_bytes": None, "predicted_comm_bytes_per_step": None,
            "predicted_offloaded_bytes": None, "predicted_step_time_s": None, "trial_s": None, "run": None,
            "tokens_per_s_lo": None, "tokens_per_s_hi": None, "trials": None, "samples": None, **kw}


def candidates(argv: list[str]) -> tuple[dict, list[dict]]:
    """The search (its settings and facts) and a row per candidate: pruned, or ``todo`` in the order to measure."""
    from parallelkit.models.gpt import GPTConfig

    out, overrides, keep = split_args(argv)
    composed, chosen = compose_config(overrides)
    plan = build_plan(composed, explicit=explicit_keys(overrides, chosen))
    cfg, configured = plan.cfg, plan.layout
    s = settings(cfg)
    G = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum * configured.data_ranks
    gpu = parse_bytes(cfg.get("gpu_memory"))
    planning = gpu is not None and not on_cuda()
    if planning:
        how = (f"gpu_memory={cfg.gpu_memory} per rank less {CUDA_CONTEXT / 2**30:.0f} GiB for the CUDA context, "
                  f"against the predicted device bytes (model state, buffers, activations; not offloaded state nor "
                  f"the CPU process); planning for a GPU cluster, so the trials here measure speed, not that fit")
    else:
        how = f"{available_per_rank(cfg, configured.processes)[1]} (one-process strategies: all of it)"
    tune = {"dir": out, "keep": keep, "model": cfg.model.name, "params": GPTConfig.from_cfg(cfg.model).num_params(),
            "world_size": cfg.world_size, "global_batch": G, "precision": cfg.train.precision, "judged": how,
            "planning": planning, **s}
    # a named variant (zero2, fsdp_zero3) is kept over the base preset with the same options (deepspeed, fsdp)
    kept, same = distinct_presets(sorted(s["strategies"], key=lambda n: (not explicit_keys([], n), n)))
    rows, judge = [_row(a, why=f"same as {b}") for a, b in same.items()], []
    for name in kept:
        base = copy.deepcopy(cfg)  # the configured run's settings (adopted, derived), another preset
        OmegaConf.set_readonly(base, False)
        base.strategy = preset(name)
        base.train.global_batch_size, base.train.steps, base.train.untimed_steps = G, s["steps"], UNTIMED
        try:
            dp = planned_strategy(base)[2].data_ranks
        except ConfigError as e:
            rows.append(_row(name, why=f"config: {e}"))
            continue
        sizes = [m for m in s["micro_batch_sizes"] or divisors(max(1, G // dp)) if G % (m * dp) == 0]
        if not sizes:
            rows.append(_row(name, dp=dp, why=f"config: no micro-batch size of {s['micro_batch_sizes'] or 'any'} "
                                              f"divides the global batch {G} over dp {dp}"))
        for ckpt in s["activation_checkpointing"]:
            for mb in sizes:
                pc = base.copy()
                pc.train.micro_batch_size, pc.train.activation_checkpointing = mb, ckpt
                judge.append((pc, name, dp, mb, ckpt))
    if not os.environ.get("PARALLELKIT_NO_PREDICTION"):
        # every candidate's rates measured together, as a sweep's: a proxy cached at another hour's load orders its
        # candidates against the others by that load (checkpointing's, measured an hour apart, came out faster)
        refresh_rates([j[0] for j in judge])
        framework.prefetch([j[0] for j in judge], project_plan)  # every candidate's framework time: one start-up
    rows += [_judge(*j, gpu if planning else None) for j in judge]
    rows = _collapse(rows)
    todo = [r for r in rows if r["status"] == "todo"]
    by_time = bool(todo) and all(r["predicted_step_time_s"] is not None for r in todo)
    todo.sort(key=(lambda r: r["predicted_step_time_s"]) if by_time else
              lambda r: (r["activation_checkpointing"], bool(r["predicted_offloaded_bytes"]), r["grad_accum"] or 0,
                         r["predicted_comm_bytes_per_step"] or 0, r["predicted_peak_mem_bytes"] or 0))
    tune["order"] = ORDER[0] if by_time else ORDER[1]
    return tune, todo + [r for r in rows if r["status"] != "todo"]


def _collapse(rows: list[dict]) -> list[dict]:
    """A preset pruned for the same reason at every size: one row."""
    out = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == name]
        if len(mine) > 1 and {r["status"] for r in mine} == {"pruned"} and len({r["why"] for r in mine}) == 1:
            mine = [_row(name, label=mine[0]["label"], dp=mine[0]["dp"], why=mine[0]["why"])]
        out += mine
    return out


def _judge(pc, name: str, dp: int, mb: int, ckpt: bool, gpu: int | None) -> dict:
    """One candidate's row: pruned by the config check or the memory prediction, else ``todo``."""
    r = _row(name, micro_batch_size=mb, activation_checkpointing=ckpt, dp=dp)
    try:
        plan = build_plan(pc, quiet=True)  # grad_accum follows from the global batch
        r.update(label=plan.label, grad_accum=plan.cfg.train.grad_accum)
        p = predict(plan, baseline=gpu is None)
    except ConfigError as e:
        return {**r, "why": f"config: {e}"}
    except Exception as e:  # noqa: BLE001 - a candidate that cannot be predicted is measured unjudged
        return {**r, "status": "todo", "why": f"not predicted: {' '.join(str(e).split())[:200]}"}
    used, avail, _ = judged(plan, p)  # planning for a GPU (gpu_memory, no CUDA): device bytes only
    r.update(predicted_peak_mem_bytes=p["peak_mem_bytes"], judged_bytes=used, available_bytes=avail,
             predicted_comm_bytes_per_step=p["comm_bytes_per_step"] or None, predicted_step_time_s=p["step_time_s"],
             predicted_offloaded_bytes=p["offloaded_bytes"])
    if not fits(used, avail):
        return {**r, "why": f"predicted {gib(used)}/rank > {gib(avail)} available"}
    return {**r, "status": "todo", "why": f"predicted {gib(used)}/rank > {gib(avail)} available, within the "
                                          f"estimator's margin" if used > avail else ""}


# ---- measuring ----
def run_args(tune: dict, r: dict) -> list[str]:
    """The overrides of ``python -m parallelkit.run`` for candidate ``r``: its choices and the user's others."""
    return [f"strategy={r['strategy']}", f"model={tune['model']}", f"world_size={tune['world_size']}",
            f"train.micro_batch_size={r['micro_batch_size']}", f"train.global_batch_size={tune['global_batch']}",
            f"train.activation_checkpointing={str(r['activation_checkpointing']).lower()}", *tune["keep"]]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a trial: the run's own signal handling ends its workers and writes its summary (SIGKILL after 60 s)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def trial(tune: dict, r: dict, n: int | str, left: float) -> None:
    """Run candidate ``r`` as trial ``n`` with ``left`` seconds of budget; its summary fills the row."""
    from parallelkit.report.compare import _max
    from parallelkit.util.jsonio import read_json

    tag = f"{n:02d}" if isinstance(n, int) else n
    run = tune["dir"] / f"{tag}_{_name(r).replace(' mb=', '_mb').replace(' ', '_')}"
    run.mkdir(parents=True, exist_ok=True)
    timeout = max(1, int(min(tune["trial_timeout_s"], left - LAUNCH_S)))
    cmd = [sys.executable, "-m", "parallelkit.run", *run_args(tune, r), f"train.steps={tune['steps']}",
           f"train.untimed_steps={UNTIMED}", f"train.timeout_s={timeout}", "preflight=false", f"hydra.run.dir={run}"]
    start, over, stopped = time.monotonic(), None, False
    with open(run / "run.log", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        # the trial makes no predictions of its own: the tune has made them, and a run's would measure the
        # training rates again beside it (RATES_FRESH_S), seconds of the budget between trials
        env = with_package_path({**os.environ, "PARALLELKIT_NO_PREDICTION": "1"})
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:  # its own timeout did not stop it in time: the budget is spent
            over, stopped = f"stopped: tune.budget_s={tune['budget_s']} ran out", True
            _stop(proc)
        except Interrupted:
            stopped = True
            _stop(proc, signal.SIGINT)
            raise
        finally:
            r.update(trial_s=time.monotonic() - start, run=str(run))
            try:
                s = read_json(run / "summary.json")
            except (OSError, ValueError):  # a run stopped before it launched its workers writes none
                s = {"status": "interrupted" if stopped else "failed",
                     "error": f"no summary.json (exit code {proc.returncode}); see {run}/run.log"}
            r.update(status=s.get("status") or "failed", why=over or s.get("error") or "",
                     label=s.get("label") or r["label"], tokens_per_s=s.get("tokens_per_s"),
                     step_time_s=s.get("step_time_s"), peak_mem_bytes=_max(s.get("peak_mem_bytes")),
                     comm_bytes_per_step=_max(s.get("comm_bytes_per_step")))


def need(r: dict, done: list[dict], steps: int) -> float:
    """Seconds of budget a trial of ``r`` needs to end within its timeout: LAUNCH_S, what the finished trials took
    beyond their steps (start-up, the untimed steps' warm-up, the end: their median), and ``steps`` at ``r``'s step
    time (measured, else predicted) x STEP_MARGIN. Without a step time or a trial that ended ok: the median of
    the finished trials' durations (FIRST_TRIAL_S before the first)."""
    ok = [d for d in done if d["status"] == "ok" and d.get("step_time_s") and d.get("trial_s")]
    step = r.get("step_time_s") or r.get("predicted_step_time_s")
    if step and ok:
        beyond = statistics.median(d["trial_s"] - steps * d["step_time_s"] for d in ok)
        return LAUNCH_S + max(0.0, beyond) + steps * step * STEP_MARGIN
    durations = [d["trial_s"] for d in done if d.get("trial_s")]
    return statistics.median(durations) if durations else FIRST_TRIAL_S


def measure(tune: dict, rows: list[dict], deadline: float) -> None:
    """Trials in row order until the budget cannot see the next to its end (``need``; rows are ordered fastest
    predicted first, so neither could the later ones); the rest: 'budget: not measured'."""
    todo = [r for r in rows if r["status"] == "todo"]
    done: list[dict] = []
    reason = "budget: not measured"
    try:
        for n, r in enumerate(todo, 1):
            left = deadline - time.monotonic()
            if left < (need_s := need(r, done, tune["steps"])):
                print(f"tune: {max(0, left):.0f} s of budget left, the next trial needs about {need_s:.0f} s: "
                      f"{len(todo) - n + 1} candidate(s) not measured", file=sys.stderr, flush=True)
                break
            print(f"trial {n}/{len(todo)}: {_name(r)} ...", end=" ", file=sys.stderr, flush=True)
            trial(tune, r, n, left)
            done.append(r)
            result = f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else r["why"][:120]
            print(f"{r['status']} {result} ({r['trial_s']:.0f} s); {max(0, deadline - time.monotonic()):.0f} s of "
                  f"budget left", file=sys.stderr, flush=True)
    except Interrupted as e:
        reason = f"{e.name}: not measured"
        raise
    finally:
        for r in rows:
            if r["status"] == "todo":
                r.update(status="not run", why="; ".join(filter(None, [reason, r["why"]])))


def remeasure(tune: dict, rows: list[dict], deadline: float) -> None:
    """The ``tune.finalists`` fastest trials measured again, ``tune.repeats`` rounds, interleaved (each finalist once a
    round, so a busy spell of the machine lands on all of them): each gets the median of its trials and their range.
    One 4-step trial each, one after another, is not enough to name a winner on a shared machine."""
    finalists = [r for r in ranked(rows) if r["status"] == "ok"][: tune["finalists"]]
    for r in finalists:
        r["samples"] = [r["tokens_per_s"]]
    if len(finalists) < 2 or not tune["repeats"]:
        return
    print(f"tune: measuring the {len(finalists)} fastest again, {tune['repeats']} round(s), interleaved",
          file=sys.stderr, flush=True)
    for k in range(1, tune["repeats"] + 1):
        for i, r in enumerate(finalists, 1):
            left = deadline - time.monotonic()
            if left < need(r, finalists, tune["steps"]):
                print(f"tune: budget left for no more re-measurement ({max(0, left):.0f} s)", file=sys.stderr)
                return _settle(finalists)
            again = dict(r)
            trial(tune, again, f"r{k}_{i:02d}", left)
            if again["status"] == "ok":
                r["samples"].append(again["tokens_per_s"])
            done = Path(again["run"]) / "summary.json"  # one row per candidate in the report: its first trial's
            if done.exists():
                done.rename(done.with_name("summary.retrial.json"))
    _settle(finalists)


def _settle(finalists: list[dict]) -> None:
    for r in finalists:
        s = [x for x in r.get("samples") or [] if x]
        if len(s) > 1:
            per_token = r["step_time_s"] * r["tokens_per_s"]  # tokens per step
            r.update(tokens_per_s=statistics.median(s), tokens_per_s_lo=min(s), tokens_per_s_hi=max(s), trials=len(s))
            r["step_time_s"] = per_token / r["tokens_per_s"]


def verdict(rows: list[dict]) -> str | None:
    """Whether the winner is ahead of the runner-up beyond the spread of their trials (None: fewer than 2 ok)."""
    ok = [r for r in ranked(rows) if r["status"] == "ok"]
    if len(ok) < 2:
        return None
    a, b = ok[0], ok[1]
    lo_a, hi_b = a.get("tokens_per_s_lo") or a["tokens_per_s"], b.get("tokens_per_s_hi") or b["tokens_per_s"]
    n = f"{a.get('trials') or 1} and {b.get('trials') or 1} trial(s)"
    if (a.get("trials") or 1) < 2 or (b.get("trials") or 1) < 2:
        return f"{_name(a)} is {a['tokens_per_s'] / b['tokens_per_s']:.2f}x {_name(b)} on single trials: not re-measured"
    if lo_a <= hi_b:
        return (f"{_name(a)} is within the noise of {_name(b)}: medians {a['tokens_per_s']:,.0f} vs "
                f"{b['tokens_per_s']:,.0f} tokens/s, ranges overlap ({n}); either will do")
    return (f"{_name(a)} is ahead of {_name(b)} beyond the noise: {lo_a:,.0f} tokens/s at its slowest vs "
            f"{hi_b:,.0f} at the runner-up's fastest ({n})")


# ---- the table ----
def _name(r: dict) -> str:
    if r["micro_batch_size"] is None:
        return r["strategy"]
    return f"{r['strategy']} mb={r['micro_batch_size']}" + (" ckpt" if r["activation_checkpointing"] else "")


def ranked(rows: list[dict]) -> list[dict]:
    """ok trials fastest first, then the other trials, the unmeasured and the pruned (each in their order)."""
    def key(r: dict) -> tuple:
        if r["status"] == "ok":
            return 0, -(r["tokens_per_s"] or 0)
        return (1 if r["run"] else 2 if r["status"] == "not run" else 3), 0

    return sorted(rows, key=key)


def table(tune: dict, rows: list[dict]):
    """Human units: tokens/s, step time, peak memory per rank (measured; else predicted), headroom against what a
    rank has (of the figure judged: measured when it was, planning for a GPU: the prediction), comm per step."""
    import pandas as pd

    from parallelkit.util.units import hbytes, hcount, htime

    def measured_else_predicted(v, p) -> str:
        return hbytes(v) if v is not None else f"{hbytes(p)} (pred.)" if p is not None else ""

    out = []
    for i, r in enumerate(rows, 1):
        peak = r["peak_mem_bytes"] if r["status"] == "ok" else None
        basis = r["judged_bytes"] if tune["planning"] or peak is None else peak
        headroom = r["available_bytes"] - basis if r["available_bytes"] and basis is not None else None
        spread = f" ({hcount(r['tokens_per_s_lo'])}-{hcount(r['tokens_per_s_hi'])}, {r['trials']} trials)" \
            if (r.get("trials") or 1) > 1 else ""
        out.append({"#": i, "candidate": _name(r), "tokens/s": hcount(r["tokens_per_s"]) + spread,
                    "step": htime(r["step_time_s"]), "pred. step": htime(r["predicted_step_time_s"]),
                    "peak/rank": measured_else_predicted(peak, r["judged_bytes"]),
                    "headroom": hbytes(headroom),
                    "comm/step": measured_else_predicted(r["comm_bytes_per_step"], r["predicted_comm_bytes_per_step"]),
                    "trial": htime(r["trial_s"]), "status": r["status"], "why": r["why"]})
    return pd.DataFrame(out)


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists (None under 3 pairs or when one list is constant)."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else None


def order_agreement(rows: list[dict]) -> str:
    """How well the projection ordered the measured candidates: Spearman's rank correlation of predicted and
    measured step times."""
    pairs = [(r["predicted_step_time_s"], r["step_time_s"]) for r in rows
             if r["status"] == "ok" and r["predicted_step_time_s"] and r["step_time_s"]]
    rho = rank_correlation(*map(list, zip(*pairs))) if pairs else None
    if rho is None:
        return f"predicted vs measured step time: no rank correlation ({len(pairs)} measured candidate(s) with both)"
    return f"predicted vs measured step time: Spearman rank correlation {rho:.2f} over {len(pairs)} measured candidates"


def winner_command(tune: dict, rows: list[dict]) -> str | None:
    best = next((r for r in ranked(rows) if r["status"] == "ok"), None)
    return None if best is None else shlex.join(["python", "-m", "parallelkit.run", *run_args(tune, best)])


def write(tune: dict, rows: list[dict], used_s: float) -> str:
    """tune.md and tune.csv (every candidate), the sweep report of the trials; returns the text printed."""
    import pandas as pd

    from parallelkit.report.compare import write_report

    out, rows = tune["dir"], ranked(rows)
    out.mkdir(parents=True, exist_ok=True)
    csv = pd.DataFrame([{"rank": i, "candidate": _name(r), **r} for i, r in enumerate(rows, 1)])
    counts = [c for c in csv.columns if c in ("micro_batch_size", "grad_accum", "dp") or c.endswith("_bytes")]
    csv.astype({c: "Int64" for c in counts}).to_csv(out / "tune.csv", index=False)
    measured = sum(1 for r in rows if r["run"])
    report = None
    if measured:
        try:
            report = write_report(out, echo=False)
        except Exception as e:  # noqa: BLE001 - the trials and tune.md are kept; say why the report is not
            print(f"parallelkit.report: could not write the report: {type(e).__name__}: {e}", file=sys.stderr)
    command = winner_command(tune, rows)
    head = [f"model {tune['model']} ({tune['params']:,} params), world_size {tune['world_size']}, global batch "
            f"{tune['global_batch']} (micro-batch x grad_accum x dp), {tune['precision']}; {len(rows)} candidates, "
            f"{measured} measured ({tune['steps']} steps, {UNTIMED} untimed), "
            f"{sum(r['status'] == 'pruned' for r in rows)} pruned, {sum(r['status'] == 'not run' for r in rows)} not "
            f"measured; {used_s:.0f} s of tune.budget_s={tune['budget_s']}",
            f"memory judged against: {tune['judged']}; pruned above {1 + MARGIN:.2f} x that (predict.MARGIN: the "
            f"prediction is an upper bound)", f"trial order: {tune['order']}", order_agreement(rows)]
    df = table(tune, rows)
    said = verdict(rows)
    md = ["# parallelkit tune", "", *(f"- {h}" for h in head), "", df.to_markdown(index=False), "",
          f"**winner**: `{command}`" if command else "**winner**: none (no trial ended ok)", "",
          *([f"**noise**: {said}", ""] if said else []),
          "Every candidate: [tune.csv](tune.csv)" + (f"; the measured trials' report: [{report.name}]({report.name})"
                                                     if report else ""), ""]
    (out / "tune.md").write_text("\n".join(md))
    short = df.assign(why=df["why"].str.slice(0, 100))
    win = f"winner: {command}" if command else "winner: none (no trial ended ok)"
    return "\n".join([*head, short.to_string(index=False), win, *([f"noise: {said}"] if said else []), f"written: {out / 'tune.md'} (also tune.csv"
                      + (f", {report.name} and the sweep report's files)" if report else ")")])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # backends' import-time chatter (DeepSpeed logs to stdout)
            tune, rows = candidates(argv)
    except ConfigError as e:
        print(f"parallelkit: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("parallelkit: interrupted: SIGINT before any trial", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    todo = sum(r["status"] == "todo" for r in rows)
    print(f"tune: {len(rows)} candidates, {len(rows) - todo} pruned, {todo} to measure in order within "
          f"tune.budget_s={tune['budget_s']} -> {tune['dir']}", file=sys.stderr, flush=True)
    stopped, before = None, {s: signal.getsignal(s) for s in SIGNALS}
    raise_on_signals()  # while trials run, a signal stops the one in progress and the table is still written
    try:
        measure(tune, rows, start + tune["budget_s"])
        remeasure(tune, rows, start + tune["budget_s"])
    except Interrupted as e:
        stopped = e
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    print(write(tune, rows, time.monotonic() - start), flush=True)
    if stopped is not None:
        print(f"parallelkit: interrupted: {stopped.name}; the trial in progress was stopped; the table of what "
              f"finished is in {tune['dir']}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    if any(r["run"] for r in rows) and not any(r["status"] == "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
