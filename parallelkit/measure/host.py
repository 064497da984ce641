"""The machine and the library versions a run or a checkpoint was made with."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any


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
