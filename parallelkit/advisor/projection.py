"""A projected step time: a model of the step, shown beside what runs measure, never passed off as one.

``project(cfg, comm_by_kind, layout, ...)``: the step by the parts measure/breakdown.py measures (``parts_s``): forward
and backward (the compute below, 1/3 and 2/3), the optimizer (``optimizer_seconds``), communication by kind less what
the backend's overlap rule hides (``exposed``; on CPU nothing), and a pipeline's idle time (its bubble, (pp-1)/m of
the compute, plus its p2p), and the backend's own framework time (hooks, dispatch, small calls: framework.py,
measured on a narrow copy of the run). See docs/step_time.md.

- compute_s = FLOPs per device per step / (peak x efficiency). FLOPs: ``GPTConfig.flops_per_token``
  (6N + 12·L·d·T, the figure behind a run's ``tflops``) x the global batch's tokens / devices: a
  pipeline's or tensor-parallel replica splits its work over its pp·tp devices. On this machine's
  CPU the share is per process instead (a process driving several pipeline "devices", or
  ``single``, does all their work on its own threads).
  Peak: a named device (``projection.device=H100``): the data sheet (util/devices.py);
  else ``peak_tflops``, or this machine's: on CPU calibrate.py's matmul peak at a worker's thread
  count (the cores shared by the local processes), on CUDA the data sheet.
  Efficiency: ``projection.efficiency``; on a GPU ``GPU_EFFICIENCY`` (an assumption); on CPU
  measured here: the rate of a short forward + backward (the run's precision, no optimizer step) of a
  proxy of the configured model (its widths, vocabulary and micro-batch; at most 2 blocks; the batch,
  then the sequence, cut while a step would take over ~1 s) over the peak, cached; stepped in as many
  processes at once as the run has here (up to the cores), since processes that compute at once share
  caches, memory bandwidth and clocks, and timed as a run is: the median step, each waiting for the
  slowest process (the best of a few trials ran about 10% faster than that); held as the run holds its model
  (``Strategy.proxy_held``: a one-process CPU Pipe, FSDP2's ``fully_shard``). The CPU projection is then FLOPs /
  the proxy's rate (the peak cancels). A proxy of
  over ``PROXY_MAX_PARAMS`` (gpt_125m and up) would take tens of seconds and gigabytes to measure:
  those get ``CPU_EFFICIENCY``, an assumption from the MFU measured in results/.
- comm_s = sum over kinds of the alpha-beta time (bench_comm.coefficients: ring all-reduce,
  all-gather, reduce-scatter; tree broadcast; point-to-point send/recv) of the kind's bytes per
  step, as ``Strategy.comm`` gives them (metrics.CommCounter's payload), on n ranks: the
  data-parallel size; with no data parallelism the tensor-parallel size; a pipeline alone: 2 (its
  tied embedding's pair). Each call pays the latency: the calls the run's narrow copy counted
  (framework.py), never fewer than a ``BUCKET``-sized message each. α and B: ``projection.latency_us``
  and ``projection.bandwidth_GBps`` where given, else bench_comm's calibration of this machine
  (per-kind fits; measured now if none is cached). On CPU, each call after which a rank waits for its
  peer having computed (``waits``) costs bench_comm's run-like time at the compute between waits
  (``comm_seconds``), or before each where the backend places them (``Strategy.wait_gaps``).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from omegaconf import OmegaConf

import parallelkit.advisor.bench_comm as bench_comm
import parallelkit.measure.calibrate as calibrate
from parallelkit.config.checks import named_device, projection_setting
from parallelkit.config.layout import Layout
from parallelkit.measure.metrics import cores, cpu_threads
from parallelkit.measure.noise import DRIFT_LIMIT
from parallelkit.models.gpt import GPTConfig
from parallelkit.util.devices import CUDA_PEAK_TFLOPS

BUCKET = 25 * 2**20  # bytes per message for the latency term: DDP's default bucket (bucket_cap_mb=25)
GPU_EFFICIENCY = 0.4  # achieved / peak FLOP/s assumed on a GPU (large GPT training reaches ~0.3-0.5)
CPU_EFFICIENCY = 0.3  # CPU, a model too large to proxy: results/memory_vs_model's gpt_125m, gpt_350m had MFU 0.2-0.33
PROXY_MAX_PARAMS = 30_000_000  # a larger proxy takes tens of seconds and gigabytes to build and step on a CPU
PROXY_STEP_S = 1.0  # the efficiency proxy's step, at an assumed half of the peak
PROXY_TRIAL_S = 0.5  # the proxy is timed for PROXY_TRIALS x this long, step by step: the median step (6 steps of
PROXY_TRIALS, PROXY_MIN_STEPS = 4, 10  # a 2-process proxy varied by 20% from one measurement to the next)
PROXY_SPAWNS = 3  # a proxy stepped in new processes (several, or a Pipe's) is stepped in this many sets of them,
# the median kept (``_timed``); one of a single process is stepped in this one
SPAWN_MORE_S = 0.02  # ... when its first set's step is at least this long


def group_size(layout: Layout) -> int:
    """The ranks of the collectives' group (see the module doc)."""
    if layout.dp > 1:
        return layout.dp
    if layout.tp > 1:
        return layout.tp
    return 2 if layout.pp > 1 else layout.world


SHORT_GAP_S = 0.001  # bench_comm's shortest run-like gap, if below this: a call after less compute costs what it timed


def comm_seconds(comm_by_kind: dict[str, float], n: int, alpha: float, bandwidth: float,
                 per_kind: dict[str, tuple[float, float]] | None = None, bucket: int = BUCKET,
                 calls: dict[str, float] | None = None, between: dict | None = None,
                 gap: float | None = None, waits: dict[str, float] | None = None,
                 gaps: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, float]:
    """Seconds per kind: its bytes on n ranks (send_recv: point to point) in ``calls`` calls where counted (else
    ``bucket``-sized messages; never fewer), each paying the latency, at (α, B), or at the kind's own fit in
    ``per_kind``. ``between`` (bench_comm's run-like fits, kind -> [(compute before a call, α, B)]), ``gap`` (the
    compute between two of the run's waits) and ``waits`` (kind -> its calls that follow compute, ``waits``): each
    of those costs what the run-like timing measured after that much compute, interpolated between the gaps it
    timed and flat below the shortest (a call after any compute costs more than back to back: bench_comm), never
    less than back to back; the others cost their back-to-back time. ``gaps`` (kind -> [(waits, compute before
    each)], ``Strategy.wait_gaps``): those of a kind's waits after their own compute, the rest after ``gap``."""
    out = {}
    for kind, nbytes in comm_by_kind.items():
        if nbytes > 0:
            a, b = (per_kind or {}).get(kind, (alpha, bandwidth))
            m = _calls(kind, nbytes, calls, bucket)
            t = bench_comm.model_time(kind, nbytes, n, a, b, m)
            if between and kind in between and gap is not None:
                anchors = [(g, bench_comm.model_time(kind, nbytes, n, ga, gb, m)) for g, ga, gb in between[kind]]
                if anchors[0][0] > SHORT_GAP_S:  # a calibration without the short gap: from back to back at none
                    anchors.insert(0, (0.0, t))
                w = min(float(m), (waits or {}).get(kind, m))
                placed = [(k, g) for k, g in (gaps or {}).get(kind, []) if k > 0]
                if (total := sum(k for k, _ in placed)) > w:  # more placed than the run waits: scaled to them
                    placed = [(k * w / total, g) for k, g in placed]
                placed.append((max(0.0, w - sum(k for k, _ in placed)), gap))
                t += sum(max(0.0, _interpolate(anchors, g) - t) * k / m for k, g in placed)
            out[kind] = t
    return out


