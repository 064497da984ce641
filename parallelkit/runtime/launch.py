"""Start a run's worker processes under torch's elastic agent and turn their fate into a status.

Each run gets fresh processes and a fresh process group (``torch.distributed.run
--standalone`` picks a free rendezvous port, so back-to-back runs do not collide), a
wall-clock limit, and a summary.json whatever happens to the workers.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from parallelkit.measure.metrics import cpu_threads
from parallelkit.runtime.procs import Tree, oom_kill_count, oom_killed_in_kernel_log
from parallelkit.util.jsonio import read_json, write_json


def worker_command(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "parallelkit.runtime.loop", str(run_dir)]


def with_package_path(env: dict) -> dict:
    """``env`` with this package's folder first on PYTHONPATH: a child process imports this copy of parallelkit."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent.parent), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path}


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached the launching process (Ctrl-C, ``timeout``, a scheduler, a closed terminal)."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


def raise_on_signals() -> None:
    """In the launching process: SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (where the run is stopped and its
    summary written); further ones are ignored while that happens."""
    def handler(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in SIGNALS:
        signal.signal(s, handler)


def launch(plan, run_dir: Path, base: dict) -> dict:
    """Run the plan's workers; return the final summary (also written to run_dir/summary.json). On ``Interrupted``
    every process of the run is stopped, the summary says ``interrupted``, and the exception goes on up."""
    cfg, nproc = plan.cfg, plan.layout.processes
    plan.save(run_dir)  # what each worker loads (config.yaml, plan.json)
    for stale in [run_dir / "summary.json", run_dir / "metrics.jsonl", *run_dir.glob("errors/rank*.txt")]:
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads(nproc)))  # also keeps torchrun from printing its banner
    env = with_package_path(env)
    ooms_before = oom_kill_count()
    proc = subprocess.Popen(worker_command(run_dir, nproc), stderr=subprocess.PIPE, text=True, errors="replace",
                            env=env, start_new_session=True)
    tree = Tree(proc.pid)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    pump = threading.Thread(target=_pump, args=(proc.stderr, tail), daemon=True)
    pump.start()
    timeout = cfg.train.get("timeout_s")
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        tree.stop()
        rc = proc.wait()
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a caller that did not call raise_on_signals
        tree.stop()
        proc.wait()
        pump.join(timeout=5)
        summary = _summary(run_dir, base)
        summary.update(status="interrupted", error=f"stopped by {getattr(e, 'name', 'SIGINT')} after {len(summary['losses'])} of "
                                                   f"{cfg.train.steps} steps; every process of the run was ended")
        write_json(run_dir / "summary.json", summary)
        raise
    finally:
        tree.close()
    pump.join(timeout=5)
    summary = _summary(run_dir, base)
    if timed_out:
        summary.update(status="timeout", error=f"run exceeded train.timeout_s={timeout} s and was stopped after "
                                               f"{len(summary['losses'])} of {cfg.train.steps} steps")
    elif rc != 0 or summary.get("status") != "ok":
        status, error = diagnose(run_dir, list(tail), rc, tree.workers(), ooms_before)
        if summary.get("status") in (None, "ok") or not summary.get("error") or status in ("oom", "killed"):
            summary.update(status=status, error=error)
    write_json(run_dir / "summary.json", summary)
    return summary


def _summary(run_dir: Path, base: dict) -> dict:
    """The workers' summary, else the base one; the losses metrics.jsonl holds when the workers wrote none."""
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else dict(base)
    summary.update({k: v for k, v in base.items() if k.startswith("predicted_") or k == "prediction"})  # made here
    if not summary.get("losses"):
        summary["losses"] = logged_losses(run_dir)
        summary["final_loss"] = summary["losses"][-1] if summary["losses"] else None
    return summary


def logged_losses(run_dir: Path) -> list[float]:
    out = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by the kill
    return out


def _pump(stream, tail) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    sys.stderr.flush()


def signal_deaths(tail: list[str]) -> list[tuple[int, int]]:
    """(rank, signal number) of every worker the agent reports as ended by a signal."""
    text = "\n".join(tail)
    return [(int(r), int(s)) for r, s in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n(?:[^\n]*\n)?\s*exitcode\s*:\s*-(\d+)", text)]


def diagnose(run_dir: Path, tail: list[str], rc: int, pids: list[int] | None = None,
             ooms_before: tuple[int | None, str] = (None, "")) -> tuple[str, str]:
    """Status and one-line cause: a worker killed by a signal (``oom`` only when the kernel log or the OOM-kill
    counter shows an OOM kill), else the workers' error files, else the agent's report."""
    deaths = signal_deaths(tail)
    kills = [(r, s) for r, s in deaths if s not in CRASHES]
    errors = sorted((run_dir / "errors").glob("rank*.txt"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    texts = [p.read_text().strip() for p in errors]
    if kills and (any(s == signal.SIGKILL for _, s in kills) or not texts):
        rank, sig = next(((r, s) for r, s in kills if s == signal.SIGKILL), kills[0])
        what = f"worker rank {rank} was killed by {signal.Signals(sig).name}"
        if sig == signal.SIGKILL:
            in_log = oom_killed_in_kernel_log(pids or [])
            after, where = oom_kill_count()
            if in_log:
                return "oom", f"{what}: the kernel's OOM killer (host memory ran out; kernel log)"
            if after is not None and ooms_before[0] is not None and after > ooms_before[0]:
                return "oom", f"{what}: the kernel's OOM killer (host memory ran out; OOM kills counted by {where})"
            why = "no OOM kill in the kernel log or " if in_log is False else "the kernel log is unreadable and no OOM kill "
            return "killed", f"{what}, not by the OOM killer ({why}counted by {ooms_before[1] or where})"
        return "killed", f"{what} (sent from outside the run)"
    if texts:
        first = next((t for t in texts if "SIGTERM" not in t and "SignalException" not in t), texts[0])
        return ("oom" if "out of memory" in first.lower() or "OutOfMemoryError" in first else "failed"), first
    if deaths:
        rank, sig = deaths[0]
        return "failed", f"worker rank {rank} crashed with {signal.Signals(sig).name}"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return "failed", f"workers exited with code {rc}" + (f": {last[:300]}" if last else "")
