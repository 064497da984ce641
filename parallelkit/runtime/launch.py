"""Start a run's worker processes and turn their fate into a status.

The launcher starts one process per rank itself (no agent in between: torch's elastic agent cost
every run a second interpreter importing torch before any worker started). Each run gets fresh
processes that meet through a file store in a folder of their own (no port is picked, so no other
process can take it first), a wall-clock limit, and a summary.json whatever happens to the workers.
As torchrun does, the first worker that fails ends the others. However ``launch()`` ends (the
workers' exit, a death, an exception), no process of the run outlives it; and a worker whose
launcher dies is killed by the kernel (``procs.die_with_parent``). Multi-node runs start the same
worker module under torchrun (README).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from parallelkit.data.datasets import prepare_data
from parallelkit.measure.metrics import cpu_threads
from parallelkit.measure.results import base_summary
from parallelkit.runtime.processes import INIT_METHOD
from parallelkit.runtime.procs import (
    LAUNCHER_PID,
    Tree,
    become_subreaper,
    oom_kill_count,
    oom_killed_in_kernel_log,
)
from parallelkit.util.jsonio import read_json, write_json


def worker_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "parallelkit.runtime.loop", str(run_dir)]


def rank_env(env: dict, rank: int, nproc: int, store: str) -> dict:
    """A worker's environment: its rank as torchrun would give it (one node), the store, its launcher."""
    return {**env, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", INIT_METHOD: store, LAUNCHER_PID: str(os.getpid())}


def with_package_path(env: dict) -> dict:
    """``env`` with this package's folder first on PYTHONPATH: a child process imports this copy of parallelkit."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent.parent), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path}


RUN_MARK = "PARALLELKIT_RUN_MARK"  # in the environment of every process of a run: found wherever it was re-parented
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


def launch(plan, run_dir: Path, predicted: dict) -> dict:
    """Run the plan's workers (each loads the plan saved in ``run_dir``); return the final summary (also written to
    run_dir/summary.json, with the ``predicted`` fields). On ``Interrupted`` every process of the run is stopped,
    the summary says ``interrupted``, and the exception goes on up. However it ends, every process of the run is
    stopped before it returns."""
    cfg, nproc = plan.cfg, plan.layout.processes
    base = {**base_summary(plan).to_dict(), **predicted}  # what the summary says if no worker writes one
    prepare_data(cfg.data)  # e.g. a corpus tokenized once, here rather than in every worker
    for stale in [run_dir / "summary.json", run_dir / "metrics.jsonl", *run_dir.glob("errors/rank*.txt")]:
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads(nproc)))
    env = with_package_path(env)
    env[RUN_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"
    ooms_before = oom_kill_count()
    become_subreaper()  # a worker's own children, orphaned, are re-parented to this process, not to init
    store = tempfile.mkdtemp(prefix="parallelkit-store-")
    procs: list[subprocess.Popen] = []
    tail: collections.deque[str] = collections.deque(maxlen=400)
    pumps: list[threading.Thread] = []
    tree = None
    timeout = cfg.train.get("timeout_s")
    timed_out, codes = False, []
    try:
        for rank in range(nproc):  # each in a session of its own: a terminal's Ctrl-C reaches the launcher only
            procs.append(subprocess.Popen(worker_command(run_dir), stderr=subprocess.PIPE, text=True, errors="replace",
                                          env=rank_env(env, rank, nproc, f"file://{store}/store"),
                                          start_new_session=True))
            if tree is None:
                tree = Tree(procs[0].pid, mark=(RUN_MARK, env[RUN_MARK]))
            pumps.append(threading.Thread(target=_pump, args=(procs[-1].stderr, tail), daemon=True))
            pumps[-1].start()
        codes, timed_out = _wait(procs, timeout)
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a caller that did not call raise_on_signals
        _stop(tree, procs)
        for t in pumps:
            t.join(timeout=5)
        summary = _summary(run_dir, base)
        summary.update(status="interrupted", error=f"stopped by {getattr(e, 'name', 'SIGINT')} after {len(summary['losses'])} of "
                                                   f"{cfg.train.steps} steps; every process of the run was ended")
        write_json(run_dir / "summary.json", summary)
        raise
    finally:  # whatever ended the wait: nothing of the run outlives it (a no-op when nothing is alive)
        _stop(tree, procs)
        shutil.rmtree(store, ignore_errors=True)
        with contextlib.suppress(Exception):  # what the backend leaves outside the run folder (NVMe swap)
            plan.cls.after_run(plan.cfg)
    for t in pumps:
        t.join(timeout=5)
    rc = next((c for c in codes if c), 0)
    deaths = [(r, -c) for r, c in enumerate(codes) if c is not None and c < 0]
    summary = _summary(run_dir, base)
    steps = f"after {len(summary['losses'])} of {cfg.train.steps} steps"
    if timed_out:
        summary.update(status="timeout", error=f"run exceeded train.timeout_s={timeout} s and was stopped {steps}")
    elif rc != 0 or summary.get("status") != "ok":
        status, error = diagnose(run_dir, list(tail), rc, tree.pids() if tree else [], ooms_before,
                                 tree.started_s() if tree else None, deaths)
        if summary.get("status") in (None, "ok") or not summary.get("error") or status in ("oom", "killed"):
            summary.update(status=status, error=error)
    write_json(run_dir / "summary.json", summary)
    return summary


def _wait(procs: list[subprocess.Popen], timeout: float | None) -> tuple[list[int | None], bool]:
    """Until every worker has exited, the first one fails (as torchrun, the others are then stopped) or ``timeout``
    passes: (each worker's exit code then, None for one still running; whether the time ran out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(codes):
            if any(codes):  # a moment for a worker killed together with others to be seen as killed too
                time.sleep(0.2)
                codes = [p.poll() for p in procs]
            return codes, False
        if deadline is not None and time.monotonic() > deadline:
            return codes, True
        time.sleep(0.05)


def _stop(tree: Tree | None, procs: list[subprocess.Popen]) -> None:
    """Every process of the run ended and reaped (a no-op when none is alive)."""
    if tree is not None:
        tree.stop()
        tree.close()
    for p in procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


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
    """(rank, signal number) of every worker torchrun's agent reports as ended by a signal (a run under torchrun)."""
    text = "\n".join(tail)
    return [(int(r), int(s)) for r, s in re.findall(r"rank\s*:\s*(\d+)[^\n]*\n(?:[^\n]*\n)?\s*exitcode\s*:\s*-(\d+)", text)]


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def oom_evidence(pids: list[int], ooms_before: tuple[int | None, str], since_s: float | None = None
                 ) -> tuple[bool | None, str]:
    """Whether the kernel OOM-killed one of the run's processes (``pids``), with the evidence in words: True when the
    kernel log names one of them, or the OOM-kill counter of the run's own memory cgroup went up since
    ``ooms_before`` (procs.oom_kill_count); False when the log or that counter shows none; None when neither can be
    read. An OOM kill elsewhere (the machine's count, a cgroup shared with other processes) is never evidence."""
    in_log = oom_killed_in_kernel_log(pids, since_s=since_s)
    if in_log:
        return True, "the kernel's OOM killer (host memory ran out; the kernel log names the run's process)"
    after, where = oom_kill_count(pids)
    counted = after is not None and ooms_before[0] is not None and where == ooms_before[1]
    if counted and after > ooms_before[0]:
        return True, f"the kernel's OOM killer (host memory ran out; OOM kills counted by {where})"
    log = "no OOM kill of the run's processes in the kernel log" if in_log is False else "the kernel log is unreadable"
    if counted:
        return False, f"{log}, none counted by {where}"
    return (False if in_log is False else None), f"{log}; no OOM-kill counter of the run's own: {ooms_before[1] or where}"


def diagnose(run_dir: Path, tail: list[str], rc: int, pids: list[int] | None = None,
             ooms_before: tuple[int | None, str] = (None, ""), since_s: float | None = None,
             deaths: list[tuple[int, int]] | None = None) -> tuple[str, str]:
    """Status and one-line cause: a worker killed by a signal (``deaths``: (rank, signal); else as torchrun's agent
    reports them in ``tail``; ``oom`` only on evidence that the kernel OOM-killed one of the run's processes,
    ``pids``: oom_evidence), else the workers' error files, else the last words on their stderr."""
    deaths = signal_deaths(tail) if deaths is None else deaths
    kills = [(r, s) for r, s in deaths if s not in CRASHES]
    errors = sorted((run_dir / "errors").glob("rank*.txt"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    texts = [p.read_text().strip() for p in errors]
    if kills and (any(s == signal.SIGKILL for _, s in kills) or not texts):
        rank, sig = next(((r, s) for r, s in kills if s == signal.SIGKILL), kills[0])
        what = f"worker rank {rank} was killed by {_signame(sig)}"
        if sig == signal.SIGKILL:
            oom, why = oom_evidence(pids or [], ooms_before, since_s)
            if oom:
                return "oom", f"{what}: {why}"
            if oom is False:
                return "killed", f"{what}, not by the OOM killer ({why})"
            return "killed", f"{what}; no OOM kill of the run's processes can be seen ({why})"
        return "killed", f"{what} (sent from outside the run)"
    if texts:
        first = next((t for t in texts if "SIGTERM" not in t and "SignalException" not in t), texts[0])
        return ("oom" if "out of memory" in first.lower() or "OutOfMemoryError" in first else "failed"), first
    if deaths:
        rank, sig = deaths[0]
        return "failed", f"worker rank {rank} crashed with {signal.Signals(sig).name}"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return "failed", f"workers exited with code {rc}" + (f": {last[:300]}" if last else "")