def _calls(kind: str, nbytes: float, calls: dict[str, float] | None, bucket: int) -> int:
    """A kind's calls per step: the counted ones, never fewer than a message per ``bucket`` (at least one)."""
    return max(1, math.ceil(nbytes / bucket), round((calls or {}).get(kind, 0)))


def _run_like(between: dict, on_cpu: bool, pipelined: bool) -> dict | None:
    """The run-like fits that apply: this CPU's only; a pipeline's point-to-point waits are its idle time (the
    bubble), not a wait for a peer's compute between collectives."""
    if not on_cpu or not between:
        return None
    return {k: v for k, v in between.items() if not (pipelined and k == "send_recv")}


def waits(comm_by_kind: dict[str, float], calls: dict[str, float] | None, overlap: dict[str, str] | None,
          n_layer: int, micro_batches: int, bucket: int = BUCKET,
          bursts: dict[str, float] | None = None) -> dict[str, float]:
    """Per kind, the calls after which a rank has computed and waits for its peer: every call of a kind the backend
    waits for where it calls it (counted ones, else a message per ``bucket``), or the share of them that follow
    compute (``bursts``: ``Strategy.bursts``); a kind it runs under compute (``overlap``) is issued from hooks in
    bursts, one wait per block (and the embedding and the head) per pass it runs under, per micro-batch."""
    passes = {"backward": 1, "forward+backward": 2}
    out = {}
    for k, v in comm_by_kind.items():
        if v > 0:
            out[k] = _calls(k, v, calls, bucket) * (bursts or {}).get(k, 1.0)
            if k in (overlap or {}):
                out[k] = min(out[k], passes.get(overlap[k], 1) * (n_layer + 2) * micro_batches)
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through (x, y) points sorted by x; flat beyond the last."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * max(0.0, x - x0) / max(x1 - x0, 1e-12)
    return points[-1][1]


# ---- compute ----
def device_peak(cfg, layout: Layout, measure: bool = True) -> tuple[str, float | None, str]:
    """(device, peak TFLOP/s per device, where the peak comes from)."""
    prec = cfg.train.precision
    if key := named_device(cfg):
        return key, CUDA_PEAK_TFLOPS[key][prec], f"data sheet: {key} {prec}"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({calibrate.host_facts()['cpu']})"
    if cfg.get("peak_tflops"):
        return device, float(cfg.peak_tflops), "config: peak_tflops"
    if cuda:
        peak, source = calibrate.device_peak(torch.device("cuda", 0), prec)
        return device, peak, source
    threads = cpu_threads(layout.processes)
    with calibrate._threads(threads):
        c = calibrate.calibration(torch.device("cpu"), prec) if measure else calibrate._read(
            calibrate.cache_key(prec, threads, torch.device("cpu")))
    if c is None:
        return device, None, f"no {prec} matmul calibration cached for {threads} thread(s) (parallelkit.calibrate)"
    return device, c["tflops"], f"matmul calibration, {prec}, {threads} thread(s) ({c['measured_at']})"


def proxy_shape(cfg, peak_tflops: float, held: dict | None = None, split: int = 1) -> tuple[dict, int] | None:
    """The efficiency proxy's model config and batch: the configured model with at most 2 blocks, at the tokens
    one rank computes in a pass (``split``: the ranks a micro-batch's sequences are split over, context
    parallelism: the batch, else the sequence, divided by it), then the batch and the sequence halved while a step
    of the FLOPs one process computes (held as ``held``: a tensor-parallel rank's share) would take over
    PROXY_STEP_S at half the peak; None when the proxy itself has over PROXY_MAX_PARAMS parameters (too slow to
    build and step here)."""
    m = {k: cfg.model[k] for k in GPTConfig.__dataclass_fields__ if k in cfg.model}
    m["n_layer"], b = min(m["n_layer"], 2), cfg.train.micro_batch_size
    if GPTConfig(**m).num_params() > PROXY_MAX_PARAMS:
        return None
    if split > 1:  # a pass's per-rank costs (FSDP2's copies and hooks) come once per tokens/split, not per tokens
        if b % split == 0:
            b //= split
        else:
            m["seq_len"] = max(1, m["seq_len"] // split)
    flops = lambda: _rank_flops_per_token(m, held) * b * m["seq_len"]  # noqa: E731
    while flops() > peak_tflops * 1e12 / 2 * PROXY_STEP_S and (b > 1 or m["seq_len"] > 16):
        if b > 1:
            b //= 2
        else:
            m["seq_len"] //= 2
    return m, b


def _proxy_timer(m: dict, b: int, ckpt: bool, prec: str, held: dict | None = None, optimizer: bool = False):
    """``steps(n)``: seconds per forward + backward of the proxy model (config ``m``, batch ``b``), n times, held
    as the run holds its model (``Strategy.proxy_held``): a FairScale Pipe on CPU, or FSDP2 (``_shard_proxy``).
    ``optimizer``: instead, seconds per clipped AdamW step over its parameters (``GPTConfig.num_params``: a Pipe's
    head copy is not stepped; DeepSpeed's CPU Adam for an offloaded optimizer), each right after a backward, as a
    run steps it: the backward leaves the caches cold (measured: 2.8-3 ns an element, against 1.9-2.3 for the
    same steps back to back)."""
    from parallelkit.models.gpt import build_model, lm_loss
    from parallelkit.strategies.shared.precision import Precision

    model = gpt = build_model(m, seed=0, activation_checkpointing=ckpt)
    precision = Precision(prec, torch.device("cpu"))
    autocast = precision.autocast
    pipe, fsdp, tp = (held or {}).get("pipe"), (held or {}).get("fsdp2"), (held or {}).get("tp")
    if tp:
        _tp_proxy(gpt, *tp)
    if pipe:
        from parallelkit.strategies.fairscale.pipe import cpu_proxy

        model = cpu_proxy(gpt, pipe[0], math.gcd(pipe[1], b), precision.dtype)
    if fsdp:
        _shard_proxy(gpt, fsdp, optimizer)
    stepped = [p for p in model.parameters() if not (pipe and p is gpt.head.out.weight)]
    opt = None
    if optimizer and (held or {}).get("cpu_adam"):  # DeepSpeed's, for an offloaded optimizer
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(stepped, lr=1e-4, weight_decay=0.1, adamw_mode=True)
    elif optimizer:
        opt = torch.optim.AdamW(stepped, lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, n, (b, m["seq_len"]), generator=g)
            for n in (gpt.embed.tok.num_embeddings, gpt.head.out.out_features))
    loss_fn = _vocab_parallel_loss() if tp and tp[1] else lm_loss

    def steps(n: int) -> float:
        t0, spent = time.perf_counter(), 0.0
        for _ in range(n):
            with autocast():
                loss = loss_fn(model(x), y)
            loss.backward()
            if opt is not None:
                t1 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(stepped, 1.0)
                opt.step()
                spent += time.perf_counter() - t1
            model.zero_grad(set_to_none=True)
        return (spent if opt is not None else time.perf_counter() - t0) / n
    return steps


