"""Where a CPU run's peak RSS goes: the bytes malloc holds live against what the allocator keeps.

On CPU parallelkit measures a worker's peak RSS (the kernel's VmHWM), and its prediction is the
strategy's tensors (memory_model.py) plus the worker's own footprint, measured once per backend on
the tiny model (predict.process_baseline). RSS also counts memory that glibc's malloc keeps after
it is freed; when a backend's allocation pattern keeps more of it on a larger model than on tiny,
the prediction falls short although every tensor is counted. This separates the two: each
strategy runs as ``python -m parallelkit.run`` runs it (its launcher, real workers, gloo), with a
probe loaded into every worker (a ``sitecustomize`` on PYTHONPATH) that, on each training step, reads

- RSS before the step and its exact peak within the step (VmHWM, reset at the step's start);
- the bytes malloc holds live (glibc's ``mallinfo2``: in-use heap chunks plus mmapped blocks)
  before the step and their peak within it, sampled every 0.5 ms from a thread.

and prints, per strategy and model (the median over the timed steps, the busiest rank):

    predicted peak | measured peak RSS | error | live before | live peak | RSS - live at peak

``RSS - live`` is what the process holds beyond live bytes: code and libraries, and freed heap that
malloc keeps. The prediction's footprint carries tiny's; what grows beyond it on a larger model is
error no tensor count can give. With glibc's own mmap threshold (``null``) it grows by hundreds of
MiB for the sharded strategies; with the fixed threshold parallelkit sets (1 MiB) it stays put.

    python experiments/mem_phases.py [--models tiny,small] [--strategies ddp,zero1,...]
        [--thresholds 1048576,null] [--rounds 3] [--out DIR] [OVERRIDE ...]

Linux with glibc only (``/proc/self/clear_refs``, ``mallinfo2``). A strategy may carry its own
overrides after a colon, as in experiments/comm_check.py: ``torch_pipe:train.grad_accum=4``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "ddp,zero1,zero2,zero3,fsdp_zero3,deepspeed_pipe,torch_pipe"
# compare_all's shape (results/compare_all), fewer steps: the measure is per step, not a timing
BASE = ["model.seq_len=128", "world_size=2", "train.steps=6", "train.untimed_steps=2", "train.micro_batch_size=4",
        "train.global_batch_size=8", "preflight=false"]
MiB = 2**20


# ---- the probe, loaded into each worker by the sitecustomize below ----
def _probe(out: Path) -> None:
    import ctypes
    import threading

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def live() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}

    top = {"live": 0}

    def sample() -> None:
        while True:
            top["live"] = max(top["live"], live())
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    import parallelkit.measure.metrics as metrics
    import parallelkit.strategies.shared.optim as optim  # patched before the worker's loop module imports lr_at from it

    rank, start = os.environ.get("RANK", "0"), {}
    log = open(out / f"rank{rank}.jsonl", "w")
    lr_at, uninstall = optim.lr_at, metrics.CommCounter.uninstall

    def begin(*a, **k):  # the loop computes the step's lr just before its train_step
        start.update(rss=status()["VmRSS"], live=live())
        top["live"] = start["live"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return lr_at(*a, **k)

    def end(self):  # ... and uninstalls the comm counter just after it
        uninstall(self)
        if start:
            s = status()
            log.write(json.dumps({"rss_before": start["rss"], "rss_peak": s["VmHWM"], "rss_after": s["VmRSS"],
                                  "live_before": start["live"], "live_peak": max(top["live"], live()),
                                  "live_after": live()}) + "\n")
            log.flush()
            start.clear()

    optim.lr_at, metrics.CommCounter.uninstall = begin, end


# ---- the driver ----
SITE = """import os
if os.environ.get("PARALLELKIT_MEM_PHASES") and "RANK" in os.environ:  # a worker (torchrun sets RANK), not the launcher
    import importlib.util, pathlib
    spec = importlib.util.spec_from_file_location("_mem_phases", {path})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._probe(pathlib.Path(os.environ["PARALLELKIT_MEM_PHASES"]))
