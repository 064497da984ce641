"""Shared test helpers: run the real CLI (real worker processes, gloo) and read what it wrote."""
from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# One cache folder per test run, never the user's (~/.cache/parallelkit): the matmul and collective calibrations
# and the worker footprints a test needs are measured into it, so no test depends on what a machine measured
# before, and no test changes what the user's runs read. Every process the tests start inherits it; one that
# imports this module again (a worker unpickling a test's function) keeps it, where it made a folder of its own
# that nothing removed (100-300 empty folders left in /tmp by each run of the suite).
_OWN = os.environ.get("PARALLELKIT_TEST_CACHE")
CACHE = Path(_OWN) if _OWN and Path(_OWN).is_dir() else Path(tempfile.mkdtemp(prefix="parallelkit-test-cache-"))
if str(CACHE) != _OWN:  # the pytest process: it made the folder, and removes it at its exit
    os.environ["PARALLELKIT_TEST_CACHE"] = str(CACHE)
    atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
os.environ["PARALLELKIT_CACHE"] = str(CACHE)
os.environ.pop("PARALLELKIT_RECALIBRATE", None)
os.environ["PARALLELKIT_RATES_FRESH_S"] = "86400"  # the session's runs project with the rates measured first: the
# projections tested are not timed against a drifting machine, and each run would measure them again (minutes)

# The processes the tests spawn in-process (train_ranks, jobs_in_one_group) fork from one server process that
# imported torch and the backends once (runtime.processes.spawn's forkserver), not each from a fresh interpreter:
# a few seconds less per spawn, over ~80 of them. The CLI tests start fresh interpreters, as users' runs do. With a
# GPU they spawn: no CUDA state may be forked.
multiprocessing.set_forkserver_preload(["torch", "parallelkit.runtime.loop", "deepspeed", "fairscale"])
START = "spawn" if torch.cuda.is_available() else "forkserver"

# Small and fast: tiny model, few steps. Tests add or override keys.
FAST = ["model=tiny", "train.steps=6", "train.untimed_steps=1", "train.micro_batch_size=2", "peak_tflops=1",
        "train.breakdown=false",  # the step-time breakdown is tested where it is asserted (test_report.py)
        "projection.framework=false"]  # the narrow runs behind the framework time: tested in test_framework.py


def run_cli(out: Path, *overrides: str, module: str = "parallelkit.run", timeout: int = 600,
            env: dict | None = None, predict: bool = False) -> subprocess.CompletedProcess:
    """``python -m parallelkit.run`` with hydra.run.dir=out; returns the finished process.

    ``predict=False`` (the default): no pre-flight and no predicted_* fields (PARALLELKIT_NO_PREDICTION, as the
    footprint's own tiny runs): a first prediction of a backend measures its worker footprint with a tiny run of
    its own, about 8 s, which only the tests of the predictions need."""
    cmd = [sys.executable, "-m", module, *overrides]
    if module == "parallelkit.run" and not any(o.startswith("-m") for o in overrides):
        cmd.append(f"hydra.run.dir={out}")
    extra = {} if predict else {"PARALLELKIT_NO_PREDICTION": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **extra, **(env or {})}, stdin=subprocess.DEVNULL)


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


def board_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's own reader finds in a run folder's event files: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_close_trajectory(a: list[float], b: list[float], rtol: float) -> None:
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rtol * abs(y), f"step {i}: {x} vs {y} (rtol {rtol}); {a} vs {b}"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The modules whose runs project a step on CPU, which needs bench_comm's calibration of 2 gloo ranks. The full one
# (8 sizes, then each kind as a run calls it) takes about a minute; these tests read the quick one (3 sizes, two
# run-like trials: a few seconds) saved under the full one's key, as a calibration the user made.
PROJECTING = {"test_advisor", "test_estimate", "test_framework", "test_report", "test_tune"}


@pytest.fixture(autouse=True, scope="module")
def _quick_comm_calibration(request):
    if request.module.__name__ not in PROJECTING or torch.cuda.is_available():
        return
    from parallelkit.advisor import bench_comm
    from parallelkit.measure import calibrate

    if bench_comm.load_calibration(2) is None:
        c = bench_comm.calibration(2, quick=True)
        calibrate.write_cache(bench_comm.cache_key(2), {k: v for k, v in c.items() if k not in ("key", "cached")},
                              "comm")


# ---- in-process ranks: the loop itself on 2 gloo ranks, without the CLI, Hydra or torch's agent ----
# For parity tests, where the subprocess launch is not what is tested.

