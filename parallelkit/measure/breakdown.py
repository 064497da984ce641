"""Where one step's time goes, measured: torch.profiler on an untimed step, cut into parts that add up to its wall.

The loop profiles one untimed step (``profile``): the one before the communication probe step when there are two
or more untimed steps, else the probe step itself; never a timed step. ``analyze`` then walks that step's
timeline once, instant by instant, and gives each instant to exactly one part, so the parts add up to the
profiled wall time by construction:

- ``forward``, ``backward``, ``optimizer``: an operator runs (the outermost ``aten::``-style op) on the main thread
  or another thread that is not a communication library's (FairScale's Pipe runs its stages on threads).
  Which of the three: its enclosing markers, i.e. the autograd engine's ``evaluate_function`` (backward), torch's
  ``Optimizer.step#`` / ``zero_grad#`` or parallelkit's ``parallelkit.optimizer`` (optimizer); else forward (the
  loss included).
- ``exposed <kind>``: no operator runs on the main thread and a collective of that kind is in flight (a
  ``gloo:``/``nccl:`` work item on a communication thread, or a ``c10d::`` op called on the main thread): the
  rank waits for it. A pipeline's point-to-point waits are ``pipeline_idle`` instead (waiting on a neighbour
  stage).
- ``data``: the loop's batch fetch (``parallelkit.data``).
- ``other``: what is left (Python and framework code between operators, hooks, the profiler's own cost).

Communication in flight while an operator runs is *hidden* (``hidden_s_by_kind``); it is not a part of the wall,
it is what overlap saved. On CUDA the same walk runs over the GPU's kernels instead (compute kernels vs NCCL
kernels; idle GPU time is ``other``); that path is written but not yet checked on a GPU here.
"""
from __future__ import annotations

import bisect
import functools
import os
import time

import torch

from parallelkit.measure.metrics import patch_distributed, restore
from parallelkit.util.markers import DATA, OPTIMIZER, STEP, WAIT, marker  # noqa: F401 - marker: the loop's spans
from parallelkit.util.units import blank

COMPUTE_PARTS = ("forward", "backward", "optimizer")
PARTS = (*COMPUTE_PARTS, "exposed_comm", "pipeline_idle", "data", "profiler", "other")
ENQUEUE_US = 5000  # a work item starting this soon after a c10d op on the main thread is that op's
OP_PREFIXES = ("aten::", "fsdp::", "c10d::", "_c10d_functional::", "deepspeed::", "profiler::_record")


def _all_threads():
    """The profiler's setting for every thread of the process (a torch without it: the calling thread's only)."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


class Profiled:
    """``with Profiled(device) as p:`` profiles what runs inside; ``p.result(pipeline)`` is the breakdown."""

    def __init__(self, device: torch.device):
        self.device, self.prof, self.wall = device, None, None

    def __enter__(self) -> "Profiled":
        os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # kineto's start/stop lines on stderr, read at first use
        self._p2p = P2PWaits().install()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        # every thread: FairScale's Pipe runs its stages on worker threads of its own, which the profiler does
        # not follow otherwise (their forward landed in `other`)
        self.prof = torch.profiler.profile(activities=acts, experimental_config=_all_threads())
        self.prof.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall = time.perf_counter() - self._t0
        self.prof.__exit__(*exc)
        self._p2p.uninstall()

    def export(self, path) -> str:
        """Write the profiled step's trace (Chrome's trace format: chrome://tracing, ui.perfetto.dev); its path, or
        why not."""
        try:
            self.prof.export_chrome_trace(str(path))
        except Exception as e:  # noqa: BLE001 - a trace that cannot be written (a full disk) costs the run nothing
            return f"not written: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        return str(path)

    def result(self, pipeline: bool) -> dict | None:
        try:
            out = analyze(self.prof.events(), pipeline, cuda=self.device.type == "cuda", per_event=event_cost())
        except Exception as e:  # noqa: BLE001 - a profiler that gives nothing usable leaves the run as it is
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
        if out is not None:
            out["profiled_wall_s"] = self.wall
        return out


class _Waited:
    """A point-to-point op's work whose ``wait`` is a named span (gloo records no work item for send and recv)."""

    def __init__(self, work):
        self._work = work

    def wait(self, *args, **kwargs):
        with marker(WAIT + "send_recv"):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._work, name)


