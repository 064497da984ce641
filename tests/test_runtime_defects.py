"""The run's processes and the records kept about them: a killed launcher takes its workers with it, a SIGKILL
is called an OOM kill only on evidence about the run's own processes, and the worker-footprint cache survives
concurrent writers and remembers why a measurement failed."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST, ROOT

from parallelkit.runtime.launch import diagnose

# ---- 1. a launcher killed mid-run ----

def _run_procs(run_dir: Path) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line names the run's folder: the workers and the launcher."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(run_dir) in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_a_killed_launcher_takes_its_workers_with_it(tmp_path):
    """SIGKILL to the launcher mid-run (no handler of it runs): the kernel kills every worker it started
    (procs.die_with_parent), so nothing goes on training orphaned."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "parallelkit.run", *FAST, "train.steps=100000", "strategy=ddp", "preflight=false",
                             f"hydra.run.dir={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step logged in 240 s"
            time.sleep(0.2)
        workers = [p for p in _run_procs(out) if "parallelkit.runtime.loop" in " ".join(p.cmdline())]
        assert len(workers) == 2 and all(w.ppid() == proc.pid for w in workers), workers  # started by the launcher
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while _run_procs(out) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p.pid, " ".join(p.cmdline())[-120:]) for p in _run_procs(out)]
        assert not left, f"left running after the launcher was killed: {left}"
    finally:  # whatever happened: nothing of this run goes on training on a shared machine
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for p in _run_procs(out):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# ---- 2. OOM kill or not ----

SIGKILL_TAIL = ["Root Cause (first observed failure):", "[0]:", "  time      : 2026-11-24_03:40:00", "  host      : box",
                "  rank      : 1 (local_rank: 1)", "  exitcode  : -9 (pid: 4242)", "  error_file: <N/A>",
                "  traceback : Signal 9 (SIGKILL) received by PID 4242"]


def _machine_oom_kills() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    pytest.skip("no oom_kill in /proc/vmstat")


def test_an_oom_kill_elsewhere_on_the_machine_does_not_make_a_sigkill_oom(tmp_path):
    """Another process on the machine was OOM-killed while the run ran (the machine's counter went up by one):
    a worker's SIGKILL is still "killed", never "oom" on that evidence."""
    before = (_machine_oom_kills() - 1, "the machine (/proc/vmstat)")
    status, error = diagnose(tmp_path, SIGKILL_TAIL, 1, [4242], before)
    assert status == "killed", error
    assert "rank 1" in error and "SIGKILL" in error and "\n" not in error


def test_the_kernel_log_naming_a_run_pid_is_an_oom_kill():
    """The real-OOM path: the kernel's lines about one of the run's pids (v1 and v2 wording) count; another pid's
    do not."""
    from parallelkit.runtime.procs import oom_killed_in_kernel_log

    v2 = ("[12345.678901] python invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0\n"
          "[12345.679000] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,"
          "task_memcg=/user.slice,task=python,pid=4242,uid=1000\n"
          "[12345.679100] Out of memory: Killed process 4242 (python) total-vm:9000000kB, anon-rss:8000000kB\n")
    v1 = "[99.1] Memory cgroup out of memory: Killed process 777 (python) total-vm:100kB, anon-rss:50kB\n"
    assert oom_killed_in_kernel_log([4242], log=v2) is True
    assert oom_killed_in_kernel_log([777], log=v1) is True
    assert oom_killed_in_kernel_log([4243, 778], log=v1 + v2) is False


