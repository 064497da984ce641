"""Starting worker processes inside a process of ours (export, the collective benchmark, tests): one way.

Each call gets fresh processes that meet through a file store in a folder of their own (no port is
picked, so no other process can take it first), a deadline, and every process ended when the call
ends, whatever happened. Runs start their workers as ``python -m parallelkit.runtime.loop`` processes over the same kind of store (launch.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time

INIT_METHOD = "PARALLELKIT_INIT_METHOD"  # read by runtime.loop.init_distributed


def _entry(rank: int, fn, nprocs: int, init: str, env: dict, args: tuple) -> None:
    os.environ.clear()  # the caller's environment now (a forkserver's child starts with the server's)
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                      **{INIT_METHOD: init})
    fn(rank, *args)


@contextlib.contextmanager
def _children_ignore_ctrl_c():
    """While processes start: SIGINT ignored, which they inherit (a terminal's Ctrl-C reaches the whole group)."""
    try:
        saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def spawn(fn, nprocs: int, *args, timeout: float | None = 900, start_method: str = "spawn") -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` new processes that join one process group (RANK, WORLD_SIZE and the
    store are in their environment: ``init_distributed`` reads them). Raises when one fails or the deadline passes;
    every process is ended before it returns. ``start_method``: ``spawn`` (a fresh interpreter each), or
    ``forkserver`` (forked from a server process that imported what ``multiprocessing.set_forkserver_preload``
    names, once: many short runs in one Python process, as the tests make, skip importing torch each time)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="parallelkit-store-") as folder:
        init = f"file://{folder}/store"
        with _children_ignore_ctrl_c():  # Ctrl-C stops the caller, which ends them: no traceback from each
            ctx = mp.start_processes(_entry, args=(fn, nprocs, init, dict(os.environ), args), nprocs=nprocs,
                                     join=False, start_method=start_method)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{nprocs} spawned processes did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
