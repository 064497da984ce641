"""metrics.jsonl and summary.json: the run's results, written atomically."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

STATUSES = ("ok", "oom", "failed", "timeout")


def write_json(path: Path, obj: Any) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _jsonable(o: Any):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "deepspeed", "fairscale", "hydra", "omegaconf"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                from importlib.metadata import version

                out[mod] = version({"hydra": "hydra-core"}.get(mod, mod))
            except Exception:  # noqa: BLE001 - not installed
                out[mod] = None
        else:
            out[mod] = getattr(m, "__version__", None)
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem}


def base_summary(cfg) -> dict[str, Any]:
    """The fields known before training; a failed run's summary is this plus status and error."""
    from .calibrate import host_facts  # measure (issue 10)
    from .config import strategy_class
    from .model import GPTConfig

    cls = strategy_class(cfg)
    layout, label, params = cls.layout(cfg), cls.label(cfg), GPTConfig.from_cfg(cfg.model).num_params()
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * max(layout["dp"], layout.get("virtual_dp", 1)) * cfg.model.seq_len
    return {
        "status": "failed", "error": None,
        "strategy": cfg.strategy.name, "label": label,
        "model": cfg.model.name, "params": params,
        "world_size": layout["world"], "dp": layout["dp"], "tp": layout["tp"], "pp": layout["pp"],
        "processes": layout["processes"],
        "precision": cfg.train.precision, "device": None,
        "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
        "global_batch": tokens_per_step // cfg.model.seq_len, "seq_len": cfg.model.seq_len,
        "steps": cfg.train.steps, "timed_steps": 0, "tokens_per_step": tokens_per_step,
        "tokens_per_s": None, "step_time_s": None, "tflops": None, "mfu": None, "peak_tflops": None,
        "peak_mem_bytes": None, "peak_mem_kind": None, "model_state_bytes": None, "model_state_breakdown": None,
        "comm_bytes_per_step": None, "losses": [], "final_loss": None,
        "versions": versions(), "machine": machine(),
        "host": host_facts(), "repeat": cfg.get("repeat"),  # measure (issue 10): CPU facts (the loop adds the GPU), repeats=N index
    }


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()
    return text[:400]