"""


def run(name: str, model: str, extra: list[str], common: list[str], out: Path, probe: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.jsonl"):
        f.unlink()
    site = out / "_probe"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE.format(path=repr(str(Path(__file__).resolve()))))
    cmd = [sys.executable, "-m", "parallelkit.run", f"strategy={name}", f"model={model}", *common, *extra,
           f"hydra.run.dir={out}"]
    path = os.pathsep.join(filter(None, [str(site) if probe else "", str(ROOT), os.environ.get("PYTHONPATH")]))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHONPATH": path, "PARALLELKIT_MEM_PHASES": str(out)})
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "error": (p.stderr.strip().splitlines() or ["no summary"])[-1]}
    if s.get("status") != "ok":
        return {"status": s.get("status"), "error": s.get("error")}
    timed = s["timed_steps"]
    ranks = []
    for f in sorted(out.glob("rank*.jsonl")):
        steps = [json.loads(line) for line in f.read_text().splitlines()][-timed:]
        ranks.append({k: statistics.median(st[k] for st in steps) for k in steps[0]})
    busiest = max(ranks, key=lambda r: r["rss_peak"]) if ranks else {}
    pred = s.get("prediction") or {}
    return {"status": "ok", "predicted_peak": s.get("predicted_peak_mem_bytes"), "measured_peak": max(s["peak_mem_bytes"]),
            "footprint": pred.get("process_baseline_bytes"), "parts": sum((pred.get("parts") or {}).values()),
            "tokens_per_s": s["tokens_per_s"], "cpu_malloc": s.get("cpu_malloc"), **busiest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=DEFAULT)
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--thresholds", default="1048576",
                    help="train.cpu_mmap_threshold values to compare, e.g. 1048576,null (null: glibc's own)")
    ap.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved")
    ap.add_argument("--no-probe", action="store_true",
                    help="run without the probe (no live-byte columns): tokens/s without its sampling thread")
    ap.add_argument("--out", default="/tmp/parallelkit_mem_phases")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    given = {o.split("=")[0] for o in a.overrides}
    common = [o for o in BASE if o.split("=")[0] not in given] + a.overrides
    configs = [(model, spec, th) for model in a.models.split(",") for spec in a.strategies.split(",")
               for th in a.thresholds.split(",")]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rnd in range(a.rounds):  # round by round: a busy spell hits every configuration alike
        for model, spec, th in configs:
            name, *extra = spec.split(":")
            t0 = time.time()
            tag = "_".join([name, *(e.split("=")[-1] for e in extra), f"mmap{th}", f"r{rnd}"])
            r = run(name, model, [*extra, f"train.cpu_mmap_threshold={th}"], common, Path(a.out) / model / tag,
                    probe=not a.no_probe)
            runs[model, spec, th].append(r)
            print(f"    round {rnd + 1}/{a.rounds}: {spec} on {model}, cpu_mmap_threshold={th}: {r['status']} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print("| strategy | model | cpu_mmap_threshold | predicted peak | measured peak RSS | error | live peak | "
          "RSS - live at peak | tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (model, spec, th), rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        label = spec.replace(":", " ")
        if not ok:
            print(f"| {label} | {model} | {th} | {rs[0]['status']}: {rs[0].get('error')} | | | | | |")
            continue

        def med(key, div=MiB):
            vals = [r[key] / div for r in ok if key in r]
            if not vals:
                return None, "-"
            m = statistics.median(vals)
            return m, (f"{m:,.0f}" if len(vals) == 1 else f"{m:,.0f} ({min(vals):,.0f}-{max(vals):,.0f})")

        def mib(key):
            text = med(key)[1]
            return text if text == "-" else f"{text} MiB"

        peak, peak_s = med("measured_peak")
        pred = ok[0]["predicted_peak"] / MiB if ok[0]["predicted_peak"] else None
        for r in ok:
            if "live_peak" in r:
                r["retained"] = r["rss_peak"] - r["live_peak"]
        err = "" if pred is None else f"{(pred - peak) / peak:+.1%}"
        print(f"| {label} | {model} | {th} | {'' if pred is None else f'{pred:,.0f}'} MiB | {peak_s} MiB | {err} | "
              f"{mib('live_peak')} | {mib('retained')} | {med('tokens_per_s', 1)[1]} |")
        rows.append({"strategy": label, "model": model, "cpu_mmap_threshold": th, "runs": ok})
    print(f"(median over {a.rounds} round(s), min-max in brackets; the busiest rank's median over the timed steps)")
    (Path(a.out) / "mem_phases.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
