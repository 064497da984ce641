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
FAST = ["model=tiny", "train.steps=6", "train.untimed_steps=1", "train.micro_batch_size=2", "peak_tflops=1"]


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


# ---- in-process ranks: the loop itself on 2 gloo ranks, without the CLI, Hydra or torch's agent ----
# For parity tests, where the subprocess launch is not what is tested.

def compose_run(*overrides: str, checked: bool = True):
    """The resolved run config for these overrides, as ``python -m parallelkit.run`` would build it
    (``checked=False``: composed only, no checks)."""
    from hydra import compose, initialize_config_dir

    from parallelkit.config import resolve
    from parallelkit.run import open_strategy_keys

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=open_strategy_keys(["world_size=2", *FAST, *overrides]))
    return resolve(cfg) if checked else cfg


def _rank_main(rank: int, world: int, port: int, run_dir: str) -> None:
    from omegaconf import OmegaConf

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from parallelkit.train import worker

    code = worker(OmegaConf.load(Path(run_dir) / "config.yaml"), Path(run_dir))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the real worker: skip interpreter teardown, where backend threads can abort


def train_ranks(tmp_path: Path, name: str, *overrides: str) -> dict:
    """Run the training loop on the layout's processes (spawned, gloo) and return rank 0's summary."""
    import socket

    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    from parallelkit.config import plan

    cfg = compose_run(*overrides)
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nproc = plan(cfg)[2].processes
    mp.spawn(_rank_main, args=(nproc, port, str(out)), nprocs=nproc, join=True)
    s = summary(out)
    assert s["status"] == "ok", s
    return s


# ---- several runs in one process group: for matrices of runs, where process start-up would dominate ----

def prepare_run(out: Path, *overrides: str) -> Path:
    """A run folder holding the resolved config for these overrides (what ``jobs_in_one_group`` runs)."""
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(compose_run(*overrides), out / "config.yaml", resolve=True)
    return out


def _jobs_main(rank: int, world: int, port: int, jobs: list) -> None:
    import dataclasses
    import json

    from omegaconf import OmegaConf

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from parallelkit import checkpoint
    from parallelkit.config import plan
    from parallelkit.jsonio import write_json
    from parallelkit.results import base_summary
    from parallelkit.train import init_distributed, make_strategy, run_steps, train

    ctx0 = None
    for job in jobs:
        run_dir = Path(job[1])
        cfg = OmegaConf.load(run_dir / "config.yaml")
        layout = plan(cfg)[2]
        ctx0 = ctx0 or init_distributed(layout)
        ctx = dataclasses.replace(ctx0, layout=layout)
        if job[0] == "train":  # the whole run, as a worker does it
            s = train(cfg, ctx, run_dir, base_summary(cfg))
            if rank == 0:
                write_json(run_dir / "summary.json", s)
        else:  # ("resume", run_dir, checkpoints): one strategy, stepped on from each checkpoint in turn
            strategy, out = make_strategy(cfg, ctx, None), {}
            for ck in job[2]:
                start = checkpoint.load(strategy, Path(ck))
                out[str(ck)] = run_steps(strategy, cfg, start, None).losses
            strategy.teardown()
            if rank == 0:
                (run_dir / "resumed.json").write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def jobs_in_one_group(nproc: int, jobs: list) -> None:
    """Run ``jobs`` one after another in the same ``nproc`` spawned processes and process group (gloo):
    ``("train", run_dir)`` trains a prepared run and writes its summary.json; ``("resume", run_dir, [ckpt, ...])``
    sets the run's strategy up once, loads each checkpoint in turn and steps to ``train.steps``, writing the
    losses after each to run_dir/resumed.json."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_jobs_main, args=(nproc, port, [[str(x) if isinstance(x, Path) else x for x in j] for j in jobs]),
             nprocs=nproc, join=True)
