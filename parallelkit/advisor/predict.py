"""Predictions made before a run, recorded beside what it measures, and the pre-flight fit check.

``predict(cfg)`` gives, for the busiest rank: model-state bytes and peak memory (the strategy's
``memory()``: memory_model.py), communication per step by kind (the strategy's ``comm()``: the
payload ``metrics.CommCounter`` counts) and the step time (projection.py). On CPU the measured
peak is a worker's peak RSS, so the prediction adds the process's own footprint: the resident
bytes of a worker that has imported its backend and joined a process group, before it builds
anything and what its backend keeps besides the model (``process_baseline``: measured once per backend
here with a real run of the tiny model, and cached).

``preflight(cfg)`` compares that peak with what a rank will have: the GPU's memory (or
``gpu_memory``) less the CUDA context, or on CPU the machine's available memory shared by the
local processes. It refuses only when the prediction exceeds that by more than ``MARGIN``,
the largest over-prediction measured on the runs in results/ (see ``MARGIN``), so it never
refuses what would have fitted there.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

from parallelkit.config.compose import STRATEGY_DIR, preset, shipped_default
from parallelkit.config.errors import DoesNotFit  # noqa: F401 - raised here, kept importable from here
from parallelkit.config.plan import RunPlan
from parallelkit.runtime.plan import build_plan
from parallelkit.strategies.shared.memory_model import GPU_ALLOWANCE, PARTS
from parallelkit.util.units import gib

CUDA_CONTEXT = GPU_ALLOWANCE  # what a GPU's context, cuBLAS workspace and allocator slack take before the first tensor
# Refuse only a prediction above available x (1 + MARGIN). The largest over-prediction of the peak (predicted /
# measured - 1) over every ok run in results/, each with the footprint its run was predicted with, was +20.5%
# (FSDP2 ZeRO-3 on `gpt_125m`, results/mem_phases; 2026-12-02, `python -m parallelkit.predict --check results`,
# which tests/test_advisor.py re-runs); MARGIN leaves room above it for other machines, so pre-flight refuses
# only what is clearly too big.
MARGIN_SEEN = 0.205
MARGIN = 0.25


class NotPredicted(Exception):
    """A backend that does not predict its memory: the pre-flight runs unchecked and the report says so."""


# ---- the process's own footprint ----
TINY = ["model=tiny", "train.steps=4", "train.untimed_steps=2", "train.micro_batch_size=2", "train.grad_accum=2",
        "train.global_batch_size=null", "peak_tflops=1", "preflight=false", "checkpoint.dir=null"]


def _presets_by_module() -> dict[str, list[str]]:
    """Backend module -> its presets, the plainest first (a base preset with no options, then the rest)."""
    out: dict[str, list[str]] = {}
    for p in sorted(Path(STRATEGY_DIR).glob("*.yaml"), key=lambda p: (len(p.read_text().splitlines()), p.stem)):
        target = next((line.split(":", 1)[1].strip() for line in p.read_text().splitlines()
                       if line.startswith("_target_:")), None)
        if target:
            out.setdefault(target.rsplit(".", 1)[0], []).append(p.stem)
    return out


RETRY_FAILED_S = 3600  # a failed footprint measurement is tried again after an hour (at once by --baseline)
# a footprint run started by rank 0 of a torchrun or SLURM job launches its own processes: not as a rank of that job
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def _measure_baseline(module: str, presets: list[str]) -> tuple[int | None, str]:
    """Peak RSS of a real run of this backend on the tiny model (2 layers, 64 wide), less the tiny model's own
    predicted parts (a few MB): the interpreter, the libraries, the process group, the backend's fixed buffers
    and the allocator's habits, as a worker of a real run has them. (bytes, "") or (None, why no run succeeded:
    the tiny run's own one-line error, e.g. a GPU-only backend's "needs a non-CPU accelerator device")."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(PARALLELKIT_NO_PREDICTION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent.parent),
                                                        os.environ.get("PYTHONPATH")])))
    why = []
    # the first preset that runs here (fsdp1 and fairscale_fsdp need a GPU), on the fewest ranks its layout takes
    # (one process costs half the time; measured: ddp and zero2 hold the same within 1 MiB at 1 and 2 ranks)
    for name in presets:
        for world in (1, 2, 4):
            with tempfile.TemporaryDirectory(prefix="parallelkit-footprint-") as tmp:
                cmd = [sys.executable, "-m", "parallelkit.run", f"strategy={name}", f"world_size={world}", *TINY,
                       f"hydra.run.dir={tmp}", "hydra.output_subdir=null"]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                                          stdin=subprocess.DEVNULL, check=False)
                except subprocess.TimeoutExpired:
                    why.append(f"strategy={name} world_size={world}: the tiny run took over 600 s")
                    break
                try:
                    summary = json.loads((Path(tmp) / "summary.json").read_text())
                except (OSError, ValueError):
                    last = next((ln for ln in reversed(done.stderr.splitlines()) if ln.strip()), "")
                    why.append(f"strategy={name} world_size={world}: the tiny run wrote no summary "
                               f"(exit code {done.returncode}{': ' + _one_line(last, 200) if last else ''})")
                    break  # the next preset
                if summary.get("status") == "ok" and summary.get("peak_mem_bytes"):
                    own = predict(RunPlan.of(OmegaConf.load(Path(tmp) / "config.yaml")), baseline=False,
                                   projection=False)["peak_mem_bytes"]  # a plan of that run: not this run's
                    return max(summary["peak_mem_bytes"]) - own, ""
                why.append(f"strategy={name} world_size={world}: {summary.get('status')}: "
                           f"{_one_line(summary.get('error') or 'no error given', 240)}")
                if "world_size" not in (summary.get("error") or ""):
                    break
    if not presets:
        return None, f"no preset in {STRATEGY_DIR} uses it"
    return None, "no tiny run of it succeeds on this machine: " + "; ".join(why[-2:])


