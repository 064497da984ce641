"""Measurements shared by every strategy: peak compute, memory, state bytes, communication."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import threading

import torch
import torch.distributed as dist


def fix_mmap_threshold(nbytes: int | None) -> str:
    """Set glibc's mmap threshold for this process (``mallopt(M_MMAP_THRESHOLD)``): blocks of ``nbytes`` or more are
    mapped on their own and unmapped when freed. glibc's default threshold starts at 128 KiB and rises to the size
    of every mapped block freed (up to 32 MiB), after which tensors of a few MiB come from the heap and their
    memory stays in the process after they are freed: peak RSS then runs hundreds of MiB above the tensors, by an
    amount that varies from run to run and between backends (experiments/mem_phases.py). A fixed threshold also
    turns the dynamic rise off. Returns what is in effect, for the summary."""
    if nbytes is None:
        return "glibc default (dynamic mmap threshold)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return "allocator default (not glibc)"
    return f"mmap threshold {int(nbytes)} B" if ok == 1 else "glibc default (mallopt refused the threshold)"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not got back (glibc's mallinfo2: heap chunks in use + mapped chunks), None
    where the allocator is not glibc >= 2.33. Unlike RSS it falls when tensors are freed, whatever malloc keeps."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


class LivePeak:
    """The live heap's high point over a stretch of steps (the untimed probe step): ``heap_in_use`` sampled every
    ``interval`` seconds from a thread, so the process is measured as it is, allocator untouched."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop, self._thread = interval, None, threading.Event(), None

    def __enter__(self) -> "LivePeak":
        if heap_in_use() is None:
            return self
        self.peak = heap_in_use()

        def sample():
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, heap_in_use())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, heap_in_use())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: CUDA's counters, or the kernel's VmHWM via clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss": int(fields["VmHWM"].split()[0]) * 1024}


class PeakWindow:
    """The training peak with checkpoint saves left out: the high-water mark is folded in and reset before each
    save, and the save's own peak (rank 0 gathers the full state) is kept apart."""

    def __init__(self, device: torch.device):
        self.device, self.train, self.save = device, {}, {}

    def _fold(self, into: dict) -> None:
        for k, v in peak_memory(self.device).items():
            into[k] = max(into.get(k, 0), v)
        reset_peak_memory(self.device)

    def start(self) -> None:
        self.train, self.save = {}, {}
        reset_peak_memory(self.device)

    def before_save(self) -> None:
        self._fold(self.train)

    def after_save(self) -> None:
        self._fold(self.save)

    def finish(self) -> tuple[dict[str, int], dict[str, int]]:
        """(the training peak, the saves' peak: {} when nothing was saved in the window)."""
        self._fold(self.train)
        return self.train, self.save


def comm_kind(op: str) -> str:
    """The collective family of a torch.distributed entry point (all_gather_into_tensor -> all_gather)."""
    for kind in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "reduce"):
        if kind in op:
            return kind
    return "send_recv"  # send, recv, isend, irecv


