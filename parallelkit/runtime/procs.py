"""The launched process tree: who is in it, how to stop all of it, and whether the kernel OOM-killed any of it.

The launcher starts each worker in a session of its own (a terminal's Ctrl-C reaches the launcher
only), so signalling a process group does not reach them all, and a process a worker starts (a
DeepSpeed helper, a compiler) is re-parented when that worker dies and could go on running. So the
launcher makes itself the reaper of its descendants' orphans (``become_subreaper``: re-parented to
the launcher, not to init), marks the run's processes through their environment, keeps a list of
every process below the first worker or carrying that mark (``Tree``, refreshed every second while
the run lives) and stops them one by one; and each worker asks the kernel to kill it when its
launcher dies (``die_with_parent``).

An OOM kill is attributed to the run only on evidence about the run's own processes: the kernel
log naming one of them, or the OOM-kill counter of a memory cgroup that holds nothing but the run
(and what started it). The machine's counter (/proc/vmstat), or a cgroup shared with other
processes, also counts their OOM kills, which say nothing about this run.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
LAUNCHER_PID = "PARALLELKIT_LAUNCHER_PID"  # in a worker's environment: the process that started it
_SUBREAPER: bool | None = None


def die_with_parent() -> None:
    """In a worker the launcher started: the kernel sends it SIGKILL when the launcher dies (even by SIGKILL, when
    no handler of the launcher runs), so no worker trains on orphaned; it exits at once if that already happened."""
    want = os.environ.get(LAUNCHER_PID)
    if not want or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):
        return
    if os.getppid() != int(want):  # the launcher died before the request was made
        os._exit(1)


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``), so a
    process whose worker died stays below the launcher, where the ``Tree`` finds it and the launcher reaps it. Once per
    process (children do not inherit it); True when set."""
    global _SUBREAPER
    if _SUBREAPER is None:
        _SUBREAPER = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _SUBREAPER = libc.prctl(ctypes.c_int(PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                                        ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
            except (OSError, AttributeError):
                pass
    return _SUBREAPER


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None (gone, or a zombie: it has exited)."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] in "ZX" else (int(fields[1]), int(fields[19]))


def _scan() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every live process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None:
            out[int(d)] = st
    return out


def _carries(pid: int, entry: bytes) -> bool:
    """Whether ``pid``'s environment (as it was started) holds ``entry`` (b"NAME=value")."""
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class Tree:
    """Every process ever seen below ``root``, or (with ``mark``, a (name, value) pair in the environment the run's
    processes inherit) carrying that mark wherever it was re-parented; pid -> start time, so a reused pid is never
    signalled."""

    def __init__(self, root: int, every_s: float = 1.0, mark: tuple[str, str] | None = None):
        self.root, self.seen, self.lock = root, {}, threading.Lock()
        self.mark = f"{mark[0]}={mark[1]}".encode() if mark else None
        self._checked: dict[tuple[int, int], bool] = {}  # (pid, start) -> carries the mark
        self._stop = threading.Event()
        self.refresh()
        self.thread = threading.Thread(target=self._watch, args=(every_s,), daemon=True)
        self.thread.start()

    def refresh(self) -> None:
        procs = _scan()
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            kids.setdefault(ppid, []).append(pid)
        with self.lock:
            known = dict(self.seen)
        # below the root, below every process of the run still alive (an orphan's own children), and the marked
        todo = [self.root, *(p for p, start in known.items() if procs.get(p, (0, None))[1] == start)]
        if self.mark:
            since = known.get(self.root, 0)  # the run's processes start after its root
            checked = {}
            for pid, (_, start) in procs.items():
                if start >= since and pid not in known:
                    got = self._checked.get((pid, start))
                    checked[(pid, start)] = _carries(pid, self.mark) if got is None else got
            self._checked = checked  # only live processes: it does not grow with the machine's history
            todo += [pid for (pid, _), marked in checked.items() if marked]
        done: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in done or (st := procs.get(pid)) is None:
                continue
            done.add(pid)
            with self.lock:
                self.seen.setdefault(pid, st[1])
            todo += kids.get(pid, [])

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.refresh()

    def alive(self) -> list[int]:
        with self.lock:
            return [p for p, start in self.seen.items() if (st := _stat(p)) is not None and st[1] == start]

    def workers(self) -> list[int]:
        with self.lock:
            return [p for p in self.seen if p != self.root]

    def pids(self) -> list[int]:
        """Every process of the run ever seen, the root included."""
        with self.lock:
            return list(self.seen)

    def started_s(self) -> float | None:
        """When the root started, in seconds since boot (the kernel log's clock)."""
        with self.lock:
            start = self.seen.get(self.root)
        return None if start is None else start / os.sysconf("SC_CLK_TCK")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every live process of the tree (the root first), then
        SIGKILL to what is left after ``grace_s``; then reap those that were re-parented to this process. A no-op
        when none is alive."""
        self.refresh()
        self._stop.set()
        try:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
                for pid in self.alive():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait
                while self.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not self.alive():
                    return
        finally:
            self._reap()

    def _reap(self) -> None:
        """Collect the exit status of the run's processes that died as this process's children (orphans adopted
        as subreaper), so no zombie is left; never the root's (its Popen waits for it)."""
        with self.lock:
            seen = [(p, s) for p, s in self.seen.items() if p != self.root]
        me = os.getpid()
        for pid, start in seen:
            fields = _stat_fields(pid)
            if fields and fields[0] == "Z" and int(fields[1]) == me and int(fields[19]) == start:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def close(self) -> None:
        self._stop.set()


# ---- OOM kill or another signal? ----
def _memory_cgroup() -> tuple[Path, Path] | None:
    """(OOM-kill counter file, cgroup.procs) of this process's memory cgroup: v2 memory.events.local (this cgroup
    only; memory.events when there is no .local and no child cgroup, as it counts the children too), v1
    memory.oom_control (this cgroup only)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            if (d / "memory.events.local").exists():
                return d / "memory.events.local", d / "cgroup.procs"
            if (d / "memory.events").exists() and not any(p.is_dir() for p in d.iterdir()):
                return d / "memory.events", d / "cgroup.procs"
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (d / "memory.oom_control").exists():
                return d / "memory.oom_control", d / "cgroup.procs"
    return None


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out and (st := _stat(pid)) is not None:
        out.add(pid)
        pid = st[0]
    return out


def oom_kill_count(pids: Iterable[int] = ()) -> tuple[int | None, str]:
    """The OOM-kill counter of the run's own memory cgroup, with where it came from: the cgroup this process is in,
    when every process in it is this one, one of its ancestors (what started it: a shell, a job script) or one of
    ``pids`` (the run's). Else (None, why not): a cgroup shared with other processes, or the machine's
    /proc/vmstat, counts their OOM kills too, which say nothing about this run; neither is ever used."""
    found = _memory_cgroup()
    if found is None:
        return None, "no memory cgroup with an OOM-kill counter (the machine's count is not the run's)"
    counter, procs = found
    if (n := _counter(counter, "oom_kill")) is None:
        return None, f"no oom_kill in {counter}"
    try:
        members = {int(p) for p in procs.read_text().split()}
    except (OSError, ValueError):
        return None, f"{procs} is unreadable"
    others = members - {os.getpid(), *_ancestors(os.getpid()), *pids}
    if others:
        return None, f"the memory cgroup {counter.parent} is shared with {len(others)} other process(es)"
    return n, f"the run's own memory cgroup ({counter})"


def _counter(f: Path, key: str) -> int | None:
    try:
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        return None
    return None


_KILLED = (re.compile(r"(?:Out of memory|oom-kill|Memory cgroup out of memory).*?[Kk]illed process (\d+)"),
           re.compile(r"oom-kill:.*?task_memcg=.*?pid=(\d+)"))
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")


def oom_killed_in_kernel_log(pids: Iterable[int], log: str | None = None, since_s: float | None = None) -> bool | None:
    """True if the kernel log (``dmesg``, or ``log``) says it OOM-killed one of ``pids``, at or after ``since_s``
    (seconds since boot, the log's clock: an older line is about an earlier process that had the same pid); None
    when the log cannot be read."""
    if log is None:
        try:
            out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        log = out.stdout
    wanted = set(pids)
    for line in log.splitlines():
        if since_s is not None and (m := _STAMP.match(line)) and float(m.group(1)) < since_s - 1:
            continue
        if any(int(p) in wanted for rx in _KILLED for p in rx.findall(line)):
            return True
    return False
