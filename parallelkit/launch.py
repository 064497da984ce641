"""Start a run's worker processes under torch's elastic agent and turn their fate into a status.

Each run gets fresh processes and a fresh process group (``torch.distributed.run
--standalone`` picks a free rendezvous port, so back-to-back runs do not collide), a
wall-clock limit, and a summary.json whatever happens to the workers.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

from .metrics import cpu_threads
from .results import read_json, write_json


def worker_command(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "parallelkit.train", str(run_dir)]


def launch(cfg, run_dir: Path, nproc: int, base: dict) -> dict:
    """Run the workers; return the final summary (also written to run_dir/summary.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    for stale in [run_dir / "summary.json", *run_dir.glob("errors/rank*.txt")]:
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads(nproc)))  # also keeps torchrun from printing its banner
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(worker_command(run_dir, nproc), stderr=subprocess.PIPE, text=True, errors="replace",
                            env=env, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    pump = threading.Thread(target=_pump, args=(proc.stderr, tail), daemon=True)
    pump.start()
    timeout = cfg.train.get("timeout_s")
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        rc = proc.wait()
    except KeyboardInterrupt:
        _kill(proc)
        raise
    pump.join(timeout=5)
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else dict(base)
    if timed_out:
        summary.update(status="timeout", error=f"run exceeded train.timeout_s={timeout} s and was stopped")
    elif rc != 0 or summary.get("status") != "ok":
        status, error = diagnose(run_dir, list(tail), rc)
        if summary.get("status") in (None, "ok") or not summary.get("error"):
            summary.update(status=status, error=error)
        elif status == "oom":
            summary["status"] = "oom"
    write_json(run_dir / "summary.json", summary)
    return summary


def _pump(stream, tail) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    sys.stderr.flush()


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def diagnose(run_dir: Path, tail: list[str], rc: int) -> tuple[str, str]:
    """Status and one-line cause from the workers' error files, else from the agent's report."""
    errors = sorted((run_dir / "errors").glob("rank*.txt"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    texts = [p.read_text().strip() for p in errors]
    if texts:
        first = next((t for t in texts if "SIGTERM" not in t and "SignalException" not in t), texts[0])
        return ("oom" if "out of memory" in first.lower() or "OutOfMemoryError" in first else "failed"), first
    joined = "\n".join(tail)
    if re.search(r"exitcode\s*:\s*-9\b|Signals\.SIGKILL|signal 9", joined):
        return "oom", "a worker was killed by SIGKILL (exit -9): most likely the kernel's OOM killer (host memory ran out)"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return "failed", f"workers exited with code {rc}" + (f": {last[:300]}" if last else "")