class P2PWaits:
    """While installed (the profiled step only): torch.distributed's send and recv run in a named span, and the
    works that isend, irecv and batch_isend_irecv return wait in one, so the profile shows where a rank waited on
    its neighbour stage."""

    NAMES = ("send", "recv", "isend", "irecv", "batch_isend_irecv")

    def __init__(self) -> None:
        self._saved: list = []

    @staticmethod
    def _wrap(fn, name: str):
        @functools.wraps(fn)
        def waited(*args, **kwargs):
            if name in ("send", "recv"):
                with marker(WAIT + "send_recv"):
                    return fn(*args, **kwargs)
            out = fn(*args, **kwargs)
            if isinstance(out, list):
                return [w if w is None or isinstance(w, _Waited) else _Waited(w) for w in out]
            return out if out is None or isinstance(out, _Waited) else _Waited(out)

        return waited

    def install(self) -> "P2PWaits":
        self._saved += patch_distributed(self.NAMES, self._wrap)
        return self

    def uninstall(self) -> None:
        restore(self._saved)


def _context(e) -> str:
    """forward / backward / optimizer / data, from the markers around event ``e``."""
    p = e
    while p is not None:
        n = p.name
        if n.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if n.startswith(("Optimizer.step#", "Optimizer.zero_grad#", OPTIMIZER)):
            return "optimizer"
        if n == DATA:
            return "data"
        p = p.cpu_parent
    return "forward"


def _is_op(name: str) -> bool:
    return name.startswith(OP_PREFIXES)


KINDS = (("allgather", "all_gather"), ("reducescatter", "reduce_scatter"), ("allreduce", "all_reduce"),
         ("alltoall", "all_to_all"), ("broadcast", "broadcast"), ("reduce", "reduce"), ("send", "send_recv"),
         ("recv", "send_recv"))


FUNCTIONAL = "_c10d_functional::"  # DTensor's collectives: the op queues the work, wait_tensor waits for it
FUNCTIONAL_WAIT = FUNCTIONAL + "wait_tensor"


def _comm_of(name: str) -> str | None:
    """The collective kind of a communication event (gloo's and NCCL's work items, c10d's and the functional
    collectives' ops on the calling thread, NCCL kernels), None for anything else (a functional wait included:
    its kind is the collective it waits for)."""
    low = name.lower()
    if not (low.startswith(("gloo:", "nccl:", "c10d::", FUNCTIONAL)) or ("nccl" in low and "kernel" in low)) \
            or "barrier" in low or name == FUNCTIONAL_WAIT:
        return None
    flat = low.split(":")[-1].replace("_", "")
    # a functional op that is no collective (_wrap_tensor_autograd) is bookkeeping: an operator like any other
    return next((kind for word, kind in KINDS if word in flat), None if name.startswith(FUNCTIONAL) else "other_collective")