def compose_run(*overrides: str, checked: bool = True):
    """The resolved run config for these overrides, as ``python -m parallelkit.run`` would build it
    (``checked=False``: composed only, no checks)."""
    from hydra import compose, initialize_config_dir

    from parallelkit.config.compose import open_strategy_keys
    from parallelkit.runtime.plan import build_plan

    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=open_strategy_keys(["world_size=2", *FAST, *overrides]))
    return build_plan(cfg).cfg if checked else cfg


def _rank_main(rank: int, run_dir: str) -> None:
    from parallelkit.config.plan import RunPlan
    from parallelkit.runtime.loop import worker

    code = worker(RunPlan.load(Path(run_dir)), Path(run_dir))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the real worker: skip interpreter teardown, where backend threads can abort


def compose_plan(*overrides: str):
    """The plan ``python -m parallelkit.run`` would build for these overrides (world_size 2, FAST)."""
    from hydra import compose, initialize_config_dir

    from parallelkit.config.compose import open_strategy_keys
    from parallelkit.runtime.plan import build_plan

    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=open_strategy_keys(["world_size=2", *FAST, *overrides]))
    return build_plan(cfg)


def train_ranks(tmp_path: Path, name: str, *overrides: str) -> dict:
    """Run the training loop on the plan's processes (spawned, gloo) and return rank 0's summary."""
    from parallelkit.runtime.processes import spawn

    plan = compose_plan(*overrides)
    out = tmp_path / name
    plan.save(out)
    spawn(_rank_main, plan.layout.processes, str(out), timeout=600, start_method=START)
    s = summary(out)
    assert s["status"] == "ok", s
    return s


# ---- several runs in one process group: for matrices of runs, where process start-up would dominate ----

def prepare_run(out: Path, *overrides: str) -> Path:
    """A run folder holding the plan for these overrides (what ``jobs_in_one_group`` runs)."""
    compose_plan(*overrides).save(out)
    return out


def _jobs_main(rank: int, jobs: list) -> None:
    import dataclasses
    import json

    from parallelkit.checkpoint import format as checkpoint
    from parallelkit.config.plan import RunPlan
    from parallelkit.measure.results import base_summary
    from parallelkit.runtime.loop import (
        init_distributed,
        make_strategy,
        run_steps,
        train,
    )
    from parallelkit.util.jsonio import write_json

    ctx0 = None
    for job in jobs:
        run_dir = Path(job[1])
        plan = RunPlan.load(run_dir)
        ctx0 = ctx0 or init_distributed(plan.layout)
        ctx = dataclasses.replace(ctx0, layout=plan.layout)
        if job[0] == "train":  # the whole run, as a worker does it
            s = train(plan, ctx, run_dir, base_summary(plan))
            if rank == 0:
                write_json(run_dir / "summary.json", s)
        else:  # ("resume", run_dir, checkpoints): one strategy, stepped on from each checkpoint in turn
            strategy, out = make_strategy(plan, ctx, None), {}
            for ck in job[2]:
                start = checkpoint.load(strategy, Path(ck))
                out[str(ck)] = run_steps(strategy, plan, start, None).losses
            strategy.teardown()
            if rank == 0:
                (run_dir / "resumed.json").write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_together(tmp: Path, runs: dict[str, list[str]], nproc: int = 2) -> dict[str, dict]:
    """Train several runs one after another in one spawn of ``nproc`` processes (one start-up, one process
    group): {name: rank 0's summary}. For runs whose asserted figures are their own (losses, tensor bytes,
    communication), not the process's peak RSS, which the later runs inherit."""
    dirs = {name: prepare_run(Path(tmp) / name, *overrides) for name, overrides in runs.items()}
    jobs_in_one_group(nproc, [("train", d) for d in dirs.values()])
    out = {name: summary(d) for name, d in dirs.items()}
    for name, s in out.items():
        assert s["status"] == "ok", (name, s)
    return out


def jobs_in_one_group(nproc: int, jobs: list, timeout: float = 1200) -> None:
    """Run ``jobs`` one after another in the same ``nproc`` spawned processes and process group (gloo):
    ``("train", run_dir)`` trains a prepared run and writes its summary.json; ``("resume", run_dir, [ckpt, ...])``
    sets the run's strategy up once, loads each checkpoint in turn and steps to ``train.steps``, writing the
    losses after each to run_dir/resumed.json."""
    from parallelkit.runtime.processes import spawn

    spawn(_jobs_main, nproc, [[str(x) if isinstance(x, Path) else x for x in j] for j in jobs], timeout=timeout,
          start_method=START)
