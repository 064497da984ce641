"""Benchmark, not a test: what parallelkit costs against hand-written loops, and what measuring costs.

    python experiments/bench_harness.py [--model small] [--seq-len 128] [--steps 12] [--warmup 2] [--micro 1]
                                        [--rounds 3] [--strategies single,ddp,...] [--out results/harness]

For every data-parallel strategy, three runs of the same model, data, global batch and optimizer:

* bare: the plainest correct loop for that backend (``experiments/bare_loops.py``), under
  ``torch.distributed.run --standalone`` (2 processes; 1 for ``single``);
* plain: parallelkit through its CLI with ``train.instrument=false`` (the default: timed steps
  run the backend's default code; communication and state are measured on an untimed probe);
* instrumented: the same with ``train.instrument=true`` (counters on every timed step).

Each run's median step time after the warm-up steps is taken (``step_time_s``; the same
``perf_counter`` around the step in all three). The runs are interleaved: round r runs bare,
plain, instrumented of strategy 1, then of strategy 2, ..., with the order of the strategies
and of the three variants rotated from round to round, so slow drifts of the machine's load
fall on all of them alike. Per strategy it reports the median over rounds of the per-round
ratios parallelkit / bare (issue 10) and instrumented / plain (issue 9), with their min-max
spread, the first-step losses of the bare loop and of parallelkit and their largest difference
(fp32: 0 or ~1e-7; more means the bare loop is not the same computation), and the load
average and CPU steal before and after each round. Writes ``OUT/bench.json`` (after every
round) and ``OUT/README.md``.

The defaults (``small``, seq 128, micro-batch 1, 12 steps of which 2 warm-up, 9 strategies,
3 rounds) make 81 launches: about 25 minutes on a quiet 2-core box, with the waits for the load to
settle between rounds (``--settle``). Ten timed steps, not four: single steps vary by +-15% there,
and four of them made per-round ratios that moved by 20% between rounds (results/harness, pooled
column). ``--rounds 2`` or fewer ``--strategies`` cut it
in proportion. The numbers are only as good as the quiet of the machine: run it with nothing
else running.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from parallelkit.config.compose import shipped_default  # noqa: E402

STRATEGIES = ("single", "ddp", "fsdp", "fsdp_zero2", "zero1", "zero2", "zero3", "fairscale_oss", "fairscale_oss_ddp")
OPTIONAL = ("fsdp_zero3", "zero0")  # also known to bare_loops.py
VARIANTS = ("bare", "plain", "instrumented")
WORLD = 2
RUN_TIMEOUT_S = 900


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs: steal is time the hypervisor gave to other guests."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def machine() -> dict:
    def first(path: str, key: str) -> str:
        try:
            return next((ln.split(":", 1)[1].strip() for ln in open(path) if ln.startswith(key)), "")
        except OSError:
            return ""

    mem = first("/proc/meminfo", "MemTotal").split()
    versions = {}
    for pkg in ("torch", "deepspeed", "fairscale", "hydra-core"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": first("/proc/cpuinfo", "model name") or "unknown", "cores": os.cpu_count(),
            "memory_gib": round(int(mem[0]) / 2**20, 1) if mem else None, "python": sys.version.split()[0],
            "versions": versions, "commit": git or None}


def overrides(args, strategy: str) -> list[str]:
    return [f"strategy={strategy}", f"model={args.model}", f"model.seq_len={args.seq_len}", f"train.steps={args.steps}",
            f"train.untimed_steps={args.warmup}", f"train.micro_batch_size={args.micro}", f"world_size={WORLD}"]


def compose(args, strategy: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides(args, strategy))


def bare_spec(args, strategy: str) -> dict:
    """Model, data, optimizer and schedule of the composed parallelkit config, for bare_loops.py; for DeepSpeed
    also the config parallelkit generates for the run (what it saves as deepspeed_config.json)."""
    from omegaconf import OmegaConf

    cfg = compose(args, strategy)
    c = OmegaConf.to_container(cfg, resolve=True)
    t = c["train"]
    if t["grad_accum"] != 1 or t["precision"] != "fp32" or t.get("global_batch_size"):
        sys.exit("bench_harness: the bare loops do fp32 without gradient accumulation; the config says otherwise")
    spec = {"strategy": strategy, "model": c["model"], "data": c["data"], "optim": c["optim"], "seed": c["seed"],
            "world_size": WORLD, "steps": t["steps"], "untimed_steps": t["untimed_steps"],
            "micro_batch_size": t["micro_batch_size"], "grad_clip": t["grad_clip"]}
    if "zero_stage" in c["strategy"]:
        try:
            from parallelkit.strategies.deepspeed.config import build_config

            spec["ds_config"] = build_config(cfg)[0]
        except Exception as e:  # noqa: BLE001 - the bare loop then writes its own; the report flags any difference
            print(f"bench_harness: {strategy}: parallelkit's DeepSpeed config not available ({type(e).__name__}: {e}); "
                  "the bare loop builds its own", file=sys.stderr)
    return spec


def launch(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` in its own process group (so a timeout or Ctrl-C also stops the workers it started)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            rc = 124
    return rc, time.perf_counter() - t0


def tail(log: Path) -> str:
    """The first exception line of a worker (not the launcher's ChildFailedError), else the last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if re.match(r"(\[rank\d+\]: )?[\w.]*(Error|Exception)\b.*:", ln) and "ChildFailedError" not in ln]
    return (errors[:1] or lines[-1:] or ["no output"])[0][:300]


def run_bare(strategy: str, spec: dict, d: Path) -> dict:
    nproc = 1 if strategy == "single" else WORLD
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))  # the threads parallelkit's workers set for themselves
    threshold = shipped_default("train.cpu_mmap_threshold")  # the allocator setting parallelkit's workers use
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "experiments" / "bare_loops.py"), str(d / "spec.json"), str(d / "result.json")]
    rc, wall = launch(cmd, d / "log.txt", env)
    if rc != 0 or not (d / "result.json").exists():
        return {"status": "failed", "error": f"exit {rc}: {tail(d / 'log.txt')}", "wall_s": wall}
    return {**json.loads((d / "result.json").read_text()), "wall_s": wall}


