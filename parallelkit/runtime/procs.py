"""The launched process tree: who is in it, how to stop all of it, and whether the kernel OOM-killed any of it.

torch's elastic agent starts each worker in a session of its own, so signalling the agent's
process group does not reach the workers, and a worker whose agent died is re-parented and
goes on training. So the launcher keeps a list of every process below the agent (``Tree``,
refreshed every second while the run lives) and stops them one by one.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None (gone, or a zombie: it has exited)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[19]))


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None:
            kids.setdefault(st[0], []).append(int(d))
    return kids


class Tree:
    """Every process ever seen below ``root`` (pid -> start time, so a reused pid is never signalled)."""

    def __init__(self, root: int, every_s: float = 1.0):
        self.root, self.seen, self.lock = root, {}, threading.Lock()
        self._stop = threading.Event()
        self.refresh()
        self.thread = threading.Thread(target=self._watch, args=(every_s,), daemon=True)
        self.thread.start()

    def refresh(self) -> None:
        kids, todo = children_map(), [self.root]
        while todo:
            pid = todo.pop()
            if (st := _stat(pid)) is not None:
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

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every live process of the tree (the agent first, so it does not restart anyone), then
        SIGKILL to what is left after ``grace_s``."""
        self.refresh()
        self._stop.set()
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

    def close(self) -> None:
        self._stop.set()


# ---- OOM kill or another signal? ----
def oom_kill_count() -> tuple[int | None, str]:
    """The OOM-kill counter of this process's memory cgroup (v2 memory.events, v1 memory.oom_control), else the
    machine's (/proc/vmstat); with where it came from."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for f in ([Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"] if controllers == "" else
                  [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control"] if "memory" in controllers.split(",")
                  else []):
            if (n := _counter(f, "oom_kill")) is not None:
                return n, f"the memory cgroup ({f})"
    return _counter(Path("/proc/vmstat"), "oom_kill"), "the machine (/proc/vmstat)"


def _counter(f: Path, key: str) -> int | None:
    try:
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        return None
    return None


def oom_killed_in_kernel_log(pids: list[int]) -> bool | None:
    """True if the kernel log says it OOM-killed one of ``pids``; None when the log cannot be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    killed = {int(m) for m in re.findall(r"(?:Out of memory|oom-kill|Memory cgroup out of memory).*?[Kk]illed process (\d+)",
                                           out.stdout)}
    killed |= {int(m) for m in re.findall(r"oom-kill:.*?task_memcg=.*?pid=(\d+)", out.stdout)}
    return bool(killed & set(pids))