@functools.cache
def event_cost() -> float:
    """Seconds the profiler adds per recorded event in this process: a loop of tiny ops, timed with and without
    (measured once per machine, torch and thread count, then cached with the other calibrations)."""
    from parallelkit.measure import calibrate

    key = calibrate.cache_key("fp32", torch.get_num_threads(), torch.device("cpu"))
    if (entry := calibrate.read_cache(key, "profiler")) is not None:
        return entry["s_per_event"]
    x = torch.ones(8)

    def loop(n: int = 400) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.add(x, 1)
        return time.perf_counter() - t0

    loop(100)
    bare = min(loop() for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        profiled = min(loop() for _ in range(3))
    cost = max(0.0, (profiled - bare) / max(1, len(p.events()) // 3))
    calibrate.write_cache(key, {"s_per_event": cost}, "profiler")
    return cost


def analyze(events, pipeline: bool, cuda: bool = False, per_event: float = 0.0) -> dict | None:
    """The breakdown of the profiled step (see the module doc); None when the step's marker is missing."""
    step = [e for e in events if e.name == STEP]
    if not step:
        return None
    main = step[0].thread
    t0 = min([e.time_range.start for e in events if e.name in (STEP, DATA)])
    t1 = max(e.time_range.end for e in events if e.name in (STEP, DATA))
    # (start, end, what, detail, on the main thread): what is compute, comm or data
    spans: list[tuple[float, float, str, str, bool]] = []
    # the collective the caller asked for, by the c10d (or functional) op that enqueued the work: gloo runs a
    # reduce-scatter as an all-reduce, and its work item is named after what it runs
    called = sorted((e.time_range.start, k) for e in events
                    if e.thread == main and e.name.startswith(("c10d::", FUNCTIONAL)) and (k := _comm_of(e.name)))
    starts = [c[0] for c in called]
    # threads that run a communication library's work items; never the main one (gloo records its send and recv
    # work items on the thread that calls them)
    comm_threads = {e.thread for e in events if e.name.lower().startswith(("gloo:", "nccl:"))} - {main}
    for e in events:
        s, t = max(e.time_range.start, t0), min(e.time_range.end, t1)
        if t <= s:
            continue
        on_gpu = getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)
        kind, here = _comm_of(e.name), e.thread == main
        if cuda:
            if on_gpu:
                spans.append((s, t, "comm", kind, False) if kind else (s, t, "compute", _context(e), False))
            elif e.name == DATA:
                spans.append((s, t, "data", "", here))
            continue
        if here and e.name.startswith(WAIT):
            spans.append((s, t, "comm", e.name[len(WAIT):], True))
        elif here and e.name == FUNCTIONAL_WAIT:  # waits for the functional collective queued last
            j = bisect.bisect_right(starts, e.time_range.start) - 1
            spans.append((s, t, "comm", called[j][1] if j >= 0 else "other_collective", True))
        elif kind is not None and (not here or e.name.startswith(("c10d::", FUNCTIONAL))):
            j = bisect.bisect_right(starts, e.time_range.start) - 1
            if not here and j >= 0 and e.time_range.start - starts[j] <= ENQUEUE_US:
                kind = called[j][1]
            spans.append((s, t, "comm", kind, here))
        elif e.thread not in comm_threads and _is_op(e.name) and not _under_op(e):
            # any thread but gloo's: FairScale's Pipe runs stages on its own
            spans.append((s, t, "compute", _context(e), here))
        elif e.name == DATA:
            spans.append((s, t, "data", "", here))
    parts = dict.fromkeys(PARTS, 0.0)
    exposed: dict[str, float] = {}
    hidden: dict[str, float] = {}
    bounds = sorted({t0, t1, *(sp[0] for sp in spans), *(sp[1] for sp in spans)})
    # a sweep over the elementary intervals between consecutive boundaries, with the spans active in each
    spans.sort()
    active: list[tuple[float, float, str, str, bool]] = []
    i = 0
    for a, b in zip(bounds, bounds[1:]):
        while i < len(spans) and spans[i][0] <= a:
            active.append(spans[i])
            i += 1
        active = [s for s in active if s[1] > a]
        d = (b - a) * 1e-6
        # the main thread inside a communication call (a c10d op, a functional collective or its wait, a p2p
        # wait) computes nothing, even where that call runs inside an operator (DTensor's collectives run inside
        # the operator they redistribute for): only other threads' operators hide it
        blocked = any(s[2] == "comm" and s[4] for s in active)
        compute = [s for s in active if s[2] == "compute" and not (blocked and s[4])]
        comm = sorted({s[3] for s in active if s[2] == "comm"})
        if compute:
            parts[compute[0][3] if compute[0][3] in COMPUTE_PARTS else "forward"] += d
            for k in comm:
                hidden[k] = hidden.get(k, 0.0) + d / len(comm)
        elif comm:
            for k in comm:
                share = d / len(comm)
                if pipeline and k == "send_recv":
                    parts["pipeline_idle"] += share
                else:
                    parts["exposed_comm"] += share
                    exposed[k] = exposed.get(k, 0.0) + share
        elif any(s[2] == "data" for s in active):
            parts["data"] += d
        else:
            parts["other"] += d
    # the profiler's own cost: its events on the main thread at the measured cost each, taken from what no op or
    # collective covers (most of it falls between operators)
    n_main = sum(1 for e in events if e.thread == main and t0 <= e.time_range.start <= t1)
    parts["profiler"] = min(parts["other"], n_main * per_event)
    parts["other"] -= parts["profiler"]
    return {"wall_s": (t1 - t0) * 1e-6, "parts_s": parts, "events": n_main, "exposed_s_by_kind": exposed, "hidden_s_by_kind": hidden,
            "comm_s_by_kind": {k: exposed.get(k, 0.0) + hidden.get(k, 0.0) for k in {*exposed, *hidden}},
            "how": "torch.profiler (CUDA kernels)" if cuda else "torch.profiler (CPU operators and gloo work)"}


def _under_op(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if _is_op(p.name):
            return True
        p = p.cpu_parent
    return False


# ---- reading a summary's breakdown ----
# A run's parts: its profiled untimed step on its critical rank (the one that computes longest: the others wait for it
# in their collectives, and that wait is its time, not the wire's), put on the scale of the run's timed step: each
# part's share of the profiled step (data loading and the profiler's own cost left out: neither is in a timed step)
# times the timed median. So a run's parts add up to its median step time.
LABELS = {"forward": "forward", "backward": "backward", "optimizer": "optimizer", "pipeline_idle": "pipeline idle",
          "other": "other (framework, Python)"}
COMPUTE = ("forward", "backward")


def _ranks(s: dict) -> list[dict]:
    return [b for b in s.get("step_breakdown") or [] if isinstance(b, dict) and b.get("parts_s")]


def busy(b: dict) -> float:
    return sum(b["parts_s"].get(k, 0.0) for k in COMPUTE_PARTS)


def critical(s: dict) -> dict | None:
    """The rank whose forward, backward and optimizer took longest on the profiled step."""
    ranks = _ranks(s)
    return max(ranks, key=busy) if ranks else None


def parts_ms(s: dict) -> dict[str, float] | None:
    """{part: ms of the timed median step} on the critical rank: forward, backward, optimizer, ``exposed <kind>`` per
    collective kind, pipeline idle, other; None without a breakdown or a median step time."""
    b, step = critical(s), s.get("step_time_s")
    if b is None or blank(step):
        return None
    p = b["parts_s"]
    acc = {k: p.get(k, 0.0) for k in ("forward", "backward", "optimizer", "pipeline_idle", "other")}
    acc.update({f"exposed {kind}": v for kind, v in (b.get("exposed_s_by_kind") or {}).items()})
    total = sum(acc.values())
    return {k: v / total * step * 1e3 for k, v in acc.items()} if total > 0 else None


def profiled_ratio(s: dict) -> float | None:
    """The critical rank's profiled step (less data loading and the profiler's estimated cost) over the timed median."""
    b = critical(s)
    if b is None or blank(s.get("step_time_s")):
        return None
    return (b["wall_s"] - b["parts_s"].get("data", 0) - b["parts_s"].get("profiler", 0)) / s["step_time_s"]


def skew_ms(s: dict) -> float | None:
    """How much longer the critical rank computed than the quickest (profiled step, ms): what the others waited."""
    ranks = _ranks(s)
    return (max(map(busy, ranks)) - min(map(busy, ranks))) * 1e3 if len(ranks) > 1 else None


def label(part: str) -> str:
    return LABELS.get(part, part)


def top_parts(s: dict, n: int = 4) -> str | None:
    """A run's own line: its step and its largest parts with their shares."""
    p = parts_ms(s)
    if p is None:
        return None
    step = s["step_time_s"] * 1e3
    best = sorted(p, key=lambda k: -p[k])[:n]
    return f"step {step:.1f} ms: " + ", ".join(f"{label(k)} {p[k]:.1f} ms ({p[k] / step:.0%})" for k in best)


