"""A projected step time: a model of the step, shown beside what runs measure, never passed off as one.

``project(cfg, comm_by_kind, layout)`` = compute + communication, with no overlap between them
(so an upper bound, where the parts are right; a pipeline's bubble is not counted):

- compute_s = FLOPs per device per step / (peak x efficiency). FLOPs: ``GPTConfig.flops_per_token``
  (6N + 12·L·d·T, the figure behind a run's ``tflops``) x the global batch's tokens / devices: a
  pipeline's or tensor-parallel replica splits its work over its pp·tp devices. On this machine's
  CPU the share is per process instead (a process driving several pipeline "devices", or
  ``single``, does all their work on its own threads).
  Peak: a named device (``projection.device=H100``): the data sheet (util/devices.py);
  else ``peak_tflops``, or this machine's: on CPU calibrate.py's matmul peak at a worker's thread
  count (the cores shared by the local processes), on CUDA the data sheet.
  Efficiency: ``projection.efficiency``; on a GPU ``GPU_EFFICIENCY`` (an assumption); on CPU
  measured here: the rate of a short single-process forward + backward (the run's precision, no
  optimizer step) of a proxy of the configured model (its widths, vocabulary and micro-batch; at
  most 2 blocks; the batch, then the sequence, cut while a step would take over ~1 s) over the
  peak, cached. The CPU projection is then FLOPs / the proxy's rate (the peak cancels). A proxy of
  over ``PROXY_MAX_PARAMS`` (gpt_125m and up) would take tens of seconds and gigabytes to measure:
  those get ``CPU_EFFICIENCY``, an assumption from the MFU measured in results/.
- comm_s = sum over kinds of the alpha-beta time (bench_comm.coefficients: ring all-reduce,
  all-gather, reduce-scatter; tree broadcast; point-to-point send/recv) of the kind's bytes per
  step, as ``Strategy.comm`` gives them (metrics.CommCounter's payload), on n ranks: the
  data-parallel size; with no data parallelism the tensor-parallel size; a pipeline alone: 2 (its
  tied embedding's pair). Only bytes are known, not calls: they go in ``BUCKET``-sized messages
  (one message for a kind with less), each paying the latency. α and B: ``projection.latency_us``
  and ``projection.bandwidth_GBps`` where given, else bench_comm's calibration of this machine
  (per-kind fits; measured now if none is cached).
"""
from __future__ import annotations

import math
import os
import sys
import time
from datetime import datetime, timezone

import torch

import parallelkit.advisor.bench_comm as bench_comm
import parallelkit.measure.calibrate as calibrate
from parallelkit.config.checks import named_device, projection_setting
from parallelkit.config.layout import Layout
from parallelkit.measure.metrics import cpu_threads
from parallelkit.models.gpt import GPTConfig
from parallelkit.util.devices import CUDA_PEAK_TFLOPS

BUCKET = 25 * 2**20  # bytes per message for the latency term: DDP's default bucket (bucket_cap_mb=25)
GPU_EFFICIENCY = 0.4  # achieved / peak FLOP/s assumed on a GPU (large GPT training reaches ~0.3-0.5)
CPU_EFFICIENCY = 0.3  # CPU, a model too large to proxy: results/memory_vs_model's gpt_125m, gpt_350m had MFU 0.2-0.33
PROXY_MAX_PARAMS = 30_000_000  # a larger proxy takes tens of seconds and gigabytes to build and step on a CPU
PROXY_STEP_S = 1.0  # the efficiency proxy's step, at an assumed half of the peak
PROXY_TRIAL_S = 0.2  # a timing trial repeats the proxy step until this long; the best of 3


def group_size(layout: Layout) -> int:
    """The ranks of the collectives' group (see the module doc)."""
    if layout.dp > 1:
        return layout.dp
    if layout.tp > 1:
        return layout.tp
    return 2 if layout.pp > 1 else layout.world