class CommCounter:
    """Counts the calls and bytes handed to torch.distributed collectives and point-to-point ops, by kind.

    It wraps the Python entry points (``torch.distributed.all_reduce`` and friends), which
    DeepSpeed, FairScale and FSDP call, and the functional collectives
    (``torch.distributed._functional_collectives``), which DTensor's tensor parallelism calls, only while
    installed: the loop installs it for the untimed probe step (or for every step with
    ``train.instrument=true``), so timed steps run the backends' own code. DDP's C++ reducer does not go
    through Python: its strategy reports its buckets itself (``Strategy.probe_comm``). The figure is the
    payload per rank, not wire traffic: the tensor reduced, scattered or sent, and an all-gather's whole
    output (a ring all-reduce of S bytes moves about 2 S (n-1)/n per rank).
    """

    OPS = {  # op -> index of the tensor argument whose size is the payload
        "all_reduce": 0, "reduce": 0, "broadcast": 0, "send": 0, "recv": 0, "isend": 0, "irecv": 0,
        "all_gather_into_tensor": 0, "_all_gather_base": 0, "all_gather": 0,
        "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "reduce_scatter": 1,
        "all_to_all_single": 1, "all_reduce_coalesced": 0,
        "all_gather_single": 0, "reduce_scatter_single": 1,  # torch >= 2.13; FSDP2 calls these (with keywords)
    }
    # the functional collectives (their input first; an all-gather's payload is its input x the group's size)
    FUNCOL = ("all_reduce", "all_gather_single", "all_gather_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
              "all_to_all_single", "broadcast", "all_gather_single_autograd", "all_gather_tensor_autograd",
              "reduce_scatter_single_autograd", "reduce_scatter_tensor_autograd", "all_to_all_single_autograd")

    def __init__(self) -> None:
        self.kinds: dict[str, list[int]] = {}  # kind -> [calls, bytes]
        self._saved: list = []
        self._depth = threading.local()  # the deprecated names call the new ones: count the outermost call only

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.kinds.values())

    def add(self, kind: str, nbytes: int, calls: int = 1) -> None:
        c = self.kinds.setdefault(kind, [0, 0])
        c[0] += calls
        c[1] += nbytes

    def reset(self) -> None:
        self.kinds = {}

    def _wrap(self, fn, name: str, idx: int, times=None):
        try:
            key = list(inspect.signature(fn).parameters)[idx]  # the payload may come as a keyword
        except (TypeError, ValueError, IndexError):
            key = None
        kind = comm_kind(name)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                nbytes = _payload(args[idx] if len(args) > idx else kwargs.get(key))
                self.add(kind, nbytes * (times(args, kwargs) if times else 1))
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth

        counted.__parallelkit_wrapped__ = fn
        return counted

    def install(self) -> "CommCounter":
        self._saved += patch_distributed(self.OPS, lambda fn, name: self._wrap(fn, name, self.OPS[name]),
                                         skip=lambda fn: hasattr(fn, "__parallelkit_wrapped__"))
        funcol = _funcol()
        for name in self.FUNCOL if funcol is not None else ():
            fn = getattr(funcol, name, None)
            if fn is not None and not hasattr(fn, "__parallelkit_wrapped__"):
                self._saved.append((funcol, name, fn))
                setattr(funcol, name, self._wrap(fn, name, 0, _group_size if "gather" in name else None))
        return self

    def uninstall(self) -> None:
        restore(self._saved)

    @contextlib.contextmanager
    def counting(self):
        """Count what runs inside (installed for the duration)."""
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def by_kind(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": c, "bytes": b} for k, (c, b) in sorted(self.kinds.items())}


def patch_distributed(names, wrap, skip=lambda fn: False) -> list:
    """Replace torch.distributed's functions ``names`` (in ``torch.distributed`` and its ``distributed_c10d``) by
    ``wrap(fn, name)``, one wrapper per function (``batch_isend_irecv`` and ``P2POp`` tell sends by ``op is
    isend``); returns what ``restore`` puts back."""
    saved, wrapped = [], {}
    for mod in (dist, dist.distributed_c10d):
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None and not skip(fn):
                saved.append((mod, name, fn))
                setattr(mod, name, wrapped.setdefault(id(fn), wrap(fn, name)))
    return saved


def restore(saved: list) -> None:
    """Put back what ``patch_distributed`` replaced, last first; empties ``saved``."""
    for mod, name, fn in reversed(saved):
        setattr(mod, name, fn)
    saved.clear()


def _funcol():
    try:
        import torch.distributed._functional_collectives as funcol
    except ImportError:  # a torch without them
        return None
    return funcol


def _group_size(args, kwargs) -> int:
    """The size of a functional all-gather's group (its third argument: a group, a mesh dimension, ranks)."""
    funcol = _funcol()
    group = args[2] if len(args) > 2 else kwargs.get("group")
    try:  # as the functional all-gather finds it
        return funcol.c10d._get_group_size_by_name(funcol._resolve_group(group))
    except Exception:  # noqa: BLE001 - a group form this torch cannot expand: count the input once
        return 1


def _payload(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_payload(t) for t in x)
    return 0


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(local_world_size: int) -> int:
    return max(1, cores() // max(1, local_world_size))