def test_the_cgroup_counter_counts_only_when_the_cgroup_is_the_runs_own():
    """A memory cgroup shared with a process that is neither this one, nor an ancestor, nor one of the run's is not
    the run's: its OOM-kill count is not used (and the machine's never is)."""
    from parallelkit.runtime.procs import oom_kill_count

    count, where = oom_kill_count([])
    assert "/proc/vmstat" not in where
    stranger = subprocess.Popen(["sleep", "30"])  # a child of this process: in its cgroup, not an ancestor
    try:
        shared, why = oom_kill_count([])
        assert shared is None and why, (shared, why)
        if count is not None:  # the stranger named as one of the run's processes: the cgroup is the run's again
            assert oom_kill_count([stranger.pid])[0] is not None
    finally:
        stranger.kill()
        stranger.wait()


# ---- 3. the worker-footprint cache ----

def _merge_many(cache: str, proc: int, n: int, barrier) -> None:
    os.environ["PARALLELKIT_CACHE"] = cache
    from parallelkit.advisor import predict

    barrier.wait()
    for i in range(n):
        predict._merge_baseline("key", f"backend{proc}", 1000 * proc + i)
        predict._merge_baseline("key", f"backend{proc}.{i}", i)


def test_concurrent_processes_lose_no_footprint(tmp_path):
    """Two processes merging different backends' entries into one cache file, interleaved: every entry is there
    afterwards."""
    ctx = multiprocessing.get_context("spawn")
    n, barrier = 150, ctx.Barrier(2)
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), p, n, barrier)) for p in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    got = json.loads((tmp_path / "process_baseline.json").read_text())["key"]
    assert got["backend1"] == 1000 + n - 1 and got["backend2"] == 2000 + n - 1
    missing = [f"backend{p}.{i}" for p in (1, 2) for i in range(n) if f"backend{p}.{i}" not in got]
    assert not missing, f"{len(missing)} of {2 * n} updates lost, e.g. {missing[:5]}"


def test_a_failure_is_kept_with_its_reason_and_retried_later():
    from parallelkit.advisor.predict import _should_retry

    now = 1_800_000_000.0
    assert _should_retry(None, now)  # never measured, or a bare None from an older cache
    assert not _should_retry(338_000_000, now)  # measured
    assert not _should_retry({"error": "boom", "at": now - 60}, now)  # failed a minute ago
    assert _should_retry({"error": "boom", "at": now - 3601}, now)  # failed over an hour ago
    assert _should_retry({"error": "boom", "at": now - 60}, now, retry_failures=True)  # --baseline
    assert not _should_retry(338_000_000, now, retry_failures=True)


def test_a_gpu_only_backend_says_why_it_has_no_footprint(tmp_path, monkeypatch):
    """A real measurement that cannot succeed here (FSDP1 needs an accelerator): stored as its reason and time,
    not a bare None; the error names the reason; a second call within the hour does not measure again."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs here")
    from parallelkit.advisor import predict
    from parallelkit.strategies.torch.fsdp1 import FSDP1Strategy

    monkeypatch.setenv("PARALLELKIT_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as e:
        predict.process_baseline(FSDP1Strategy)
    assert "accelerator" in str(e.value) and "\n" not in str(e.value), e.value
    entry = json.loads((tmp_path / "process_baseline.json").read_text())[predict._baseline_key()][FSDP1Strategy.__module__]
    assert isinstance(entry, dict) and "accelerator" in entry["error"] and entry["at"] <= time.time(), entry
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as again:
        predict.process_baseline(FSDP1Strategy)
    assert time.monotonic() - t0 < 3 and "accelerator" in str(again.value)  # read from the cache, not re-measured


def test_only_rank_0_measures_under_torchrun(tmp_path, monkeypatch):
    """Rank 1 of a torchrun job with no footprint cached for its backend: no tiny run, the cautious largest known."""
    from parallelkit.advisor import predict
    from parallelkit.strategies.torch.ddp import DDPStrategy

    monkeypatch.setenv("PARALLELKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    predict._merge_baseline(predict._baseline_key(), "parallelkit.strategies.some_other", 123_456_789)
    t0 = time.monotonic()
    assert predict.process_baseline(DDPStrategy) == 123_456_789
    assert time.monotonic() - t0 < 3