def comm_seconds(comm_by_kind: dict[str, float], n: int, alpha: float, bandwidth: float,
                 per_kind: dict[str, tuple[float, float]] | None = None, bucket: int = BUCKET) -> dict[str, float]:
    """Seconds per kind: its bytes in ``bucket``-sized messages on n ranks (send_recv: point to point), at
    (α, B), or at the kind's own fit in ``per_kind``."""
    out = {}
    for kind, nbytes in comm_by_kind.items():
        if nbytes > 0:
            a, b = (per_kind or {}).get(kind, (alpha, bandwidth))
            out[kind] = bench_comm.model_time(kind, nbytes, n, a, b, max(1, math.ceil(nbytes / bucket)))
    return out


# ---- compute ----
def device_peak(cfg, layout: Layout, measure: bool = True) -> tuple[str, float | None, str]:
    """(device, peak TFLOP/s per device, where the peak comes from)."""
    prec = cfg.train.precision
    if key := named_device(cfg):
        return key, CUDA_PEAK_TFLOPS[key][prec], f"data sheet: {key} {prec}"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({calibrate.host_facts()['cpu']})"
    if cfg.get("peak_tflops"):
        return device, float(cfg.peak_tflops), "config: peak_tflops"
    if cuda:
        peak, source = calibrate.device_peak(torch.device("cuda", 0), prec)
        return device, peak, source
    threads = cpu_threads(layout.processes)
    with calibrate._threads(threads):
        c = calibrate.calibration(torch.device("cpu"), prec) if measure else calibrate._read(
            calibrate.cache_key(prec, threads, torch.device("cpu")))
    if c is None:
        return device, None, f"no {prec} matmul calibration cached for {threads} thread(s) (parallelkit.calibrate)"
    return device, c["tflops"], f"matmul calibration, {prec}, {threads} thread(s) ({c['measured_at']})"


def proxy_shape(cfg, peak_tflops: float) -> tuple[dict, int] | None:
    """The efficiency proxy's model config and batch: the configured model with at most 2 blocks, the batch and
    then the sequence halved while a step would take over PROXY_STEP_S at half the peak; None when the
    proxy itself has over PROXY_MAX_PARAMS parameters (too slow to build and step here)."""
    m = {k: cfg.model[k] for k in GPTConfig.__dataclass_fields__ if k in cfg.model}
    m["n_layer"], b = min(m["n_layer"], 2), cfg.train.micro_batch_size
    if GPTConfig(**m).num_params() > PROXY_MAX_PARAMS:
        return None
    flops = lambda: GPTConfig(**m).flops_per_token() * b * m["seq_len"]  # noqa: E731
    while flops() > peak_tflops * 1e12 / 2 * PROXY_STEP_S and (b > 1 or m["seq_len"] > 16):
        if b > 1:
            b //= 2
        else:
            m["seq_len"] //= 2
    return m, b


