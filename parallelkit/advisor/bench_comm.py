"""How fast this machine's collectives are: an alpha-beta fit of each, for the step-time projection.

``python -m parallelkit.bench_comm [--world-size 2] [--force] [--quick]`` spawns N gloo ranks on CPU
(as a run's workers: each with its share of the cores), times all_reduce, all_gather_into_tensor,
reduce_scatter_tensor, all_to_all_single, broadcast, reduce and send/recv of fp32 tensors from 4 KiB to
64 MiB (after a warm-up trial, a trial repeats the call until it lasts ~20 ms and takes the slowest rank's
time; the median of 5 trials) and fits latency alpha (s) and bandwidth B (bytes/s) to the textbook costs of a payload S on n ranks:

    all_reduce (ring)                    2(n-1)·α + 2(n-1)/n · S/B
    all_gather, reduce_scatter (ring)    (n-1)·α  + (n-1)/n · S/B   (S: the full tensor)
    all_to_all (pairwise)                (n-1)·α  + (n-1)/n · S/B
    broadcast, reduce (pipelined tree)   ⌈log2 n⌉·α + S/B
    send/recv (point to point)           α + S/B                    (timed as half a ping-pong)

The fit minimises the relative error (small messages count as much as large ones), with α, B >= 0:
one (α, B) per collective and one for the machine over all of them.

On the CPU it then times each kind as a run calls it (``_between``): each call after ``BETWEEN_S`` of compute
on every rank, without a barrier, less the same compute alone; fitted per kind and compute. A run's collective
waits for gloo's sleeping threads, for cold buffers and for the rank that computed longer, which back to back
hides: on a 2-core Xeon a 256 KiB call took 1-2 ms after 2 ms of compute, 0.3-0.6 ms back to back. gloo's reductions add the
summing to the wire time, which the per-collective fits absorb into their B. The result is cached
beside calibrate.py's peaks (``PARALLELKIT_CACHE``, default ~/.cache/parallelkit), keyed by the CPU,
its flags, threads per rank, world size and torch version, with every raw timing.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import parallelkit.measure.calibrate as calibrate
from parallelkit.measure.metrics import cpu_threads

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "send_recv")
SIZES = tuple(4 * 2**10 * 4**i for i in range(8))  # 4 KiB .. 64 MiB
QUICK_SIZES = (4 * 2**10, 256 * 2**10, 4 * 2**20)  # a check: latency- to bandwidth-bound
TRIALS = 5
TRIAL_S = 0.02  # a trial repeats a call until it lasts this long: small messages are timed in batches
# the run-like timing: each call after this much compute on every rank, as a run calls its collectives between
# layers (gloo's threads idle, the buffers out of cache, the ranks arriving apart)
# (and after a short one, as a narrow model's layers leave between calls: even then a call costs more than back to
# back, e.g. a 27 KiB all_reduce 0.75-0.85 ms after 0.1-0.4 ms of compute, 0.6 back to back; 1.05 after 0.8 ms)
BETWEEN_S = (0.0002, 0.002, 0.016)
SHORT_ROWS = 32  # the short gap's matmul: (32 x 256) x (256 x 1024)
RUN_KINDS = KINDS
RUN_SIZES, QUICK_RUN_SIZES = (256 * 2**10, 8 * 2**20), (256 * 2**10, 4 * 2**20)
RUN_TRIALS, QUICK_RUN_TRIALS = 5, 2
RUN_TRIAL_S, QUICK_RUN_TRIAL_S = 0.1, 0.05  # a run-like trial: calls after compute, then the compute alone, each this long
RUN_CALLS, QUICK_RUN_CALLS = 12, 3  # and at least this many calls (a trial's noise is shared among its calls)


def coefficients(kind: str, n: int) -> tuple[float, float]:
    """(a, b) of the alpha-beta time t = a·α + b·S/B of one call with payload S on n ranks (see the module doc)."""
    if kind == "send_recv":
        return 1.0, 1.0
    if n <= 1:
        return 0.0, 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(n - 1), (n - 1) / n
    if kind in ("broadcast", "reduce"):
        return float(math.ceil(math.log2(n))), 1.0
    raise ValueError(f"no alpha-beta cost for collective kind {kind!r}")


def model_time(kind: str, nbytes: float, n: int, alpha: float, bandwidth: float, messages: int = 1) -> float:
    """Seconds for ``nbytes`` of ``kind`` on ``n`` ranks in ``messages`` calls (the latency is paid per call)."""
    a, b = coefficients(kind, n)
    return messages * a * alpha + b * nbytes / bandwidth


# ---- the measurement (in each spawned rank) ----
def _op(kind: str, nbytes: int, rank: int, n: int, device: torch.device | None = None):
    """A call of ``kind`` on a payload of about ``nbytes`` (the exact bytes returned), and how many one-way
    transfers one call makes."""
    import torch.distributed as dist

    numel = max(1, nbytes // 4 // n) * n  # divisible by n (all_gather, reduce_scatter)
    torch.set_default_device(device or "cpu")
    full = torch.ones(numel)
    if kind == "all_reduce":
        return (lambda: dist.all_reduce(full)), full.nbytes, 1
    if kind == "all_gather":  # all_gather_single: all_gather_into_tensor's name from torch 2.13 on
        part, gather = torch.ones(numel // n), getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
        return (lambda: gather(full, part)), full.nbytes, 1
    if kind == "reduce_scatter":
        part, scatter = torch.empty(numel // n), getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        return (lambda: scatter(part, full)), full.nbytes, 1
    if kind == "all_to_all":
        out = torch.empty(numel)
        return (lambda: dist.all_to_all_single(out, full)), full.nbytes, 1
    if kind == "broadcast":
        return (lambda: dist.broadcast(full, 0)), full.nbytes, 1
    if kind == "reduce":
        return (lambda: dist.reduce(full, 0)), full.nbytes, 1
    peer = rank ^ 1  # pairs (0, 1), (2, 3), ...; with an odd n the last rank waits

    def ping_pong():
        if peer >= n:
            return
        if rank % 2 == 0:
            dist.send(full, peer)
            dist.recv(full, peer)
        else:
            dist.recv(full, peer)
            dist.send(full, peer)
    return ping_pong, full.nbytes, 2


def _slowest(seconds: float, device: torch.device | None = None) -> float:
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _chunk(rows: int = 256):
    """A slice of a run's compute, as a layer's: a (rows x 256) x (256 x 1024) matmul, cycling through 8 MiB of
    weights (more than a core's caches: a collective after it finds its buffers cold, as in a run)."""
    weights, x, turn = [torch.randn(256, 1024) for _ in range(8)], torch.randn(rows, 256), [0]

    def chunk():
        turn[0] = (turn[0] + 1) % len(weights)
        return x @ weights[turn[0]]
    return chunk


def _between(rank: int, n: int, sizes: list[int], trials: int, trial_s: float, min_calls: int) -> dict:
    """The run-like timing on every rank: {kind: [{between_s, points: [{bytes, median_s, trials_s, calls}]}]}. A
    trial times k calls each after ``between`` of compute, and the same compute alone (each the slowest rank's,
    after a barrier); a call's run-like time is their difference over k: the call, its cold buffers, and the wait
    for the rank that computed longer."""
    import torch.distributed as dist

    def timed(chunk):
        for _ in range(5):
            chunk()
        t0 = time.perf_counter()
        for _ in range(20):
            chunk()
        return chunk, _slowest((time.perf_counter() - t0) / 20)

    layer, short = timed(_chunk()), timed(_chunk(SHORT_ROWS))  # a short gap: a slice of a narrow layer's

    def loop(chunk, call, reps: int, k: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            for _ in range(reps):
                chunk()
            if call is not None:
                call()
        return _slowest(time.perf_counter() - t0)

    out: dict = {}
    for kind in RUN_KINDS:
        out[kind] = []
        for between in BETWEEN_S:
            chunk, chunk_s = short if between < layer[1] else layer
            reps, pts = max(1, round(between / chunk_s)), []
            for size in sizes:
                call, nbytes, legs = _op(kind, size, rank, n)
                one = loop(chunk, call, 0, 1)  # warms up; sets the calls per trial
                k = max(min_calls, math.ceil(trial_s / (reps * chunk_s + one)))
                ts = [(loop(chunk, call, reps, k) - loop(chunk, None, reps, k)) / k / legs for _ in range(trials)]
                pts.append({"bytes": nbytes, "median_s": statistics.median(ts), "trials_s": ts, "calls": k})
            out[kind].append({"between_s": reps * chunk_s, "points": pts})
    return out


def _rank_main(rank: int, n: int, sizes: list[int], out: str, backend: str = "gloo") -> None:
    import torch.distributed as dist

    from parallelkit.runtime.processes import INIT_METHOD
    from parallelkit.util.jsonio import write_json

    device = None
    if backend == "nccl":  # the GPUs' own collectives: one GPU per rank
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads(n))
    dist.init_process_group(backend, init_method=os.environ[INIT_METHOD], rank=rank, world_size=n)
    points = {}
    for kind in KINDS:
        points[kind] = []
        for size in sizes:
            call, nbytes, legs = _op(kind, size, rank, n, device)
            reps, trials = 1, []
            for i in range(TRIALS + 1):  # the first trial warms up and sets the calls per trial
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(reps):
                    call()
                if device is not None:
                    torch.cuda.synchronize(device)
                t = _slowest(time.perf_counter() - t0, device) / reps
                if i == 0:
                    reps = max(1, math.ceil(TRIAL_S / max(t, 1e-9)))
                else:
                    trials.append(t / legs)
            points[kind].append({"bytes": nbytes, "median_s": statistics.median(trials), "trials_s": trials,
                                 "calls_per_trial": reps})
    if device is None:  # on the CPU: the run-like timing too (a GPU's collectives run on their own streams)
        quick = list(sizes) == list(QUICK_SIZES)
        points["between"] = _between(rank, n, list(QUICK_RUN_SIZES if quick else RUN_SIZES),
                                     *((QUICK_RUN_TRIALS, QUICK_RUN_TRIAL_S, QUICK_RUN_CALLS) if quick
                                       else (RUN_TRIALS, RUN_TRIAL_S, RUN_CALLS)))
    if rank == 0:
        write_json(Path(out), points)
    dist.destroy_process_group()


def time_collectives(world_size: int, sizes=SIZES, backend: str = "gloo") -> dict:
    """Raw timings of every collective kind on ``world_size`` spawned ranks of ``backend`` (gloo on the CPU, nccl
    on the local GPUs): {kind: [point, ...]}."""
    import json

    from parallelkit.runtime.processes import spawn

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "points.json")
        spawn(_rank_main, world_size, world_size, list(sizes), out, backend)
        return json.loads(Path(out).read_text())