def _whole_mesh(held: dict | None, processes: int) -> list[int] | None:
    """FSDP2's (replicate, shard) mesh when the timing processes make all of it (its optimizer proxy is stepped on
    it: ``_shard_proxy``), else None."""
    mesh = ((held or {}).get("fsdp2") or {}).get("mesh")
    return mesh if mesh and mesh[0] * mesh[1] == processes else None


def _optimizer_shards(held: dict | None, processes: int) -> int:
    """Into how many shards the optimizer proxy's parameters are cut: FSDP2's shard degree on its whole mesh."""
    mesh = _whole_mesh(held, processes)
    return mesh[1] if mesh else 1


def _tp_proxy(gpt, tp: int, head: bool) -> None:
    """One tensor-parallel rank's share of the proxy's layers, as the run's ranks compute them: each block's
    linears at 1/tp of its heads and hidden units (FairScale's column- and row-parallel linears, DTensor's colwise
    and rowwise plans) and, with ``head``, the output layer and the token embedding at 1/tp of the vocabulary,
    tied where the model ties them (FairScale's vocab-parallel embedding); no collectives (the projection charges
    them apart). Its rate is per FLOP of that share (``_rank_flops_per_token``): at batch 1 on `small` a half-width
    2-block model stepped in 143 ms against 333 for the whole one, 15% faster per FLOP (at batch 4, 3% slower).
    Beside FairScale's own layers (2 blocks of `small`, 2 processes at once): 139 and 516 ms at batch 1 and 4,
    against 147 and 531 for FairScale's with their all-reduces."""
    for block in gpt.blocks:
        attn, mlp = block.attn, block.mlp
        d, hidden = attn.qkv.in_features, mlp.fc.out_features
        attn.qkv, attn.proj = torch.nn.Linear(d, 3 * d // tp), torch.nn.Linear(d // tp, d)
        mlp.fc, mlp.proj = torch.nn.Linear(d, hidden // tp), torch.nn.Linear(hidden // tp, d)
    if head:
        out, tok = gpt.head.out, gpt.embed.tok
        tied = out.weight is tok.weight
        gpt.head.out = torch.nn.Linear(out.in_features, out.out_features // tp, bias=False)
        gpt.embed.tok = torch.nn.Embedding(tok.num_embeddings // tp, tok.embedding_dim)
        if tied:
            gpt.head.out.weight = gpt.embed.tok.weight
    gpt.init_weights(0)  # the cut layers as the run's start: torch's defaults made `small`'s logits span some
    # 160 (an embedding of N(0, 1)), and most of the loss's exp() underflowed: 0.38 s of a 0.82-s step


def _vocab_parallel_loss():
    """The loss of a tensor-parallel rank whose head is cut to its vocabulary slice, as the run computes it:
    FairScale's ``vocab_parallel_cross_entropy`` (its max, exp and sums over the slice, the softmax kept for
    backward), on a group of this timing process alone (its three all-reduces: the projection charges them apart).
    Its ops cost less than ``cross_entropy``'s over the same logits: FairScale's 4-block `small` at batch 4 computed
    539-563 ms a micro-batch with it and 571-599 with ``cross_entropy`` (2 processes); the 2-block proxy 483-506
    against 525-541 (one). Outside a process group: ``lm_loss``."""
    import torch.distributed as dist

    from parallelkit.models.gpt import lm_loss

    if not dist.is_initialized():
        return lm_loss
    import fairscale.nn.model_parallel.cross_entropy as ce

    own = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every process makes every group
    ce.get_model_parallel_group = lambda: own[dist.get_rank()]  # a timing process of its own: nothing else uses it
    ce.get_model_parallel_rank, ce.get_model_parallel_world_size = (lambda: 0), (lambda: 1)
    return lambda logits, y: ce.vocab_parallel_cross_entropy(logits.float(), y).mean()


def _rank_flops_per_token(m: dict, held: dict | None) -> float:
    """The training FLOPs per token of the proxy (config ``m``) that one process computes, held as ``held``: all of
    them, or one tensor-parallel rank's share (``_tp_proxy``): 1/tp, or where the head is kept whole on every rank
    that x ``whole_head_share``, as the projection counts a rank's (``Strategy.compute_share``)."""
    from parallelkit.strategies.shared.pipeline import whole_head_share

    c = GPTConfig(**m)
    if not (held or {}).get("tp"):
        return c.flops_per_token()
    tp, head = held["tp"]
    return c.flops_per_token() / tp * (1.0 if head else whole_head_share(c, tp))


def _shard_proxy(gpt, fsdp: dict, optimizer: bool) -> None:
    """Wrap the proxy in FSDP2 as the strategies do (``fully_shard`` on each block, then on the root, gathered
    until backward), in one of the timing processes (``_timed_rank``). Its forward and backward: on a mesh of this
    process alone, so that FSDP2's copies into and out of its flat buffers and its hooks are timed, its collectives
    not (the projection charges them apart). Its optimizer: on the run's own (replicate, shard) mesh over the
    timing processes, where they make one (``_optimizer_shards``): AdamW over the DTensors' local shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole = _whole_mesh({"fsdp2": fsdp}, dist.get_world_size()) if optimizer else None
    if whole:
        rep, shard = whole
        mesh = init_device_mesh("cpu", (rep, shard), mesh_dim_names=("replicate", "shard")) if rep > 1 else \
            init_device_mesh("cpu", (shard,))  # HSDP's 2-D mesh, or FSDP's
    else:
        own = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every process makes every group
        mesh = DeviceMesh.from_group(own[dist.get_rank()], "cpu")
    for block in gpt.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=fsdp["reshard"])
    fully_shard(gpt, mesh=mesh, reshard_after_forward=False)


def _proxy_steps(first_s: float, share: float = 1.0) -> int:
    """Steps to time after a warm-up step of ``first_s``: PROXY_TRIALS trials' worth, PROXY_MIN_STEPS to 3 times
    that (a median of 30 short steps is as steady as one of 100); ``share`` of each for one of several sets of
    processes (``_timed``)."""
    least = math.ceil(PROXY_MIN_STEPS * share)
    return min(3 * least, max(least, math.ceil(PROXY_TRIALS * PROXY_TRIAL_S * share / first_s)))


def _alone(timer, args: tuple, threads: int) -> tuple[float, int]:
    """(median seconds per step, steps timed) of ``timer(*args)``'s steps in this process, alone."""
    with calibrate._threads(threads):
        steps = timer(*args)
        n = _proxy_steps(steps(1))  # the first step also warms up
        return statistics.median(steps(1) for _ in range(n)), n


def _timed_rank(rank: int, timer, args: tuple, threads: int, out: str, share: float = 1.0) -> None:
    """One of the processes stepping ``timer(*args)`` at once: every step starts together (a barrier, as a run's
    collectives line its ranks up), all take as many; each writes its step times."""
    import gc
    import json

    import torch.distributed as dist

    from parallelkit.runtime.processes import INIT_METHOD

    os.dup2(2, 1)  # what the backends print (DeepSpeed's logger) goes to stderr: a caller's stdout may be its JSON
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                            init_method=os.environ[INIT_METHOD])
    torch.set_num_threads(threads)
    steps = timer(*args)
    n = torch.tensor([_proxy_steps(steps(1), share)])
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    times = []
    for _ in range(int(n)):
        dist.barrier()
        times.append(steps(1))
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(times, f)
    del steps  # a CPU Pipe's worker thread is joined now, while it can be: at exit it hangs the process
    gc.collect()
    dist.destroy_process_group()


def _together(timer, args: tuple, threads: int, processes: int, share: float = 1.0) -> tuple[float, int]:
    """(median over steps of the slowest process's step, steps timed) with ``processes`` processes stepping
    ``timer(*args)`` at once, as the run's processes compute at once (they share caches, memory bandwidth and
    clocks), and the statistic a run reports (its median step, which waits for its slowest rank)."""
    import json
    import tempfile

    from parallelkit.runtime.processes import spawn

    with tempfile.TemporaryDirectory(prefix="parallelkit-timed-") as out:
        spawn(_timed_rank, processes, timer, args, threads, out, share, timeout=300)
        got = [json.loads(open(os.path.join(out, f"{r}.json")).read()) for r in range(processes)]
    return statistics.median(max(step) for step in zip(*got)), len(got[0])


def _timed(timer, args: tuple, threads: int, processes: int, apart: bool = False,
           spawns: int = 1) -> tuple[float, int]:
    """``_alone`` for one process, unless ``apart``: a timer that leaves threads behind (a Pipe's worker, with its
    own intra-op threads) is timed in a process of its own, where they cannot slow what this process measures
    next. Else the median of ``_together``'s step over ``spawns`` sets of new processes, one after another (steps
    timed: all of them). A process keeps a speed of its own (one set of 2 read 108-127 ms a step, the next within
    a few seconds 10% apart): the median of 3 sets kept to 114-121. A step under SPAWN_MORE_S is mostly framework
    time, which the narrow copy measures: one set, since starting a set costs seconds."""
    if processes == 1 and not apart:
        return _alone(timer, args, threads)
    got = [_together(timer, args, threads, processes, 1 / spawns)]  # each set a share of the steps
    while len(got) < spawns and got[0][0] >= SPAWN_MORE_S:
        got.append(_together(timer, args, threads, processes, 1 / spawns))
    return statistics.median(t for t, _ in got), sum(n for _, n in got)


def _stepped_as(held: dict | None) -> dict | None:
    """What of ``held`` the forward and backward see: not the optimizer's CPU Adam, nor FSDP2's mesh (the proxy's
    forward and backward are on a mesh of each process alone), so that runs which differ only there share one
    measurement."""
    out = {k: v for k, v in (held or {}).items() if k in ("pipe", "tp")}
    if "fsdp2" in (held or {}):
        out["fsdp2"] = {"reshard": held["fsdp2"]["reshard"]}
    return out or None


def _held(held: dict | None, optimizer: bool = False) -> str:
    """How a source names a rate measured on a proxy held as the run holds its model (``Strategy.proxy_held``)."""
    if (held or {}).get("pipe"):
        return f", as a {held['pipe'][0]}-stage CPU pipeline"
    if (held or {}).get("tp") and not optimizer:  # the optimizer's rate is per element: its proxy is not cut
        return f", as one of {held['tp'][0]} tensor-parallel ranks"
    if (fsdp := (held or {}).get("fsdp2")):
        return (f", under FSDP2 over a ({fsdp['mesh'][0]}, {fsdp['mesh'][1]}) mesh" if optimizer else
                f", under FSDP2 (its copies and hooks{', resharded after forward' if fsdp['reshard'] else ''})")
    return ", DeepSpeed's CPU Adam" if optimizer and (held or {}).get("cpu_adam") else ""


def fresh(entry: dict, max_age_s: float | None) -> bool:
    """Whether a cached measurement is younger than ``max_age_s`` (None: any age will do)."""
    if max_age_s is None:
        return True
    try:
        then = datetime.fromisoformat(entry["measured_at"])
    except (KeyError, TypeError, ValueError):
        return False
    return (datetime.now(timezone.utc) - then).total_seconds() <= max_age_s


RATE_SAMPLES, RATE_HISTORY_S = 3, 600  # a rate measured again is the median of its last 3 measurements within
# 10 minutes: one measurement of a 2-process proxy (itself the median of 3 sets of processes) read 17% slower than
# the one 16 minutes before it while the runs it projected stepped 7-10% slower (compare_all, 04:05 and 04:21 UTC)


def _recent(old: dict | None, step: float) -> tuple[float, list]:
    """(the median step of ``step`` and the steps ``old`` was measured at within RATE_HISTORY_S, the last
    RATE_SAMPLES of them; those samples as [time, step]): a rate that drifts is followed within a few
    measurements, and one that is off by chance moves the projection by less."""
    now = datetime.now(timezone.utc)
    kept = [] if old is None else old.get("samples") or [[old.get("measured_at"), old.get("step_s")]]
    kept = [s for s in kept if s[1] and fresh({"measured_at": s[0]}, RATE_HISTORY_S)]
    samples = [*kept[-(RATE_SAMPLES - 1):], [now.isoformat(timespec="seconds"), step]]
    return statistics.median(v for _, v in samples), samples


def proxy_rate(cfg, threads: int, peak_tflops: float, measure: bool = True, processes: int = 1,
               max_age_s: float | None = None, held: dict | None = None, split: int = 1) -> dict | None:
    """TFLOP/s (model FLOPs) of the proxy's forward and backward with ``threads`` threads in each of ``processes``
    processes stepping it at once, held as the run holds its model (``held``: ``_proxy_timer``): cached
    (younger than ``max_age_s``, if given), or measured now. No optimizer step: its cost is per parameter, not per
    token, and would swamp a proxy cut to few tokens."""
    held = _stepped_as(held)
    if (shape := proxy_shape(cfg, peak_tflops, held, split)) is None:
        return None
    m, b = shape
    ckpt, prec = bool(cfg.train.activation_checkpointing), cfg.train.precision
    key = {**calibrate.cache_key(prec, threads, torch.device("cpu")), "proxy": m, "batch": b, "checkpointing": ckpt,
           "statistic": "median step", **({"processes": processes} if processes > 1 else {}),
           **({"held": held} if held else {}),
           **({"loss": "vocab_parallel_cross_entropy"} if (held or {}).get("tp", [1, False])[1] else {})}
    if ((old := calibrate.read_cache(key, "efficiency")) is not None and fresh(old, max_age_s)) or not measure:
        return old
    at_once = f", {processes} processes at once" if processes > 1 else ""
    print(f"parallelkit: measuring this CPU's training rate on a proxy of {cfg.model.get('name', 'the model')} "
          f"({threads} thread(s){at_once}{_held(held)}, {prec}; cached for later)", file=sys.stderr, flush=True)
    flops = _rank_flops_per_token(m, held) * b * m["seq_len"]
    entry = None
    for _ in range(2):  # measured on a busy machine (the re-check beside it slow): once more, the faster kept
        step, n = _timed(_proxy_timer, (m, b, ckpt, prec, held), threads, processes, bool(held), PROXY_SPAWNS)
        with calibrate._threads(threads):
            load = load_check(prec, threads)  # how busy the machine was while the proxy ran
        if entry is None or step < entry["step_s"]:
            entry = {"tflops": flops / step / 1e12, "step_s": step, "steps_timed": n, "load_check": load,
                     "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if busy_ratio(entry) is None:
            break
    step, entry["samples"] = _recent(old, entry["step_s"])
    entry.update(step_s=step, tflops=flops / step / 1e12)
    calibrate.write_cache(key, entry, "efficiency")
    return {"key": key, **entry}


def load_check(prec: str, threads: int) -> dict | None:
    """The matmul rate now (a short re-check, as after a run) beside this machine's calibrated one, for ``threads``
    threads: a proxy measured while another load ran is slow by about their ratio. None without a calibration."""
    calibrated = calibrate.read_cache(calibrate.cache_key(prec, threads, torch.device("cpu")))
    if calibrated is None:
        return None
    now = calibrate.recheck(torch.device("cpu"), prec)
    return {"matmul_tflops": now, "calibrated_tflops": calibrated["tflops"]}


def busy_ratio(entry: dict) -> float | None:
    """The re-checked over the calibrated matmul rate when the re-check beside the proxy fell more than DRIFT_LIMIT
    below the calibration (a busy machine, or a slower one than at calibration), else None."""
    lc = entry.get("load_check") or {}
    now, calibrated = lc.get("matmul_tflops"), lc.get("calibrated_tflops")
    return now / calibrated if now and calibrated and now < calibrated * (1 - DRIFT_LIMIT) else None


def efficiency(cfg, layout: Layout, peak: float | None, measure: bool = True,
               held: dict | None = None) -> tuple[float | None, str]:
    if (given := projection_setting(cfg, "efficiency")) is not None:
        return given, "config: projection.efficiency"
    if projection_setting(cfg, "device") or torch.cuda.is_available():
        return GPU_EFFICIENCY, f"assumed {GPU_EFFICIENCY} on a GPU (set projection.efficiency)"
    if peak is None:
        return None, "no peak to measure against"
    threads = cpu_threads(layout.processes)
    if proxy_shape(cfg, peak) is None:
        return CPU_EFFICIENCY, (f"assumed {CPU_EFFICIENCY} on CPU (a 2-block proxy of this model has over "
                                f"{PROXY_MAX_PARAMS / 1e6:.0f}M parameters: too slow to measure here; "
                                f"set projection.efficiency)")
    r = proxy_rate(cfg, threads, peak, measure, at_once(layout), held=held, split=layout.cp)
    if r is None:
        return None, "no training-rate measurement cached for this model's shapes (not measured: measure=False)"
    p, ratio = r["key"]["proxy"], busy_ratio(r)
    busy = f"; busy then: matmul at {ratio:.0%} of its calibration, measured twice" if ratio else ""
    each = f" in each of {r['key']['processes']} processes at once" if r["key"].get("processes") else ""
    each += _held(held)
    return min(1.0, r["tflops"] / peak), (f"measured: forward + backward of a {p['n_layer']}-block proxy, "
                                          f"batch {r['key']['batch']} x seq {p['seq_len']}, {threads} "
                                          f"thread(s){each} ({r['measured_at']}{busy})")


# ---- the optimizer: memory traffic, per parameter it updates ----
OPT_PROBE_ELEMENTS = 2**22  # 4M fp32 elements: ~112 MB of AdamW traffic, well past the caches


def _optimizer_timer(elements: int):
    """``steps(n)``: seconds per clipped AdamW step over ``elements`` fp32 parameters in 8 tensors, n times, back
    to back: for a model too large to proxy."""
    params = [torch.nn.Parameter(torch.randn(elements // 8)) for _ in range(8)]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return (time.perf_counter() - t0) / n
    return steps


def optimizer_rate(threads: int, measure: bool = True, processes: int = 1, max_age_s: float | None = None,
                   proxy: tuple | None = None) -> dict | None:
    """Seconds per parameter element of a clipped AdamW step (clip_grad_norm_, then AdamW's update: it reads
    parameter, gradient and both moments and writes three of them back, about 28 bytes per fp32 element) with
    ``threads`` threads in each of ``processes`` processes stepping at once (as a run's ranks do: they share the
    memory bandwidth), the median of the slowest: cached (younger than ``max_age_s``, if given), or measured now
    (a few seconds). ``proxy``: the training-rate proxy's (config, batch, checkpointing, precision, held), whose
    own parameters (their shards under FSDP2: ``_optimizer_shards``) are stepped after each backward
    (``_proxy_timer``); None: OPT_PROBE_ELEMENTS back to back."""
    elements = GPTConfig(**proxy[0]).num_params() // _optimizer_shards(proxy[4], processes) if proxy \
        else OPT_PROBE_ELEMENTS
    what = {"after_backward": dict(zip(("proxy", "batch", "checkpointing", "precision", "held"), proxy))} \
        if proxy else {"adamw_elements": OPT_PROBE_ELEMENTS}
    key = {**calibrate.cache_key("fp32", threads, torch.device("cpu")), **what,
           "statistic": "median step", **({"processes": processes} if processes > 1 else {})}
    if ((old := calibrate.read_cache(key, "optimizer")) is not None and fresh(old, max_age_s)) or not measure:
        return old
    if proxy:
        step, n = _timed(_proxy_timer, (*proxy, True), threads, processes, apart=bool(proxy[4]))
    else:
        step, n = _timed(_optimizer_timer, (OPT_PROBE_ELEMENTS,), threads, processes)
    step, samples = _recent(old if old and old.get("elements") == elements else None, step)
    entry = {"s_per_element": step / elements, "bytes_per_s": 28 * elements / step, "elements": elements,
             "steps_timed": n, "step_s": step, "samples": samples,
             "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    calibrate.write_cache(key, entry, "optimizer")
    return entry


def optimizer_proxy(cfg, peak: float | None, held: dict | None = None) -> tuple | None:
    """The (config, batch, checkpointing, precision, held) of ``cfg``'s training-rate proxy whose AdamW step is
    timed after its backward (``optimizer_rate``), at batch 1 without checkpointing: the rate is per parameter
    (on `small`'s proxy 4.4-4.7 ns an element after a backward of 1, 2, 4 or 8 rows), so the micro-batch sizes a
    tune tries share it; None without a peak or when too large to proxy."""
    shape = proxy_shape(cfg, peak) if peak else None
    held = {k: v for k, v in (held or {}).items() if k != "tp"} or None  # per element: any shape of layer will do
    return None if shape is None else (shape[0], 1, False, cfg.train.precision, held)


def optimizer_seconds(cfg, layout: Layout, updated: int | None, measure: bool = True, peak: float | None = None,
                      held: dict | None = None) -> tuple[float | None, str]:
    """The optimizer step of a rank that updates ``updated`` parameter elements: on CPU at this machine's measured
    AdamW rate (on the model's proxy, after its backward: ``optimizer_proxy``, given the matmul ``peak``); on a GPU
    as 28 bytes of HBM traffic per element at ``projection.memory_GBps`` (else not projected)."""
    if not updated:
        return None, "not projected (the parameters each rank updates are not known)"
    if projection_setting(cfg, "device") or torch.cuda.is_available():
        bw = projection_setting(cfg, "memory_GBps")
        if bw is None:
            return None, "not projected on a GPU without projection.memory_GBps"
        return 28 * updated / (bw * 1e9), f"28 B per element at config: projection.memory_GBps={bw}"
    threads, together = cpu_threads(layout.processes), at_once(layout)
    proxy = optimizer_proxy(cfg, peak, held)
    r = optimizer_rate(threads, measure, together, proxy=proxy)
    if r is None:
        return None, "no AdamW rate cached (not measured: measure=False)"
    each = f" in each of {together} processes at once" if together > 1 else ""
    over = (f"the {proxy[0]['n_layer']}-block proxy's {r.get('elements', 0) / 1e6:.2g}M elements, each after its "
            f"backward{_held(held, True)}") if proxy else \
        f"{OPT_PROBE_ELEMENTS >> 20}M elements"
    return updated * r["s_per_element"], (f"measured: clipped AdamW over {over}, {r['bytes_per_s'] / 1e9:.2g} GB/s, "
                                          f"{threads} thread(s){each} ({r['measured_at']})")


RATES_FRESH_S = 120  # a run measures again the rates older than this (one host: a 2-process proxy step of 94-113 ms
# at 22:36 UTC, 108-127 ms ten minutes later; a sweep that had measured them at its start 10 minutes before its own
# start projected all its 2-process runs 5-14% short)
RATES_FRESH_ENV = "PARALLELKIT_RATES_FRESH_S"  # seconds, to keep them longer (a quiet machine of one's own; the tests)


def rates_fresh_s() -> float:
    """How old a cached training rate may be before a run, sweep or tune measures it again: RATES_FRESH_S, or the
    seconds in $PARALLELKIT_RATES_FRESH_S."""
    try:
        return float(os.environ.get(RATES_FRESH_ENV) or RATES_FRESH_S)
    except ValueError:
        return RATES_FRESH_S


def refresh_rates(cfgs: list) -> None:
    """Before a sweep's first job and a tune's predictions: ``refresh_plan_rates`` of each composed config's plan
    (jobs that share a rate find it fresh once the first has measured it)."""
    from parallelkit.runtime.plan import build_plan

    if torch.cuda.is_available():
        return
    start = time.monotonic()
    for cfg in cfgs:
        try:
            plan = build_plan(cfg, quiet=True)
        except Exception:  # noqa: BLE001 - the job itself reports it
            continue
        # a rate this refresh has measured is fresh for the rest of it (a tune's took 300 s, and measured the
        # proxy its first candidates shared again for its last ones)
        refresh_plan_rates(plan, rates_fresh_s() + time.monotonic() - start)


def refresh_plan_rates(plan, max_age_s: float | None = None) -> None:
    """Measure again the training rates (the proxy's and the optimizer's) a plan will project with, where the
    cached ones are older than ``rates_fresh_s()``: before a sweep's first job, a tune's predictions and each run's own.
    A shared machine's rate drifts by more than the 10% a projection is asked to hold within minutes, so
    projections use rates measured beside the runs. On CPU only, where they are measured; 5-15 s each.
    ``max_age_s``: instead of ``rates_fresh_s()``."""
    c, layout = plan.cfg, plan.layout
    if torch.cuda.is_available() or projection_setting(c, "device") or projection_setting(c, "efficiency") is not None:
        return
    try:
        peak = device_peak(c, layout, True)[1]
        threads, together = cpu_threads(layout.processes), at_once(layout)
        if peak:
            held = plan.cls.proxy_held(c, plan.opts, layout)
            fresh_s = rates_fresh_s() if max_age_s is None else max_age_s
            proxy_rate(c, threads, peak, True, together, max_age_s=fresh_s, held=held, split=layout.cp)
            optimizer_rate(threads, True, together, max_age_s=fresh_s, proxy=optimizer_proxy(c, peak, held))
    except Exception:  # noqa: BLE001 - a rate that cannot be measured: the projection says what it lacks
        return


def at_once(layout: Layout) -> int:
    """How many of the run's processes compute at once here: all of them, up to the cores."""
    return min(layout.processes, cores())


# ---- communication ----
def comm_benchmark(cfg, n: int, cuda: bool, gpus: int = 0) -> tuple[str | None, int, str]:
    """Which collective benchmark a projection of ``n`` ranks may use: (backend or None, ranks, why). On a GPU
    machine the GPUs' own (NCCL, on up to the local GPUs), never gloo over CPU processes: their latency and
    bandwidth say nothing of NVLink or InfiniBand. None: only the projection.* settings can say (one GPU here).
    On a CPU machine, gloo on the ranks the run uses (at most the cores, at least 2)."""
    if cuda:
        if gpus < 2:
            return None, 0, ("one GPU here: no collective to measure; give projection.latency_us and "
                             "projection.bandwidth_GBps of the interconnect")
        ranks = min(n, gpus)
        return "nccl", ranks, f"bench_comm: {ranks} NCCL ranks on this machine's GPUs"
    ranks = n if bench_comm.load_calibration(n) else min(n, max(2, cores()))
    named = " (this CPU's gloo, not the named device's interconnect)" if projection_setting(cfg, "device") else ""
    return "gloo", ranks, f"bench_comm: {ranks} gloo ranks on this machine{named}"


def link(cfg, comm_by_kind: dict[str, float], n: int, measure: bool = True) -> dict:
    """α (s), B (bytes/s), per-kind fits and their source: projection.* where given, else bench_comm on the
    device's own collectives (``comm_benchmark``)."""
    lat, bw = projection_setting(cfg, "latency_us"), projection_setting(cfg, "bandwidth_GBps")
    out = {"alpha_s": None if lat is None else lat * 1e-6, "bandwidth_Bps": None if bw is None else bw * 1e9,
           "per_kind": {}, "between": {}, "source": "config: projection.latency_us, bandwidth_GBps"}
    if not any(v > 0 for v in comm_by_kind.values()):
        return {**out, "source": "no communication"}
    if lat is not None and bw is not None:
        return out
    cuda = torch.cuda.is_available()
    backend, ranks, what = comm_benchmark(cfg, n, cuda, torch.cuda.device_count() if cuda else 0)
    if backend is None:
        return {**out, "source": what}
    try:
        c = bench_comm.calibration(ranks, measure, backend=backend)
    except Exception as e:  # noqa: BLE001 - no processes here (a sandbox): say so, project no step
        out["source"] = f"collectives could not be measured here ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        return out
    if c is None:
        out["source"] = f"no collective calibration cached for {ranks} {backend} ranks (python -m parallelkit.bench_comm)"
        return out
    given = [k for k, v in (("latency_us", lat), ("bandwidth_GBps", bw)) if v is not None]
    out["alpha_s"] = c["alpha_s"] if lat is None else out["alpha_s"]
    out["bandwidth_Bps"] = c["bandwidth_Bps"] if bw is None else out["bandwidth_Bps"]
    if not given:
        out["per_kind"] = {k: (f["alpha_s"], f["bandwidth_Bps"]) for k, f in c["kinds"].items()}
        out["between"] = {k: [(r["between_s"], r["alpha_s"], r["bandwidth_Bps"]) for r in runs]
                          for k, runs in (c.get("between") or {}).items()}
    out["source"] = (f"{what}, "
                     f"{'per-kind fits' if not given else 'machine fit with config: projection.' + given[0]} "
                     f"({c['measured_at']})")
    return out


OVERLAP_ON_CPU = 0.0  # gloo's threads reduce on the cores the compute runs on: nothing is hidden (measured: see docs)


def exposed(by_kind: dict[str, float], overlap: dict[str, str] | None, fwd: float, bwd: float,
            cpu: bool) -> dict[str, float]:
    """Seconds of each kind the rank waits for: a kind the backend overlaps (``Strategy.overlap``: kind -> the
    compute it runs under, "backward" or "forward+backward") hides up to that compute's time, on a GPU; on CPU
    ``OVERLAP_ON_CPU`` of it."""
    out = {}
    for kind, sec in by_kind.items():
        window = (overlap or {}).get(kind)
        room = {"backward": bwd, "forward+backward": fwd + bwd}.get(window, 0.0)
        hidden = min(sec, room) * (OVERLAP_ON_CPU if cpu else 1.0)
        out[kind] = sec - hidden
    return out


def project(cfg, comm_by_kind: dict[str, float], layout: Layout, measure: bool = True,
            updated_params: int | None = None, overlap: dict[str, str] | None = None,
            micro_batches: int | None = None, framework: bool = True,
            shares: tuple[list[float], int] | None = None, share: float = 1.0,
            calls: dict[str, float] | None = None, held: dict | None = None,
            bursts: dict[str, float] | None = None, wait_gaps: dict | None = None) -> dict:
    """The projected step time of ``cfg`` (a resolved config) on ``layout`` moving ``comm_by_kind`` bytes per rank
    per step (see the module doc), by part, as measure/breakdown.py measures them: forward, backward, optimizer
    (``updated_params``: elements this rank's optimizer updates), exposed communication by kind (``overlap``: the
    backend's rule), and the pipeline's idle time (its bubble at ``micro_batches`` per step, and its p2p).
    ``measure=False``: only cached calibrations; a missing one leaves step_s None. ``framework``: add the backend's
    framework time measured on a narrow copy of the run (framework.py; ``projection.framework=false``: not).
    ``shares``: a pipeline's FLOP share per pipeline rank and chunks per rank (``Strategy.pipeline_shares``): the
    parts are then the slowest stage's, which paces the schedule: it computes its m micro-batches and waits while
    the other stages fill and drain the pipeline, one micro-batch each (per chunk: / v); with equal stages that
    is the classic bubble, (pp-1)/(v·m) of its compute. ``share``: the busiest rank's FLOPs over an even split
    (``Strategy.compute_share``). ``calls``: the collective calls per step by kind (default: those the narrow copy
    counted, scaled to the run's micro-batches; none: a message per ``BUCKET``); with the compute between two
    of them, they set what each call costs (``comm_seconds``). ``held``: how the run holds its model where that
    changes a step's time (``Strategy.proxy_held``): its proxies are held the same way. ``bursts``: the share of a
    kind's calls that follow compute (``Strategy.bursts``). ``wait_gaps``: where a kind's waits sit in a
    micro-batch (``Strategy.wait_gaps``)."""
    c = GPTConfig.from_cfg(cfg.model)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * layout.data_ranks * c.seq_len
    on_cpu = not projection_setting(cfg, "device") and not torch.cuda.is_available()
    flops = c.flops_per_token() * tokens / (layout.processes if on_cpu else layout.world) * share
    device, peak, peak_src = device_peak(cfg, layout, measure)
    eff, eff_src = efficiency(cfg, layout, peak, measure, held)
    compute = flops / (peak * 1e12 * eff) if peak and eff else None
    pipelined = layout.pp > 1 and layout.processes > 1  # one stage per process: the others wait on it
    m, chunks, fill = micro_batches or cfg.train.grad_accum, 1, layout.pp - 1
    if pipelined and shares and compute is not None:  # the slowest stage's rank: the others wait for it
        top = max(shares[0])
        compute *= layout.pp * top
        chunks, fill = shares[1], (1 - top) / top  # it waits while the other stages fill and drain: their time
    fw, fw_src = framework_seconds(cfg, layout, measure) if framework else (None, "left out")
    if calls is None and framework:
        calls = framework_calls(cfg, layout)
    n = group_size(layout)
    ln = link(cfg, comm_by_kind, n, measure)
    by_kind, comm, gap = {}, 0.0, None
    if any(v > 0 for v in comm_by_kind.values()):  # no calibration to be had: no comm time, no step
        linked = ln["bandwidth_Bps"] and ln["alpha_s"] is not None
        w = waits(comm_by_kind, calls, overlap, c.n_layer, m, bursts=bursts)
        gap = None if compute is None else compute / sum(w.values())
        placed = None if compute is None else {k: [(each * m, before * compute / m) for each, before in v]
                                                for k, v in (wait_gaps or {}).items()}
        by_kind = comm_seconds(comm_by_kind, n, ln["alpha_s"], ln["bandwidth_Bps"], ln["per_kind"], calls=calls,
                               between=_run_like(ln["between"], on_cpu, pipelined), gap=gap, waits=w,
                               gaps=placed) if linked else {}
        comm = sum(by_kind.values()) if linked else None
    fwd_share = 1 / 4 if cfg.train.activation_checkpointing else 1 / 3  # recomputation: a second forward
    fwd, bwd = (None, None) if compute is None else (compute * fwd_share, compute * (1 - fwd_share))
    opt, opt_src = optimizer_seconds(cfg, layout, updated_params, measure, peak, held)
    bubble = compute * fill / (chunks * m) if pipelined and compute is not None else 0.0
    exp = exposed({k: v for k, v in by_kind.items() if not (pipelined and k == "send_recv")}, overlap,
                  fwd or 0.0, bwd or 0.0, on_cpu)
    if fw is not None and (over := framework_overcharge(cfg, layout)) and sum(exp.values()) > 0:
        keep = max(0.0, 1 - over / sum(exp.values()))  # what the narrow copy showed its waits charged over
        exp = {k: v * keep for k, v in exp.items()}
    idle = bubble + (by_kind.get("send_recv", 0.0) if pipelined else 0.0)
    parts = {"forward": fwd, "backward": bwd, "optimizer": opt,
             "exposed_comm": None if comm is None else sum(exp.values()), "pipeline_idle": idle, "framework": fw}
    step = None if compute is None or comm is None else sum(v or 0.0 for v in parts.values())
    assumptions = (f"a model, not a measurement: {device} at {_g(peak)} TFLOP/s x efficiency {_g(eff)}; "
                   f"alpha {_g(ln['alpha_s'], 1e6)} us, B {_g(ln['bandwidth_Bps'], 1e-9)} GB/s"
                   f"{' (per-kind fits)' if ln['per_kind'] else ''}, ring/tree costs on {n} ranks, a latency per "
                   f"{'call (counted on the narrow copy)' if calls else str(BUCKET // 2**20) + ' MiB message'}"
                   f"{f', each wait for a peer as a run makes it, after {gap * 1e3:.1f} ms of compute' if gap is not None and ln['between'] and on_cpu else ''}"
                   f"{' on average, each where the backend places it' if wait_gaps and gap is not None and ln['between'] and on_cpu else ''}; "
                   f"{'no overlap on CPU (gloo shares the cores)' if on_cpu else 'no overlap' if not overlap else 'overlap: ' + ', '.join(f'{k} under {v}' for k, v in overlap.items())}; "
                   f"{'the slowest stage computes, and waits while the others fill and drain; ' if pipelined else ''}"
                   f"optimizer: {opt_src}; "
                   f"framework time: {fw_src}")
    return {"compute_s": compute, "comm_s": comm, "step_s": step, "parts_s": parts, "exposed_s_by_kind": exp,
            "bubble_s": bubble, "optimizer_s": opt, "framework_s": fw,
            "device": device, "peak_tflops": peak, "efficiency": eff, "alpha_s": ln["alpha_s"],
            "bandwidth_Bps": ln["bandwidth_Bps"], "flops_per_device": flops, "group_size": n,
            "comm_s_by_kind": by_kind, "calls": calls, "compute_between_calls_s": gap, "source": f"peak: {peak_src}; efficiency: {eff_src}; comm: {ln['source']}",
            "assumptions": assumptions}


def project_plan(plan, comm_by_kind: dict[str, float], parts: dict | None = None, measure: bool = True,
                 framework: bool = True, calls: dict[str, float] | None = None) -> dict:
    """``project`` with what the plan knows: the backend's overlap rule, the elements each rank updates, a
    pipeline's stages and the work a rank repeats (``Strategy.compute_share``)."""
    updated = plan.cls.optimizer_elements(plan.cfg, plan.opts, parts) if parts else None
    return project(plan.cfg, comm_by_kind, plan.layout, measure, updated,
                   plan.cls.overlap(plan.cfg, plan.opts), framework=framework,
                   shares=plan.cls.pipeline_shares(plan.cfg, plan.opts, plan.layout),
                   share=plan.cls.compute_share(plan.cfg, plan.opts, plan.layout), calls=calls,
                   held=plan.cls.proxy_held(plan.cfg, plan.opts, plan.layout),
                   bursts=plan.cls.bursts(plan.cfg, plan.opts, plan.layout),
                   wait_gaps=plan.cls.wait_gaps(plan.cfg, plan.opts, plan.layout))


def framework_seconds(cfg, layout: Layout, measure: bool = True) -> tuple[float | None, str]:
    """The backend's framework time per step (framework.py), unless ``projection.framework=false``."""
    from parallelkit.advisor import framework

    if OmegaConf.select(cfg, "projection.framework") is False:
        return None, "not projected (projection.framework=false)"
    if projection_setting(cfg, "device"):
        return None, "not projected for a named device (it would be measured on this machine)"
    if cfg.get("world_size") is None:
        return None, "not projected (no world size yet)"
    return framework.seconds(cfg, layout.processes, measure, project_plan)


def framework_overcharge(cfg, layout: Layout) -> float:
    """Seconds of collective waits the projection charges this run beyond what its narrow copy showed they take
    (framework.py's ``overcharge``), once its framework time is projected."""
    from parallelkit.advisor import framework

    return framework.overcharge(cfg, layout.processes)


def framework_calls(cfg, layout: Layout) -> dict[str, float] | None:
    """The collective calls per step by kind that the run's narrow copy counted (framework.py), if it was measured."""
    from parallelkit.advisor import framework

    if OmegaConf.select(cfg, "projection.framework") is False or projection_setting(cfg, "device"):
        return None
    if cfg.get("world_size") is None or framework.narrow(cfg) is None:
        return None
    return framework.calls(cfg, layout.processes)


def _g(v: float | None, scale: float = 1.0) -> str:
    return "?" if v is None else f"{v * scale:.3g}"