def proxy_rate(cfg, threads: int, peak_tflops: float, measure: bool = True) -> dict | None:
    """TFLOP/s (model FLOPs) of the proxy's forward and backward with ``threads`` threads: cached, or measured now.
    No optimizer step: its cost is per parameter, not per token, and would swamp a proxy cut to few tokens."""
    from parallelkit.models.gpt import build_model, lm_loss
    from parallelkit.strategies.shared.precision import Precision

    if (shape := proxy_shape(cfg, peak_tflops)) is None:
        return None
    m, b = shape
    ckpt, prec = bool(cfg.train.activation_checkpointing), cfg.train.precision
    key = {**calibrate.cache_key(prec, threads, torch.device("cpu")), "proxy": m, "batch": b, "checkpointing": ckpt}
    if (entry := calibrate.read_cache(key, "efficiency")) is not None or not measure:
        return entry
    print(f"parallelkit: measuring this CPU's training rate on a proxy of {cfg.model.get('name', 'the model')} "
          f"({threads} thread(s), {prec}; cached for later)", file=sys.stderr, flush=True)
    with calibrate._threads(threads):
        model = build_model(m, seed=0, activation_checkpointing=ckpt)
        autocast = Precision(prec, torch.device("cpu")).autocast
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, m["vocab_size"], (b, m["seq_len"]), generator=g) for _ in range(2))

        def steps(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                with autocast():
                    loss = lm_loss(model(x), y)
                loss.backward()
                model.zero_grad(set_to_none=True)
            return (time.perf_counter() - t0) / n

        reps = max(1, math.ceil(PROXY_TRIAL_S / steps(1)))  # the first step also warms up
        best = min(steps(reps) for _ in range(3))
    flops = GPTConfig(**m).flops_per_token() * b * m["seq_len"]
    entry = {"tflops": flops / best / 1e12, "step_s": best, "steps_per_trial": reps,
             "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    calibrate.write_cache(key, entry, "efficiency")
    return {"key": key, **entry}


def efficiency(cfg, layout: Layout, peak: float | None, measure: bool = True) -> tuple[float | None, str]:
    if (given := projection_setting(cfg, "efficiency")) is not None:
        return given, "config: projection.efficiency"
    if projection_setting(cfg, "device") or torch.cuda.is_available():
        return GPU_EFFICIENCY, f"assumed {GPU_EFFICIENCY} on a GPU (set projection.efficiency)"
    if peak is None:
        return None, "no peak to measure against"
    threads = cpu_threads(layout.processes)
    if proxy_shape(cfg, peak) is None:
        return CPU_EFFICIENCY, (f"assumed {CPU_EFFICIENCY} on CPU (a 2-block proxy of this model has over "
                                f"{PROXY_MAX_PARAMS / 1e6:.0f}M parameters: too slow to measure here; "
                                f"set projection.efficiency)")
    r = proxy_rate(cfg, threads, peak, measure)
    if r is None:
        return None, "no training-rate measurement cached for this model's shapes (not measured: measure=False)"
    p = r["key"]["proxy"]
    return min(1.0, r["tflops"] / peak), (f"measured: forward + backward of a {p['n_layer']}-block proxy, batch "
                                          f"{r['key']['batch']} x seq {p['seq_len']}, {threads} thread(s) "
                                          f"({r['measured_at']})")


# ---- communication ----
def comm_benchmark(cfg, n: int, cuda: bool, gpus: int = 0) -> tuple[str | None, int, str]:
    """Which collective benchmark a projection of ``n`` ranks may use: (backend or None, ranks, why). On a GPU
    machine the GPUs' own (NCCL, on up to the local GPUs), never gloo over CPU processes: their latency and
    bandwidth say nothing of NVLink or InfiniBand. None: only the projection.* settings can say (one GPU here).
    On a CPU machine, gloo on the ranks the run uses (at most the cores, at least 2)."""
    if cuda:
        if gpus < 2:
            return None, 0, ("one GPU here: no collective to measure; give projection.latency_us and "
                             "projection.bandwidth_GBps of the interconnect")
        ranks = min(n, gpus)
        return "nccl", ranks, f"bench_comm: {ranks} NCCL ranks on this machine's GPUs"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = n if bench_comm.load_calibration(n) else min(n, max(2, cores))
    named = " (this CPU's gloo, not the named device's interconnect)" if projection_setting(cfg, "device") else ""
    return "gloo", ranks, f"bench_comm: {ranks} gloo ranks on this machine{named}"


def link(cfg, comm_by_kind: dict[str, float], n: int, measure: bool = True) -> dict:
    """α (s), B (bytes/s), per-kind fits and their source: projection.* where given, else bench_comm on the
    device's own collectives (``comm_benchmark``)."""
    lat, bw = projection_setting(cfg, "latency_us"), projection_setting(cfg, "bandwidth_GBps")
    out = {"alpha_s": None if lat is None else lat * 1e-6, "bandwidth_Bps": None if bw is None else bw * 1e9,
           "per_kind": {}, "source": "config: projection.latency_us, bandwidth_GBps"}
    if not any(v > 0 for v in comm_by_kind.values()):
        return {**out, "source": "no communication"}
    if lat is not None and bw is not None:
        return out
    cuda = torch.cuda.is_available()
    backend, ranks, what = comm_benchmark(cfg, n, cuda, torch.cuda.device_count() if cuda else 0)
    if backend is None:
        return {**out, "source": what}
    try:
        c = bench_comm.calibration(ranks, measure, backend=backend)
    except Exception as e:  # noqa: BLE001 - no processes here (a sandbox): say so, project no step
        out["source"] = f"collectives could not be measured here ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        return out
    if c is None:
        out["source"] = f"no collective calibration cached for {ranks} {backend} ranks (python -m parallelkit.bench_comm)"
        return out
    given = [k for k, v in (("latency_us", lat), ("bandwidth_GBps", bw)) if v is not None]
    out["alpha_s"] = c["alpha_s"] if lat is None else out["alpha_s"]
    out["bandwidth_Bps"] = c["bandwidth_Bps"] if bw is None else out["bandwidth_Bps"]
    if not given:
        out["per_kind"] = {k: (f["alpha_s"], f["bandwidth_Bps"]) for k, f in c["kinds"].items()}
    out["source"] = (f"{what}, "
                     f"{'per-kind fits' if not given else 'machine fit with config: projection.' + given[0]} "
                     f"({c['measured_at']})")
    return out


def project(cfg, comm_by_kind: dict[str, float], layout: Layout, measure: bool = True) -> dict:
    """The projected step time of ``cfg`` (a resolved config) on ``layout`` moving ``comm_by_kind`` bytes per rank
    per step (see the module doc). ``measure=False``: only cached calibrations; a missing one leaves step_s None."""
    c = GPTConfig.from_cfg(cfg.model)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.data_ranks * c.seq_len
    on_cpu = not projection_setting(cfg, "device") and not torch.cuda.is_available()
    flops = c.flops_per_token() * tokens / (layout.processes if on_cpu else layout.world)
    device, peak, peak_src = device_peak(cfg, layout, measure)
    eff, eff_src = efficiency(cfg, layout, peak, measure)
    compute = flops / (peak * 1e12 * eff) if peak and eff else None
    n = group_size(layout)
    ln = link(cfg, comm_by_kind, n, measure)
    by_kind, comm = {}, 0.0
    if any(v > 0 for v in comm_by_kind.values()):  # no calibration to be had: no comm time, no step
        linked = ln["bandwidth_Bps"] and ln["alpha_s"] is not None
        by_kind = comm_seconds(comm_by_kind, n, ln["alpha_s"], ln["bandwidth_Bps"], ln["per_kind"]) if linked else {}
        comm = sum(by_kind.values()) if linked else None
    assumptions = (f"a model, not a measurement: {device} at {_g(peak)} TFLOP/s x efficiency {_g(eff)}; "
                   f"alpha {_g(ln['alpha_s'], 1e6)} us, B {_g(ln['bandwidth_Bps'], 1e-9)} GB/s"
                   f"{' (per-kind fits)' if ln['per_kind'] else ''}, ring/tree costs on {n} ranks, a latency per "
                   f"{BUCKET // 2**20} MiB message; no overlap of compute and communication (an upper bound); "
                   f"no pipeline bubble")
    return {"compute_s": compute, "comm_s": comm, "step_s": None if compute is None or comm is None else compute + comm,
            "device": device, "peak_tflops": peak, "efficiency": eff, "alpha_s": ln["alpha_s"],
            "bandwidth_Bps": ln["bandwidth_Bps"], "flops_per_device": flops, "group_size": n,
            "comm_s_by_kind": by_kind, "source": f"peak: {peak_src}; efficiency: {eff_src}; comm: {ln['source']}",
            "assumptions": assumptions}


def _g(v: float | None, scale: float = 1.0) -> str:
    return "?" if v is None else f"{v * scale:.3g}"