def run_cli(args, strategy: str, instrument: bool, d: Path) -> dict:
    # peak_tflops=1 skips the CPU peak calibration (a 0.5 s matmul burst per run): MFU is not used here
    cmd = [sys.executable, "-m", "parallelkit.run", *overrides(args, strategy), f"train.instrument={str(instrument).lower()}",
           "peak_tflops=1", f"hydra.run.dir={d}"]
    d.mkdir(parents=True, exist_ok=True)
    rc, wall = launch(cmd, d / "log.txt")
    if not (d / "summary.json").exists():
        return {"status": "failed", "error": f"exit {rc}, no summary.json: {tail(d / 'log.txt')}", "wall_s": wall}
    s = json.loads((d / "summary.json").read_text())
    out = {"status": s["status"], "error": s.get("error"), "step_time_s": s.get("step_time_s"), "losses": s.get("losses"),
           "wall_s": wall}
    if (d / "metrics.jsonl").exists():
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        out["step_times_s"] = [r["step_time_s"] for r in rows[args.warmup:]]
    if (d / "deepspeed_config.json").exists():
        out["ds_config"] = json.loads((d / "deepspeed_config.json").read_text())
    return out


def config_diff(bare: dict, ours: dict, prefix: str = "") -> list[str]:
    """Keys of the bare loop's DeepSpeed config whose value parallelkit's differs from."""
    diff = []
    for k, v in bare.items():
        if isinstance(v, dict) and isinstance(ours.get(k), dict):
            diff += config_diff(v, ours[k], f"{prefix}{k}.")
        elif ours.get(k) != v:
            diff.append(f"{prefix}{k}: bare {v!r}, parallelkit {ours.get(k)!r}")
    return diff


def rotate(seq, r: int) -> list:
    r %= len(seq)
    return list(seq[r:]) + list(seq[:r])


def spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)} if values else None


def quartiles(values: list[float]) -> dict | None:
    if len(values) < 2:
        return None
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return {"q1": q1, "median": q2, "q3": q3, "n": len(values)}


def summarize(rounds: list[dict], strategies: list[str]) -> dict[str, dict]:
    out = {}
    for s in strategies:
        runs = [{v: rd["runs"][s][v] for v in VARIANTS if v in rd["runs"].get(s, {})} for rd in rounds]
        ok = lambda run, v: v in run and run[v]["status"] == "ok"  # noqa: E731
        ratio = lambda a, b: [run[a]["step_time_s"] / run[b]["step_time_s"] for run in runs if ok(run, a) and ok(run, b)]  # noqa: E731
        times = {v: [run[v]["step_time_s"] for run in runs if ok(run, v)] for v in VARIANTS}
        steps = {v: [t for run in runs if ok(run, v) for t in run[v].get("step_times_s") or []] for v in VARIANTS}
        dev, first = [], {}
        for run in runs:
            for v in ("plain", "instrumented"):
                if ok(run, "bare") and ok(run, v):
                    dev += [abs(a - b) for a, b in zip(run["bare"]["losses"], run[v]["losses"])]
            for v in VARIANTS:
                if ok(run, v) and v not in first:
                    first[v] = run[v]["losses"][0]
        errors = sorted({f"{v}: {run[v]['error']}" for run in runs for v in VARIANTS if v in run and not ok(run, v)})
        ds = sorted({d for run in runs if ok(run, "bare") for v in ("plain", "instrumented")
                     if ok(run, v) and "ds_config" in run["bare"] and "ds_config" in run[v]
                     for d in config_diff(run["bare"]["ds_config"], run[v]["ds_config"])})
        out[s] = {"step_time_s": {v: spread(t) for v, t in times.items()},
                  "parallelkit_over_bare": spread(ratio("plain", "bare")),
                  "instrumented_over_plain": spread(ratio("instrumented", "plain")),
                  # every timed step of every round in one pool: its median, and the middle half of the steps
                  "pooled": {v: quartiles(t) for v, t in steps.items()},
                  "first_loss": first, "max_loss_diff": max(dev) if dev else None, "errors": errors,
                  "ds_config_differs": ds}
    return out


