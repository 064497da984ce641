"""The device peak behind MFU, measured properly on CPU and kept per machine.

A CPU has no data-sheet figure that holds for one worker: its peak depends on the thread
count, on the dtype's kernels (bf16 without AVX512-BF16 or AMX is emulated, ~60x slower
than fp32) and on whatever else the machine is doing. One short matmul at start-up let a
busy moment set the denominator (MFU 110% one run, 53% the next). So: square matmuls at
several sizes, the best of several trials, in the run's dtype and thread count, cached per
CPU model + flags + threads + dtype + torch version, so a quiet measurement is reused.

``python -m parallelkit.calibrate [--force]`` measures ahead of time (or again);
``PARALLELKIT_RECALIBRATE=1`` makes runs re-measure; ``PARALLELKIT_CACHE`` moves the cache
(default ``~/.cache/parallelkit``). On CUDA the peak is the data sheet (util/devices.py).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from parallelkit.measure.metrics import cpu_threads
from parallelkit.util.cache import cache_dir  # noqa: F401 - importers name it here too
from parallelkit.util.devices import CUDA_PEAK_TFLOPS, device_entry
from parallelkit.util.dtypes import DTYPES
from parallelkit.util.jsonio import write_json

SIZES = (128, 256, 512, 1024, 2048)  # CPU: the best is often a small one (caches; emulated bf16)
CUDA_SIZES = (4096, 8192)
FULL_S, FULL_TRIALS = 2.0, 5  # calibration: ~2 s, best of 5 (then cached)
CHECK_S, CHECK_TRIALS = 0.6, 3  # the re-check after a run: shorter, best of 3
SLOW_BF16 = 2.0  # bf16 matmul this many times slower than fp32: warn before the run
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # they change the kernels used
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                model = val.strip()
            elif key.strip() in ("flags", "Features"):  # x86, arm64
                flags = frozenset(val.split())
                break
    return model, flags


def host_facts(device: torch.device | None = None) -> dict:
    """What decides the speed of this host: CPU model, vector units, cores (and the GPU, if used)."""
    model, flags = _cpuinfo()
    facts = {"cpu": model, **{f: f in flags for f in FLAGS},
             "native_bf16": bool({"avx512_bf16", "amx_bf16", "bf16"} & flags),  # "bf16": arm64's flag
             "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
             "gpu": None}
    if device is not None and device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def cache_key(precision: str, threads: int, device: torch.device) -> dict:
    model, flags = _cpuinfo()
    key = {"cpu": model, "flags": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
           "threads": threads, "dtype": precision, "torch": torch.__version__,
           "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    if device.type == "cuda":
        key.update(gpu=torch.cuda.get_device_name(device), threads=None)
    return key


def cache_path(key: dict, kind: str = "peak") -> Path:
    """The cache file of a measurement of ``kind`` (peak, comm, efficiency) under ``key`` (host facts, versions)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{kind}-{key['dtype']}-{digest}.json"


def read_cache(key: dict, kind: str = "peak") -> dict | None:
    """The cached entry of ``kind`` made under exactly ``key``, or None."""
    try:
        entry = json.loads(cache_path(key, kind).read_text())
    except (OSError, ValueError):
        return None
    return entry if entry.get("key") == key else None


def write_cache(key: dict, entry: dict, kind: str = "peak") -> None:
    path = cache_path(key, kind)
    write_json(path, {"key": key, **entry})  # atomic: ranks calibrating at once never see half a file


def _read(key: dict) -> dict | None:
    entry = read_cache(key)
    return entry if entry is not None and entry.get("tflops", 0) > 0 else None


def _rate(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, seconds: float) -> float:
    """TFLOP/s of back-to-back ``a @ b`` for about ``seconds`` (at least one)."""
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=c)
        sync()
        reps += 1
        if (elapsed := time.perf_counter() - t0) >= seconds:
            return 2 * a.shape[0] ** 3 * reps / elapsed / 1e12


