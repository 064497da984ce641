"""Predictions made before a run, recorded beside what it measures, and the pre-flight fit check.

``predict(cfg)`` gives, for the busiest rank: model-state bytes and peak memory (the strategy's
``memory()``: memory_model.py), communication per step by kind (the strategy's ``comm()``: the
payload ``metrics.CommCounter`` counts) and the step time (projection.py). On CPU the measured
peak is a worker's peak RSS, so the prediction adds the process's own footprint: the resident
bytes of a worker that has imported its backend and joined a process group, before it builds
anything (``process_baseline``: measured once per backend here, in a subprocess, and cached).

``preflight(cfg)`` compares that peak with what a rank will have: the GPU's memory (or
``gpu_memory``) less the CUDA context, or on CPU the machine's available memory shared by the
local processes. It refuses only when the prediction exceeds that by more than ``MARGIN``,
the largest over-prediction measured on the runs in results/ (see ``MARGIN``), so it never
refuses what would have fitted there.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, plan, preset, validate

PARTS = ("params", "grads", "optimizer", "buffers", "activations")
CUDA_CONTEXT = 2**30  # what a GPU's context, cuBLAS workspace and allocator slack take before the first tensor
# Refuse only a prediction above available x (1 + MARGIN). The largest over-prediction of the peak (predicted /
# measured - 1) over every ok run in results/ at the time of writing was MARGIN_SEEN; MARGIN leaves room above it.
# `python -m parallelkit.predict --check results` recomputes it (tests/test_advisor.py checks it still holds).
MARGIN_SEEN = 0.15
MARGIN = 0.25


class DoesNotFit(ConfigError):
    """The pre-flight check: the predicted peak memory per rank clearly exceeds what a rank has."""


# ---- the process's own footprint ----
# One subprocess imports what every worker imports, then forks a child per backend module: the child imports the
# module, joins a one-rank gloo group and reports its resident bytes (inherited pages count, as in a worker).
_BASELINE_SCRIPT = r"""
import importlib, json, os, sys, tempfile
import parallelkit.train
import torch, torch.distributed as dist
threads, out = int(sys.argv[1]), {}
for module in sys.argv[2:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            torch.set_num_threads(threads)
            dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
            dist.all_reduce(torch.ones(1))
            status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
            os.write(w, str(int(status["VmRSS"].split()[0]) * 1024).encode())
        finally:
            os._exit(0)
    os.close(w)
    text = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    if text:
        out[module] = int(text)
print(json.dumps(out))
"""


def _strategy_modules() -> list[str]:
    from .config import STRATEGY_DIR

    mods = set()
    for p in Path(STRATEGY_DIR).glob("*.yaml"):
        for line in p.read_text().splitlines():
            if line.startswith("_target_:"):
                mods.add(line.split(":", 1)[1].strip().rsplit(".", 1)[0])
    return sorted(mods)


def process_baseline(cls, threads: int = 1) -> int:
    """Resident bytes of a worker of ``cls``'s backend before it builds its model: measured here for every
    backend at once the first time one is needed (a few seconds), then read from the cache."""
    import torch

    from .calibrate import cache_dir
    from .host import versions
    from .jsonio import write_json

    key = json.dumps({"threads": threads, "python": sys.version.split()[0], "torch": torch.__version__,
                      "versions": versions()}, sort_keys=True)
    path = cache_dir() / "process_baseline.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    module = cls.__module__
    if module not in cached.get(key, {}):
        mods = sorted(set(_strategy_modules()) | {module})
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH")]))}
        out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(threads), *mods], capture_output=True,
                             text=True, env=env, timeout=600)
        try:
            measured = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            measured = {}
        if module not in measured:
            raise RuntimeError(f"could not measure a {module} worker's footprint: {out.stderr.strip()[-300:]}")
        try:  # another process may have written meanwhile: merge
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        cached.setdefault(key, {}).update(measured)
        write_json(path, cached)
    return int(cached[key][module])


def on_cuda() -> bool:
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.is_available()
    return False


# ---- the prediction ----
def predict(cfg, baseline: bool = True) -> dict:
    """Predicted figures of this run's busiest rank (a resolved config), in the units the run measures."""
    from .metrics import cpu_threads

    cls, opts, lay = plan(cfg)
    m = dict(cls.memory(cfg, opts, lay, None))
    stages = m.pop("stages", None)
    parts = {k: int(m.get(k, 0)) for k in PARTS}
    cuda = on_cuda()
    offloaded = int(m.get("offloaded", 0))
    if not cuda and "nvme" not in (getattr(opts, "offload_optimizer", None), getattr(opts, "offload_param", None)):
        parts["offloaded"] = offloaded  # on CPU, state offloaded to host memory is still this process's memory
    base = 0 if cuda or not baseline else process_baseline(cls, cpu_threads(lay.processes))
    comm = {k: int(v) for k, v in cls.comm(cfg, opts, lay).items() if v}
    out = {"model_state_bytes": parts["params"] + parts["grads"] + parts["optimizer"],  # on the device
           "peak_mem_bytes": sum(parts.values()) + base, "parts": parts, "process_baseline_bytes": base,
           "offloaded_bytes": offloaded, "comm_by_kind": comm, "comm_bytes_per_step": sum(comm.values()),
           "step_time_s": None, "projection": None,
           "peak_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss"}
    if stages:
        out["stage_peaks"] = [int(sum(st.get(k, 0) for k in PARTS) + base) for st in stages]
    with contextlib.suppress(ImportError):
        from .projection import project

        try:
            proj = project(cfg, comm, lay)
            out.update(step_time_s=proj["step_s"], projection=proj)
        except Exception as e:  # noqa: BLE001 - a projection that cannot be made leaves the memory prediction
            out["projection"] = {"error": " ".join(str(e).split())[:200]}
    return out


def summary_fields(cfg, p: dict | None = None) -> dict:
    """The predicted_* fields of summary.json from ``p`` (or a new prediction); only a note when the prediction
    itself fails: the run is not its hostage."""
    try:
        p = p or predict(cfg)
    except Exception as e:  # noqa: BLE001
        return {"prediction": {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}}
    return {"predicted_model_state_bytes": p["model_state_bytes"], "predicted_peak_mem_bytes": p["peak_mem_bytes"],
            "predicted_comm_bytes_per_step": p["comm_bytes_per_step"], "predicted_comm_by_kind": p["comm_by_kind"],
            "predicted_step_time_s": p["step_time_s"],
            "prediction": {k: p[k] for k in ("parts", "process_baseline_bytes", "offloaded_bytes", "peak_kind",
                                             "projection", "stage_peaks") if k in p}}


# ---- what a rank has ----
def available_per_rank(cfg, processes: int) -> tuple[int, str]:
    """Bytes one rank can use and where the figure comes from."""
    if on_cuda():
        import torch

        from .estimate import parse_bytes

        total = parse_bytes(cfg.get("gpu_memory"))
        source = f"gpu_memory={cfg.get('gpu_memory')}" if total else torch.cuda.get_device_name(0)
        total = total or torch.cuda.get_device_properties(0).total_memory
        return total - CUDA_CONTEXT, f"{source} less {CUDA_CONTEXT / 2**30:.0f} GiB for the CUDA context"
    avail = _mem_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    return avail // max(1, local), f"this machine's available memory {avail / 2**30:.1f} GiB / {local} local process(es)"


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
    return info.get("MemAvailable", info.get("MemFree", 0))


def fits(predicted: int, available: int) -> bool:
    return predicted <= available * (1 + MARGIN)


def alternatives(cfg, available: int, limit: int = 5) -> list[tuple[str, int]]:
    """Presets (conf/strategy) predicted to fit on this run's model, batch and world size, largest margin first."""
    from .config import STRATEGY_DIR

    found = []
    for name in sorted(p.stem for p in Path(STRATEGY_DIR).glob("*.yaml")):
        pc = cfg.copy()
        pc.strategy = preset(name)
        try:
            validate(pc)
            peak = predict(pc)["peak_mem_bytes"]
        except Exception:  # noqa: BLE001 - a preset that cannot run here is no alternative
            continue
        if peak <= available:
            found.append((name, available - peak))
    return sorted(found, key=lambda x: -x[1])[:limit]


def preflight(cfg) -> dict | None:
    """Raise DoesNotFit (one line) when the run is predicted not to fit; else return the prediction (None when
    ``preflight=false``)."""
    if not cfg.get("preflight", True):
        return None
    lay = plan(cfg)[2]
    try:
        p = predict(cfg)
    except Exception as e:  # noqa: BLE001 - no prediction: nothing to refuse on; say so and run
        print(f"parallelkit: pre-flight: no prediction ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
              "running unchecked", file=sys.stderr)
        return None
    avail, source = available_per_rank(cfg, lay.processes)
    if fits(p["peak_mem_bytes"], avail):
        return p
    g = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    alt = alternatives(cfg, avail)
    names = ", ".join(f"{n} ({g(avail - m)})" for n, m in alt) or "none of the presets at this micro-batch; " \
        "try a smaller train.micro_batch_size, train.activation_checkpointing=true or more ranks"
    raise DoesNotFit(f"predicted {g(p['peak_mem_bytes'])} per rank, {g(avail)} available ({source}): "
                     f"will not fit; presets that fit, largest margin first: {names}; preflight=false runs it anyway")


def check_results(root: Path) -> dict:
    """Predicted over measured peak and model state for every ok run under ``root`` (its saved config): the
    evidence behind MARGIN, and the check that pre-flight would have refused none of them."""
    from omegaconf import OmegaConf

    rows = []
    for s_path in sorted(root.rglob("summary.json")):
        s = json.loads(s_path.read_text())
        c_path = s_path.parent / "config.yaml"
        if s.get("status") != "ok" or not c_path.exists() or not s.get("peak_mem_bytes"):
            continue
        cfg = OmegaConf.load(c_path)
        try:
            p = predict(cfg)
        except Exception as e:  # noqa: BLE001
            rows.append({"run": str(s_path.parent), "error": str(e)[:200]})
            continue
        peak = max(s["peak_mem_bytes"])
        rows.append({"run": str(s_path.parent), "label": s.get("label"), "measured_peak": peak,
                     "predicted_peak": p["peak_mem_bytes"], "peak_ratio": p["peak_mem_bytes"] / peak,
                     "measured_state": max(s.get("model_state_bytes") or [0]), "predicted_state": p["model_state_bytes"]})
    ratios = [r["peak_ratio"] for r in rows if "peak_ratio" in r]
    return {"rows": rows, "max_over": max(ratios) - 1 if ratios else None, "max_under": 1 - min(ratios) if ratios else None}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--check":
        rep = check_results(Path(argv[1]))
        for r in rep["rows"]:
            if "error" in r:
                print(f"{r['run']}: not predicted: {r['error']}")
            else:
                print(f"{r['peak_ratio']:6.3f}  peak {r['predicted_peak'] / 2**20:8.0f} / {r['measured_peak'] / 2**20:8.0f} MiB"
                      f"  state {r['predicted_state'] / 2**20:8.1f} / {r['measured_state'] / 2**20:8.1f} MiB  {r['run']}")
        print(f"largest over-prediction of the peak: {rep['max_over']:+.1%}; largest under-prediction: "
              f"{rep['max_under']:+.1%}; pre-flight refuses above +{MARGIN:.0%}")
        return
    print("usage: python -m parallelkit.predict --check RESULTS_DIR", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