def fmt_ratio(x: dict | None) -> str:
    return f"{x['median']:.3f} ({x['min']:.3f}-{x['max']:.3f})" if x else "-"


def fmt_ms(x: dict | None) -> str:
    return f"{x['median'] * 1e3:,.1f}" if x else "-"


def fmt_q(x: dict) -> str:
    return f"{x['median'] * 1e3:,.0f} ({x['q1'] * 1e3:,.0f}-{x['q3'] * 1e3:,.0f})"


def report(args, command: str, facts: dict, rounds: list[dict], summary: dict, wall: float) -> str:
    load = "; ".join(f"round {rd['round']}: {rd['load_before'][0]:.2f} -> {rd['load_after'][0]:.2f}" for rd in rounds)
    lines = [
        "# parallelkit against hand-written loops, and the cost of measuring", "",
        f"Command: `{command}`  ",
        f"Date: {facts['date']}, commit `{facts['commit']}`, {len(rounds)} round(s) in {wall / 60:.1f} min  ",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB; torch {facts['versions']['torch']}, "
        f"deepspeed {facts['versions']['deepspeed']}, fairscale {facts['versions']['fairscale']}  ",
        f"Load average (1 min) before -> after each round: {load}", "",
        "**These numbers are only as good as the quiet of the machine.** Every ratio is taken within one round, "
        "between runs launched one after another, and the rounds rotate the order; the spread (min-max over rounds) "
        "shows how far the rounds disagree. A ratio whose spread includes 1.000 is no measurable difference. A round "
        "that started with a load average above ~0.5, or with CPU steal above a few percent (see bench.json), was not "
        "quiet: its numbers say more about the neighbours than about parallelkit.", "",
        f"Model `{args.model}`, seq {args.seq_len}, micro-batch {args.micro} per rank, {WORLD} ranks (`single`: one "
        f"process running both ranks' micro-batches), fp32, {args.steps} steps of which {args.warmup} warm-up; "
        "step time = median of the timed steps (perf_counter around the step, as parallelkit times it); the ms columns "
        "are medians over rounds.", "",
        "| strategy | bare ms | parallelkit ms | parallelkit / bare | pooled steps: bare ms / parallelkit ms (middle "
        "half) | pooled ratio | instrumented ms | instrumented / plain | step-0 loss bare / parallelkit | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, r in summary.items():
        t, f = r["step_time_s"], r["first_loss"]
        losses = f"{f['bare']:.6f} / {f['plain']:.6f}" if "bare" in f and "plain" in f else "-"
        diff = f"{r['max_loss_diff']:.1e}" if r["max_loss_diff"] is not None else "-"
        pb, pp = r["pooled"]["bare"], r["pooled"]["plain"]
        pooled = (f"{fmt_q(pb)} / {fmt_q(pp)}", f"{pp['median'] / pb['median']:.3f}") if pb and pp else ("-", "-")
        lines.append(f"| {s} | {fmt_ms(t['bare'])} | {fmt_ms(t['plain'])} | {fmt_ratio(r['parallelkit_over_bare'])} | "
                     f"{pooled[0]} | {pooled[1]} | {fmt_ms(t['instrumented'])} | {fmt_ratio(r['instrumented_over_plain'])} | {losses} | {diff} |")
    lines += ["", "- **parallelkit / bare** (issue 10): parallelkit's `step_time_s` (CLI, `train.instrument=false`) over "
              "the hand-written loop's (`experiments/bare_loops.py`), per round; median (min-max).",
              "- **pooled**: every timed step of every round in one pool per variant: the median step and the middle "
              "half of the steps (quartiles). On a 2-core machine single steps vary by +-15% or more (the two ranks "
              "share the two cores with everything else), so a per-round ratio of medians over a few steps moves by "
              "several percent from round to round; the pooled ratio uses every step measured.",
              "- **instrumented / plain** (issue 9): `train.instrument=true` over `false`, per round.",
              "- **max loss diff**: largest per-step difference between the bare loop's loss and parallelkit's "
              "(both variants, all rounds); in fp32 the same computation stays around 1e-6."]
    notes = [f"- {s}: {e}" for s, r in summary.items() for e in r["errors"]]
    notes += [f"- {s}: DeepSpeed config differs from the bare loop's: {d}" for s, r in summary.items() for d in r["ds_config_differs"]]
    if notes:
        lines += ["", "Problems:", "", *notes]
    lines += ["", "| round | order (first strategy, variants) | load before | load after | CPU steal | wall |",
              "|---|---|---|---|---|---|"]
    for rd in rounds:
        lines.append(f"| {rd['round']} | {rd['order'][0]}, {' / '.join(rd['variants'])} | "
                     f"{' '.join(f'{x:.2f}' for x in rd['load_before'])} | {' '.join(f'{x:.2f}' for x in rd['load_after'])} | "
                     f"{rd['steal']:.1%} | {rd['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def settle(limit: float, most_s: float = 300) -> float:
    """Wait until the 1-minute load average is under ``limit`` (at most ``most_s``); returns the seconds waited."""
    t0 = time.perf_counter()
    while limit > 0 and os.getloadavg()[0] >= limit and time.perf_counter() - t0 < most_s:
        time.sleep(5)
    return round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of timing (the same in all three runs)")
    ap.add_argument("--micro", type=int, default=1, help="micro-batch size per rank")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list (default: all data-parallel ones)")
    ap.add_argument("--out", default="results/harness")
    ap.add_argument("--keep-runs", action="store_true", help="keep every run's folder (default: only failed ones)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="before each round, wait (up to 5 min) until the 1-minute load average is under this: the "
                         "previous round's own runs raise it to ~2 (0: do not wait)")
    args = ap.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES + OPTIONAL]
    if unknown:
        sys.exit(f"bench_harness: no bare loop for {', '.join(unknown)}; choose from {', '.join(STRATEGIES + OPTIONAL)}")
    if args.rounds < 1:
        sys.exit("bench_harness: --rounds must be at least 1")
    if args.warmup >= args.steps:
        sys.exit(f"bench_harness: --warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    out = Path(args.out).resolve()
    shutil.rmtree(out / "runs", ignore_errors=True)  # runs of an earlier benchmark
    (out / "overhead.json").unlink(missing_ok=True)  # written by the earlier version of this benchmark
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/bench_harness.py " + shlex.join(sys.argv[1:])
    facts = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    sys.path.insert(0, str(ROOT))
    specs = {s: bare_spec(args, s) for s in strategies}
    rounds: list[dict] = []
    start = time.perf_counter()
    for r in range(args.rounds):
        order, variants = rotate(strategies, r), rotate(VARIANTS, r)
        waited = settle(args.settle)
        rd = {"round": r + 1, "settled_s": waited, "order": order, "variants": variants, "load_before": list(os.getloadavg()), "runs": {}}
        steal0, total0, t0 = *cpu_times(), time.perf_counter()
        for s in order:
            for v in variants:
                d = out / "runs" / f"r{r + 1}_{s}_{v}"
                res = run_bare(s, specs[s], d) if v == "bare" else run_cli(args, s, v == "instrumented", d)
                rd["runs"].setdefault(s, {})[v] = res
                if res["status"] == "ok":
                    print(f"round {r + 1} {s:18} {v:12} {res['step_time_s'] * 1e3:9.1f} ms/step  step-0 loss "
                          f"{res['losses'][0]:.6f}  ({res['wall_s']:.0f} s)", flush=True)
                    if not args.keep_runs:
                        shutil.rmtree(d, ignore_errors=True)
                else:
                    print(f"round {r + 1} {s:18} {v:12} {res['status']}: {res['error']}  ({d})", flush=True)
        steal1, total1 = cpu_times()
        rd.update(load_after=list(os.getloadavg()), wall_s=time.perf_counter() - t0,
                  steal=(steal1 - steal0) / max(1, total1 - total0))
        rounds.append(rd)
        wall = time.perf_counter() - start
        summary = summarize(rounds, strategies)
        result = {"command": command, "machine": facts, "settings": {**vars(args), "world_size": WORLD},
                  "wall_s": wall, "rounds": rounds, "strategies": summary}
        (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")  # after every round: a partial run keeps its data
        print(f"round {r + 1}: load {rd['load_before'][0]:.2f} -> {rd['load_after'][0]:.2f}, CPU steal {rd['steal']:.1%}, "
              f"{rd['wall_s']:.0f} s", flush=True)
    if not args.keep_runs and (out / "runs").is_dir() and not any((out / "runs").iterdir()):
        (out / "runs").rmdir()
    text = report(args, command, facts, rounds, summary, wall)
    (out / "README.md").write_text(text)
    print("\n" + text)
    print(f"wrote {out / 'bench.json'} and {out / 'README.md'}")


if __name__ == "__main__":
    main()