def _operands(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return a, b, torch.empty(n, n, dtype=dtype, device=device)


def _pick_size(dtype: torch.dtype, device: torch.device, budget_s: float) -> int:
    """The size with the best rate; the next size (8x the work) only while it fits the budget."""
    best, best_n = 0.0, None
    for n in CUDA_SIZES if device.type == "cuda" else SIZES:
        ops = _operands(n, dtype, device)
        t0 = time.perf_counter()
        _rate(*ops, 0.0)  # warm-up: one matmul
        once = time.perf_counter() - t0
        if (r := _rate(*ops, budget_s / 5)) > best:
            best, best_n = r, n
        if once * 8 > budget_s:  # slow kernels (emulated bf16): stay small
            break
    return best_n


@contextlib.contextmanager
def _threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def measure(precision: str, device: torch.device, threads: int | None = None, seconds: float = 2.0,
            trials: int = 5, size: int | None = None) -> dict:
    """Best-of-``trials`` matmul TFLOP/s in ``precision`` with ``threads`` threads (default: this process's)."""
    if device.type != "cuda" and precision == "fp16":
        raise ValueError("train.precision=fp16 has no CPU peak (fp16 training needs CUDA): use bf16 or fp32")
    dtype = DTYPES[precision]
    with _threads(threads or torch.get_num_threads()):
        n = size or _pick_size(dtype, device, seconds / 4)
        ops = _operands(n, dtype, device)
        _rate(*ops, 0.0)
        rates = [_rate(*ops, seconds / trials) for _ in range(trials)]
    if device.type == "cuda":  # leave no cached blocks behind to count as the run's reserved memory
        del ops
        torch.cuda.empty_cache()
    return {"tflops": max(rates), "size": n, "trials_tflops": rates,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def calibration(device: torch.device, precision: str, force: bool = False) -> dict:
    """The cached calibration of this machine for ``precision`` (measured now if missing or forced)."""
    threads = torch.get_num_threads()
    key = cache_key(precision, threads, device)
    force = force or os.environ.get("PARALLELKIT_RECALIBRATE", "") not in ("", "0")
    if not force and (entry := _read(key)) is not None:
        return {**entry, "cached": True}
    entry = measure(precision, device, threads, seconds=FULL_S, trials=FULL_TRIALS)
    write_cache(key, entry)
    return {**entry, "key": key, "cached": False}


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak TFLOP/s of one device (one rank's threads on CPU) for MFU, and where it comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (frag := device_entry(name)) and CUDA_PEAK_TFLOPS[frag].get(precision):
            return CUDA_PEAK_TFLOPS[frag][precision], f"data sheet: {frag} {precision}"
    c = calibration(device, precision)
    when = "cached, measured" if c["cached"] else "measured"
    what = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} (not in the data-sheet table)"
    threads = f", {c['key']['threads']} thread(s)" if device.type == "cpu" else ""
    return c["tflops"], (f"{what} matmul calibration: {precision}{threads}, n={c['size']}, best of "
                         f"{len(c['trials_tflops'])} ({when} {c['measured_at']})")


def recheck(device: torch.device, precision: str) -> float:
    """A short measurement like the calibration's, at its matrix size, for the drift of this run. It never
    changes the calibration: raising the cache whenever a re-check measured higher made the peak an all-time
    maximum, so drift and MFU fell as the cache aged (``PARALLELKIT_RECALIBRATE=1`` or ``--force`` re-measure)."""
    key = cache_key(precision, torch.get_num_threads(), device)
    cached = _read(key)
    return measure(precision, device, seconds=CHECK_S, trials=CHECK_TRIALS, size=cached and cached["size"])["tflops"]


def precision_warning(device: torch.device, precision: str) -> str | None:
    """One line when the run's precision is much slower than fp32 here (bf16 on a CPU without it)."""
    if precision != "bf16":
        return None
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5: no emulation to tell apart
            native = torch.cuda.is_bf16_supported()
        if native:
            return None
        return f"bf16 is emulated on {torch.cuda.get_device_name(device)} (no native bf16): use train.precision=fp16"
    bf16, fp32 = calibration(device, "bf16")["tflops"], calibration(device, "fp32")["tflops"]
    if fp32 / bf16 < SLOW_BF16:
        return None
    why = ("no native bf16 (neither avx512_bf16 nor amx_bf16)" if not host_facts()["native_bf16"]
           else "its bf16 matmul kernels are slow here although the CPU has bf16 instructions")
    return (f"bf16 matmuls run {fp32 / bf16:.0f}x slower than fp32 on this CPU: {why} ({bf16 * 1e3:.1f} vs "
            f"{fp32 * 1e3:.1f} GFLOP/s measured): use train.precision=fp32")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default: those of a 1- and a 2-process run on this machine)")
    ap.add_argument("--force", action="store_true", help="measure again even if cached")
    args = ap.parse_args(argv)
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else sorted({cpu_threads(1), cpu_threads(2)}, reverse=True))
    device = torch.device("cpu")
    print(f"cache: {cache_dir()}")
    for t in threads:
        with _threads(t):
            for p in args.precision.split(","):
                c = calibration(device, p, force=args.force)
                how = "cached" if c["cached"] else "measured now"
                print(f"{p:>5} {t:>2} thread(s): {c['tflops'] * 1e3:8.1f} GFLOP/s  n={c['size']}, best of "
                      f"{len(c['trials_tflops'])}, {how} ({c['measured_at']})")
                if warning := precision_warning(device, p):
                    print(f"      warning: {warning}")


if __name__ == "__main__":
    main()
