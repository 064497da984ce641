"""Shared test helpers: run the real CLI (real worker processes, gloo) and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: tiny model, few steps. Tests add or override keys.
FAST = ["model=tiny", "train.steps=6", "train.warmup_steps=1", "train.micro_batch_size=2", "peak_tflops=1"]


def run_cli(out: Path, *overrides: str, module: str = "parallelkit.run", timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m parallelkit.run`` with hydra.run.dir=out; returns the finished process."""
    cmd = [sys.executable, "-m", module, *overrides]
    if module == "parallelkit.run" and not any(o.startswith("-m") for o in overrides):
        cmd.append(f"hydra.run.dir={out}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def train(tmp_path: Path, name: str, *overrides: str) -> dict:
    """Run one configuration to completion and return its summary; fail with the run's stderr."""
    out = tmp_path / name
    p = run_cli(out, *FAST, *overrides)
    assert p.returncode == 0, f"run {name} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    s = summary(out)
    assert s["status"] == "ok", s
    return s


def assert_close_trajectory(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"step {i}: {x} vs {y} (rtol {rtol}); {a} vs {b}"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