# ---- the fit ----
def fit(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(α, B) minimising the relative error of t ≈ a·α + c/B over rows (a, c, t), with c = b·S; α, 1/B >= 0."""
    import numpy as np

    x = np.array([(a / t, c / t) for a, c, t in rows])
    y = np.ones(len(rows))
    candidates = []
    sol = np.linalg.lstsq(x, y, rcond=None)[0]
    if (sol >= 0).all():
        candidates.append(sol)
    for j in (0, 1):  # one term only, the other held at zero
        col, sol = x[:, j], np.zeros(2)
        if col @ col > 0:
            sol[j] = col @ y / (col @ col)
            candidates.append(sol)
    best = min((c for c in candidates if c[1] > 0), key=lambda c: float(((x @ c - y) ** 2).sum()), default=None)
    if best is None:
        raise ValueError("no bandwidth fits these timings (they do not grow with the message size)")
    return float(best[0]), float(1 / best[1])


def fit_points(points: dict, n: int) -> dict:
    """The per-kind and machine fits of ``points`` (measure's output) on n ranks, each point's fitted time beside it;
    with the run-like timings (``between``), a fit of each kind at each compute between calls."""
    points = dict(points)
    between = points.pop("between", None)
    rows = {k: [(*_ab(k, p["bytes"], n), p["median_s"]) for p in pts] for k, pts in points.items()}
    alpha, bw = fit([r for rs in rows.values() for r in rs])
    kinds = {}
    for k, pts in points.items():
        ka, kb = fit(rows[k])
        kinds[k] = {"alpha_s": ka, "bandwidth_Bps": kb,
                    "points": [{**p, "fit_s": model_time(k, p["bytes"], n, ka, kb),
                                "machine_fit_s": model_time(k, p["bytes"], n, alpha, bw)} for p in pts]}
    out = {"alpha_s": alpha, "bandwidth_Bps": bw, "kinds": kinds}
    if between:
        out["between"] = {k: [_fit_between(k, b, n, kinds.get(k)) for b in runs] for k, runs in between.items()}
    return out


def _fit_between(kind: str, run: dict, n: int, alone: dict | None) -> dict:
    """The alpha-beta fit of one kind's run-like timings at one compute between calls. A call is never taken as
    faster than back to back (``alone``: that kind's fit), and timings that do not grow with the size (noise) keep
    the back-to-back bandwidth, with the latency that fits them."""
    pts = run["points"]
    if alone is not None:
        pts = [{**p, "median_s": max(p["median_s"], model_time(kind, p["bytes"], n, alone["alpha_s"],
                                                               alone["bandwidth_Bps"]))} for p in pts]
    try:
        a, b = fit([(*_ab(kind, p["bytes"], n), p["median_s"]) for p in pts])
        off = max(max(r, 1 / r) for r in (model_time(kind, p["bytes"], n, a, b) / p["median_s"] for p in pts))
    except ValueError:
        if alone is None:
            raise
        off = math.inf
    if off > 1.5 and alone is not None:  # noise made the small call slower than the large one: keep B, fit α
        b = alone["bandwidth_Bps"]
        ca, cb = coefficients(kind, n)
        a = max(0.0, statistics.mean((p["median_s"] - cb * p["bytes"] / b) / max(ca, 1.0) for p in pts))
    return {"between_s": run["between_s"], "alpha_s": a, "bandwidth_Bps": b,
            "points": [{**p, "fit_s": model_time(kind, p["bytes"], n, a, b)} for p in pts]}


def _ab(kind: str, nbytes: int, n: int) -> tuple[float, float]:
    a, b = coefficients(kind, n)
    return a, b * nbytes


# ---- the cache ----
def cache_key(world_size: int, quick: bool = False, backend: str = "gloo") -> dict:
    """calibrate's host key (CPU model, flags, threads, torch; the GPU for nccl) with the ranks and backend."""
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    key = calibrate.cache_key("fp32", cpu_threads(world_size), device)
    return {**key, "world_size": world_size, "backend": backend, "quick": quick, "kinds": list(KINDS),
            "between_s": list(BETWEEN_S) if backend == "gloo" else None}  # what it times: a change measures again


def load_calibration(world_size: int, quick: bool = False, backend: str = "gloo") -> dict | None:
    """The cached calibration of ``world_size`` ranks, or None."""
    return calibrate.read_cache(cache_key(world_size, quick, backend), "comm")


def calibration(world_size: int, measure: bool = True, force: bool = False, quick: bool = False,
                backend: str = "gloo") -> dict | None:
    """The cached calibration, or (``measure``) a new one, saved; None when none is cached and ``measure`` is off."""
    if not force and (entry := load_calibration(world_size, quick, backend)) is not None:
        return {**entry, "cached": True}
    if not measure:
        return None
    from parallelkit.measure.host import versions

    sizes = QUICK_SIZES if quick else SIZES
    took = "" if backend != "gloo" else " a few seconds," if quick else " about a minute,"
    print(f"parallelkit: measuring collectives on {world_size} {backend} ranks (python -m parallelkit.bench_comm;"
          f"{took} cached for later)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    points = time_collectives(world_size, sizes, backend)
    entry = {**fit_points(points, world_size), "world_size": world_size, "threads_per_rank": cpu_threads(world_size),
             "backend": backend, "sizes": list(sizes), "trials": TRIALS, "seconds": time.perf_counter() - t0,
             "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "host": calibrate.host_facts(), "versions": versions()}
    key = cache_key(world_size, quick, backend)
    calibrate.write_cache(key, entry, "comm")
    return {"key": key, **entry, "cached": False}


def render(c: dict) -> str:
    sizes = c["sizes"]
    size = lambda b: f"{b // 2**20} MiB" if b >= 2**20 else f"{b // 2**10} KiB"  # noqa: E731
    head = f"{'':<15}{'alpha us':>9}{'B GB/s':>8}" + "".join(f"{size(s):>9}" for s in sizes)
    lines = [f"{c['world_size']} {c.get('backend', 'gloo')} ranks, {c['threads_per_rank']} thread(s) each, {c['host']['cpu']}; "
             f"median ms per call (fit/measured below); {c['seconds']:.0f} s, {c['measured_at']}", head]
    for k, f in c["kinds"].items():
        pts = f["points"]
        lines.append(f"{k:<15}{f['alpha_s'] * 1e6:>9.1f}{f['bandwidth_Bps'] / 1e9:>8.2f}"
                     + "".join(f"{p['median_s'] * 1e3:>9.3f}" for p in pts))
        lines.append(f"{'':<32}" + "".join(f"{p['fit_s'] / p['median_s']:>9.2f}" for p in pts))
    ratios = [p["machine_fit_s"] / p["median_s"] for f in c["kinds"].values() for p in f["points"]]
    lines.append(f"machine (all kinds): alpha {c['alpha_s'] * 1e6:.1f} us, B {c['bandwidth_Bps'] / 1e9:.2f} GB/s; "
                 f"its fit/measured {min(ratios):.2f}..{max(ratios):.2f}")
    if c.get("between"):
        lines.append("as a run calls them, each after compute on every rank (ms per call; back to back beside it):")
        for k, runs in c["between"].items():
            for r in runs:
                alone = c["kinds"][k]
                lines.append(f"{k:<15}{r['alpha_s'] * 1e6:>9.1f}{r['bandwidth_Bps'] / 1e9:>8.2f}  after "
                             f"{r['between_s'] * 1e3:4.1f} ms: " + ", ".join(
                                 f"{size(p['bytes'])} {p['median_s'] * 1e3:.3f} "
                                 f"({model_time(k, p['bytes'], c['world_size'], alone['alpha_s'], alone['bandwidth_Bps']) * 1e3:.3f})"
                                 for p in r["points"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.bench_comm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2, help="ranks to spawn (default 2; on CUDA at most the GPUs)")
    ap.add_argument("--force", action="store_true", help="measure again even if cached")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only (a check; cached apart)")
    args = ap.parse_args(argv)
    if args.world_size < 2:
        ap.error("--world-size must be at least 2")
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # the collectives the runs here use
    if backend == "nccl" and torch.cuda.device_count() < args.world_size:
        ap.error(f"--world-size {args.world_size}: this machine has {torch.cuda.device_count()} GPU(s)")
    c = calibration(args.world_size, force=args.force, quick=args.quick, backend=backend)
    print(f"cache: {calibrate.cache_path(c['key'], 'comm')} ({'cached' if c['cached'] else 'measured now'})")
    print(render(c))


if __name__ == "__main__":
    main()