_CACHE_LOCK = threading.Lock()  # threads of one process; the file lock below guards against other processes too


def _cache_path() -> Path:
    from parallelkit.measure.calibrate import cache_dir

    return cache_dir() / "process_baseline.json"


def _baseline_key() -> str:
    """The cache's key: what a worker's footprint depends on (the footprint is measured by a run at the shipped
    allocator setting)."""
    import torch

    from parallelkit.measure.host import versions

    return json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "versions": versions(),
                       "cores": os.cpu_count(), "mmap_threshold": shipped_default("train.cpu_mmap_threshold")},
                      sort_keys=True)


def _read_baseline(key: str) -> dict:
    """This key's entries (written by atomic renames: no lock needed to read a whole file)."""
    path = _cache_path()
    try:
        return (json.loads(path.read_text()) if path.exists() else {}).get(key, {})
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` held by this process and thread: fcntl.flock (released by the kernel if the
    process dies), with the thread lock where there is no fcntl."""
    with _CACHE_LOCK:
        try:
            import fcntl
        except ImportError:  # not POSIX: threads of this process only
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _merge_baseline(key: str, module: str, value) -> dict:
    """Set the cache's entry for (key, module) to ``value`` (bytes, or a failure {"error", "at"}), keeping every other
    entry: the read-modify-write holds a file lock beside the cache, so concurrent runs lose no update. Returns
    the key's entries as written."""
    from parallelkit.util.jsonio import write_json

    path = _cache_path()
    with _file_lock(path.with_name(path.name + ".lock")):
        try:
            everything = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a file not written by this code: start again
            everything = {}
        everything.setdefault(key, {})[module] = value
        write_json(path, everything)
    return everything[key]


def _is_bytes(entry) -> bool:
    return isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0


def _should_retry(entry, now: float, retry_failures: bool = False, after_s: float = RETRY_FAILED_S) -> bool:
    """Whether to measure this cache entry (again): never measured (or a bare None, how older versions kept a
    failure), a failure {"error", "at"} older than ``after_s``, or any failure when ``retry_failures``
    (``python -m parallelkit.predict --baseline``). A measured footprint is kept."""
    if _is_bytes(entry):
        return False
    if isinstance(entry, dict):
        try:
            return retry_failures or now - float(entry.get("at") or 0) >= after_s
        except (TypeError, ValueError):
            return True
    return True


def process_baseline(cls, measure: bool = True, retry_failures: bool = False) -> int:
    """What a worker of ``cls``'s backend holds besides the model's predicted parts: measured here once with a
    real tiny run (seconds; scripts/setup.sh measures every backend ahead), then read from the cache. A failed
    measurement is kept with its reason and time and tried again after an hour (``retry_failures``: now).
    With ``measure=False``, and on every rank but 0 of a torchrun job (only rank 0 measures), a backend not
    measured gets the largest footprint measured so far (cautious). RuntimeError (one line, with the reason)
    when there is none."""
    import time

    from parallelkit.config.env import rank, under_torchrun

    key, module, path = _baseline_key(), cls.__module__, _cache_path()
    known = _read_baseline(key)
    entry = known.get(module)
    if under_torchrun() and rank() != 0:
        measure = False
    if measure and _should_retry(entry, time.time(), retry_failures):
        again = " again" if module in known else ""
        print(f"parallelkit: measuring a {module.rsplit('.', 1)[-1]} worker's own footprint{again} with a tiny run "
              f"(cached in {path})", file=sys.stderr, flush=True)
        value, why = _measure_baseline(module, _presets_by_module().get(module, []))
        entry = value if value is not None else {"error": _one_line(why, 600), "at": time.time()}
        known = _merge_baseline(key, module, entry)  # another process or thread may have written meanwhile
    if _is_bytes(entry):
        return int(entry)
    measured = [v for v in known.values() if _is_bytes(v)]
    if not measure and measured:
        return int(max(measured))
    if isinstance(entry, dict):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(entry.get("at") or 0)))
        why = f"{entry.get('error') or 'the measurement failed'} (failed at {when}; tried again an hour after, or at once " \
              f"by `python -m parallelkit.predict --baseline`)"
    else:
        why = "not measured yet" + (" (only rank 0 of a torchrun job measures)" if measure is False and
                                    under_torchrun() and rank() != 0 else "")
    raise RuntimeError(f"no footprint for {module}: {why}")


def on_cuda() -> bool:
    with contextlib.suppress(Exception):
        import torch

        return torch.cuda.is_available()
    return False


# ---- the prediction ----
def predict(plan: RunPlan, baseline: bool = True, projection: bool = True, measure: bool = True) -> dict:
    """Predicted figures of this run's busiest rank, in the units the run measures."""
    cfg, cls, opts, lay = plan.cfg, plan.cls, plan.opts, plan.layout
    m, comm = cls.memory(cfg, opts, lay, None), cls.comm(cfg, opts, lay)
    if m is None:
        raise NotPredicted(f"{plan.label}: its backend does not predict its memory")
    m = dict(m)
    stages = m.pop("stages", None)
    parts = {k: int(m.get(k, 0)) for k in PARTS}
    if stages and lay.processes < lay.world:  # a process that drives several stages' devices holds them all
        parts = {k: int(sum(st.get(k, 0) for st in stages)) for k in PARTS}
        m["offloaded"] = sum(st.get("offloaded", 0) for st in stages)
    cuda = on_cuda()
    offloaded = int(m.get("offloaded", 0))
    if not cuda and not m.get("offloaded_to_disk"):
        parts["offloaded"] = offloaded  # on CPU, state offloaded to host memory is still this process's memory
    base = 0 if cuda or not baseline else process_baseline(cls, measure)
    comm = None if comm is None else {k: int(v) for k, v in comm.items() if v}
    # on the device; on CPU also what is "offloaded" to host memory, which is the same memory there
    out = {"model_state_bytes": parts["params"] + parts["grads"] + parts["optimizer"] + parts.get("offloaded", 0),
           "peak_mem_bytes": sum(parts.values()) + base, "parts": parts, "process_baseline_bytes": base,
           "offloaded_bytes": offloaded, "comm_by_kind": comm,
           "comm_bytes_per_step": None if comm is None else sum(comm.values()),
           "step_time_s": None, "projection": None,
           "peak_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss"}
    if stages:
        out["stage_peaks"] = [int(sum(st.get(k, 0) for k in PARTS) + base) for st in stages]
    if projection:
        out.update(project_fields(plan, comm, parts))
    return out


def project_fields(plan: RunPlan, comm: dict | None, parts: dict | None = None) -> dict:
    """``step_time_s`` and ``projection`` (projection.py), or the error that stopped the projection."""
    from parallelkit.advisor.projection import project_plan

    try:
        if comm is None:
            raise ValueError("its backend does not predict its communication (not predicted)")
        proj = project_plan(plan, comm, parts)
        return {"step_time_s": proj["step_s"], "projection": proj}
    except Exception as e:  # noqa: BLE001 - a projection that cannot be made leaves the memory prediction
        return {"step_time_s": None, "projection": {"error": " ".join(str(e).split())[:200]}}


def summary_fields(plan: RunPlan, p: dict | None = None) -> dict:
    """The predicted_* fields of summary.json from ``p`` (or a new prediction); only a note when the prediction
    itself fails: the run is not its hostage."""
    if os.environ.get("PARALLELKIT_NO_PREDICTION"):  # the footprint's own tiny runs
        return {}
    try:
        if p is None:
            p = predict(plan)
        elif not p.get("projection"):  # the pre-flight's memory prediction: add the projection only
            p = {**p, **project_fields(plan, p["comm_by_kind"], p.get("parts"))}
    except Exception as e:  # noqa: BLE001
        return {"prediction": {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}}
    try:
        largest = largest_fitting(plan)
    except Exception as e:  # noqa: BLE001
        largest = {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    return {"predicted_largest_model": largest,
            "predicted_model_state_bytes": p["model_state_bytes"], "predicted_peak_mem_bytes": p["peak_mem_bytes"],
            "predicted_comm_bytes_per_step": p["comm_bytes_per_step"], "predicted_comm_by_kind": p["comm_by_kind"],
            "predicted_step_time_s": p["step_time_s"],
            "prediction": {k: p[k] for k in ("parts", "process_baseline_bytes", "offloaded_bytes", "peak_kind",
                                             "projection", "stage_peaks") if k in p}}


# ---- what a rank has ----
def available_per_rank(cfg, processes: int) -> tuple[int, str]:
    """Bytes one rank can use and where the figure comes from: ``gpu_memory`` (or the local GPU's memory) less the
    CUDA context, else (CPU) the machine's available memory shared by the local processes."""
    from parallelkit.config.checks import parse_bytes

    ctx = f"less {CUDA_CONTEXT / 2**30:.0f} GiB for the CUDA context"
    if (given := parse_bytes(cfg.get("gpu_memory"))) is not None:
        return given - CUDA_CONTEXT, f"gpu_memory={cfg.get('gpu_memory')} {ctx}"
    if on_cuda():
        import torch

        return torch.cuda.get_device_properties(0).total_memory - CUDA_CONTEXT, f"{torch.cuda.get_device_name(0)} {ctx}"
    avail = _mem_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    return avail // max(1, local), f"this machine's available memory {avail / 2**30:.1f} GiB / {local} local process(es)"


def judged(plan: RunPlan, p: dict) -> tuple[int, int, str]:
    """(predicted bytes, bytes a rank has, where that comes from). With ``gpu_memory`` on a machine without CUDA
    the user plans for a GPU: the device's bytes count (model state, buffers, activations; not what is offloaded
    to the host nor a CPU process's own footprint)."""
    cfg = plan.cfg
    avail, source = available_per_rank(cfg, plan.layout.processes)
    if cfg.get("gpu_memory") is not None and not on_cuda():
        return p["peak_mem_bytes"] - p["process_baseline_bytes"] - p["parts"].get("offloaded", 0), avail, \
            source + " (planning for a GPU: device bytes only)"
    return p["peak_mem_bytes"], avail, source


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
    return info.get("MemAvailable", info.get("MemFree", 0))


def fits(predicted: int, available: int) -> bool:
    return predicted <= available * (1 + MARGIN)


def alternatives(plan: RunPlan, available: int, limit: int = 5) -> list[tuple[str, int]]:
    """Presets (conf/strategy) predicted to fit on this run's model, global batch and world size, largest margin
    first: each at the configured micro-batch, else at micro-batch 1 with activation checkpointing (the same
    global batch, more accumulation)."""
    cfg, t = plan.cfg, plan.cfg.train
    found = []
    for name in sorted(p.stem for p in Path(STRATEGY_DIR).glob("*.yaml")):
        variants = [("", {})]
        if t.micro_batch_size > 1 or not t.activation_checkpointing:
            variants.append((" with train.micro_batch_size=1 train.activation_checkpointing=true",
                             {"micro_batch_size": 1, "grad_accum": t.micro_batch_size * t.grad_accum,
                              "activation_checkpointing": True}))
        for how, change in variants:
            pc = copy.deepcopy(cfg)
            OmegaConf.set_readonly(pc, False)
            pc.strategy = preset(name)
            for k, v in change.items():
                pc.train[k] = v
            try:
                alt = build_plan(pc, quiet=True)
                peak = judged(alt, predict(alt, projection=False, measure=False))[0]
            except Exception:  # noqa: BLE001 - a preset that cannot run here is no alternative
                continue
            if peak <= available:
                found.append((name + how, available - peak))
                break
    return sorted(found, key=lambda x: -x[1])[:limit]


FIT_LADDER = ("tiny", "small", "gpt_125m", "gpt_350m", "gpt_760m", "gpt_1b")  # conf/model, smallest first


def largest_fitting(plan: RunPlan) -> dict | None:
    """The largest GPT preset of ``FIT_LADDER`` this run's strategy, layout, batch, precision, sequence length and
    vocabulary are predicted to fit on what a rank has (as the pre-flight judges it): {model, params, predicted,
    available, source}; None when not even the smallest is predicted to fit; {error} when none could be planned."""
    from parallelkit.config.compose import CONF_DIR
    from parallelkit.models.gpt import GPTConfig

    best, planned, why = None, 0, ""
    for name in FIT_LADDER:
        pc = copy.deepcopy(plan.cfg)
        OmegaConf.set_readonly(pc, False)
        shape = OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
        for k in ("name", "n_layer", "d_model", "n_head"):
            pc.model[k] = shape[k]
        try:  # a what-if of the run's own plan (its checks on the new shape; not a plan of this run: not counted)
            alt = RunPlan.of(pc)
            alt.cls.check(pc, alt.opts)
            used, avail, source = judged(alt, predict(alt, projection=False, measure=False))
        except Exception as e:  # noqa: BLE001 - a shape this strategy cannot plan (a pipeline's balance): not a fit
            why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            continue
        planned += 1
        if not fits(used, avail):
            break
        best = {"model": name, "params": GPTConfig.from_cfg(pc.model).num_params(), "predicted_bytes": int(used),
                "available_bytes": int(avail), "source": source}
    return best if planned else {"error": why}


def preflight(plan: RunPlan) -> dict | None:
    """Raise DoesNotFit (one line) when the run is predicted not to fit; else return the prediction (None when
    ``preflight=false``)."""
    if not plan.cfg.get("preflight", True) or os.environ.get("PARALLELKIT_NO_PREDICTION"):
        return None
    try:
        p = predict(plan, projection=False)  # memory only: seconds, no benchmark on a first use
    except Exception as e:  # noqa: BLE001 - no prediction: nothing to refuse on; say so and run
        print(f"parallelkit: pre-flight: no prediction ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
              "running unchecked", file=sys.stderr)
        return None
    used, avail, source = judged(plan, p)
    if fits(used, avail):
        return p
    g = gib
    alt = alternatives(plan, avail)
    names = ", ".join(f"strategy={n} ({g(m)} spare)" for n, m in alt) or "none at this world size; try more ranks " \
        "or a smaller model"
    raise DoesNotFit(f"predicted {g(used)} per rank, {g(avail)} available ({source}): "
                     f"will not fit; presets that fit, largest margin first: {names}; preflight=false runs it anyway")


def check_results(root: Path, measure: bool = True) -> dict:
    """Predicted over measured peak and model state for every ok run under ``root`` (its saved config): the
    evidence behind MARGIN, and the check that pre-flight would have refused none of them. A run that recorded no
    worker footprint (a tune's trial) is predicted with this machine's, measured if missing; ``measure=False``
    leaves such a run out (a row with its reason), measuring nothing."""

    rows = []
    for s_path in sorted(root.rglob("summary.json")):
        s = json.loads(s_path.read_text())
        c_path = s_path.parent / "config.yaml"
        if s.get("status") != "ok" or not c_path.exists() or not s.get("peak_mem_bytes"):
            continue
        recorded = (s.get("prediction") or {}).get("process_baseline_bytes")
        if recorded is None and not measure:
            rows.append({"run": str(s_path.parent), "error": "no worker footprint recorded (not measured here)"})
            continue
        try:  # the footprint the run was predicted with, where it recorded one (the prediction as it was made)
            plan = RunPlan.of(OmegaConf.load(c_path))  # a plan of that run, not of this process's
            p = predict(plan, baseline=recorded is None, projection=False)
            if recorded is not None:
                p["peak_mem_bytes"] += recorded
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
    if argv == ["--baseline"]:  # scripts/setup.sh: measure every backend's footprint once, ahead of any run
        import time

        if on_cuda():  # a GPU's memory is judged by the allocator's bytes: no process footprint in it
            print("parallelkit: on a GPU the pre-flight check needs no worker footprint; nothing measured")
            return

        from omegaconf import OmegaConf

        from parallelkit.config.plan import strategy_class

        t0 = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        def one(item):
            module, presets = item
            t1 = time.perf_counter()
            try:  # failures cached earlier are tried again now
                cls = strategy_class(OmegaConf.create({'strategy': preset(presets[0])}))
                got = f"{process_baseline(cls, retry_failures=True) / 2**20:,.0f} MiB"
            except Exception as e:  # noqa: BLE001 - e.g. a GPU-only backend on a CPU machine: its reason, one line
                got = f"not measured: {' '.join(str(e).split())[:600]}"
            print(f"  {module.rsplit('.', 1)[-1]}: {got} ({time.perf_counter() - t1:.0f} s)", flush=True)

        with ThreadPoolExecutor(2) as pool:  # most are one-process runs, mostly start-up: two at a time
            list(pool.map(one, _presets_by_module().items()))
        print(f"parallelkit: each backend's worker footprint measured in {time.perf_counter() - t0:.0f} s "
              f"(cached for the pre-flight check)")
        return
    print("usage: python -m parallelkit.predict --check RESULTS_DIR | --baseline", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
