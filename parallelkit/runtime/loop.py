"""The one training loop, run by every worker process whatever the strategy.

``python -m parallelkit.runtime.loop RUN_DIR`` is what the launcher starts, once per rank;
``run.py`` calls ``worker`` directly when the user's own torchrun started us.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import parallelkit.checkpoint.format as checkpoint
import parallelkit.measure.breakdown as breakdown
import parallelkit.measure.metrics as metrics
from parallelkit.config.layout import Layout
from parallelkit.config.plan import RunPlan
from parallelkit.data.datasets import Batches, make_dataset
from parallelkit.measure.board import Board
from parallelkit.measure.collective import gather_named, max_over_ranks
from parallelkit.measure.noise import RunProbe
from parallelkit.measure.progress import Progress
from parallelkit.measure.results import Summary, base_summary, one_line
from parallelkit.models.gpt import build_model
from parallelkit.runtime.processes import INIT_METHOD
from parallelkit.runtime.procs import die_with_parent
from parallelkit.strategies.base import Context, Strategy
from parallelkit.strategies.shared.optim import lr_at
from parallelkit.util.jsonio import write_json
from parallelkit.util.tensors import tensor_bytes


def init_distributed(layout: Layout) -> Context:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(metrics.cpu_threads(local_world))
    if not dist.is_initialized():  # env:// under torchrun; a file store under runtime.processes.spawn
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                init_method=os.environ.get(INIT_METHOD))
    return Context(rank=rank, world_size=world, local_rank=local_rank, device=device, layout=layout)


def make_strategy(plan: RunPlan, ctx: Context, run_dir: Path | None) -> Strategy:
    """The planned strategy, set up on this rank: model built, wrapped, optimizer made (glibc's mmap threshold is
    set first, before the model is built)."""
    cfg, t = plan.cfg, plan.cfg.train
    ctx.malloc = metrics.fix_mmap_threshold(t.get("cpu_mmap_threshold"))
    ctx.precision, ctx.seed, ctx.optim, ctx.train, ctx.cfg = t.precision, cfg.seed, cfg.optim, t, cfg
    ctx.model, ctx.run_dir, ctx.instrument = plan.model, run_dir, bool(t.get("instrument", False))
    strategy: Strategy = plan.cls(plan.opts)
    strategy.setup(ctx, functools.partial(build_model, cfg.model, cfg.seed, t.activation_checkpointing))
    return strategy


@dataclass
class Steps:
    """What the steps of one run measured."""

    losses: list[float]
    times: list[float]  # the timed steps' wall times
    kinds: dict  # communication by kind, per step
    measured_on: str
    peak: dict  # this rank's memory peak over the timed steps, checkpoint saves left out
    save_peak: dict  # this rank's peak while saving checkpoints in that window ({} when none was saved)
    live_peak: int | None = None  # CPU: the live heap's peak on the probe step (malloc's bytes in use)
    breakdown: dict | None = None  # measure/breakdown.py: the profiled untimed step's parts


def run_steps(strategy: Strategy, plan: RunPlan, start: int, run_dir: Path | None, label: str = "") -> Steps:
    """Steps ``start`` .. ``train.steps`` - 1: the global batch of each, the schedule's lr, a checkpoint every
    ``checkpoint.every`` steps; rank 0 appends each step to metrics.jsonl (with a run_dir)."""
    cfg = plan.cfg
    ctx, t, layout = strategy.ctx, cfg.train, plan.layout
    mine = strategy.data_ranks()  # the data-parallel ranks whose micro-batches this process runs
    dataset = make_dataset(cfg.data, cfg.model, cfg.seed)
    batches = [Batches(dataset, t.micro_batch_size, t.grad_accum, layout.data_ranks, r) for r in mine]
    steps = t.steps
    untimed = min(t.untimed_steps, max(0, steps - start - 1))  # at least one timed step (config.py says so first)
    probe = start + untimed - 1 if untimed else start  # the last untimed step counts communication
    # the step whose time is broken down (torch.profiler): untimed, not the first (warm-up), and not the probe (its
    # counter and heap sampler) when there are three or more untimed steps; none with fewer than two
    profiled = (probe - 1 if untimed >= 3 else probe) if untimed >= 2 and t.get("breakdown", True) else None
    bd = None
    tokens_per_step = t.micro_batch_size * t.grad_accum * layout.data_ranks * cfg.model.seq_len
    rank0 = ctx.rank == 0
    mfile = open(run_dir / "metrics.jsonl", "a" if start else "w") if rank0 and run_dir else None
    progress = Progress(steps - start, label, rank0 and run_dir is not None)
    board = Board(run_dir, rank0 and run_dir is not None and t.get("tensorboard", True))
    counter, probe_kinds = metrics.CommCounter(), {}
    times, losses, live_peak = [], [], None
    window = metrics.PeakWindow(ctx.device)
    window.start()
    for step in range(start, steps):
        timed = step >= start + untimed
        if step == start + untimed:  # timing and the memory peak count from here on
            window.start()
        counting = timed if ctx.instrument else step == probe
        strategy.measuring = counting
        prof = breakdown.Profiled(ctx.device) if step == profiled else contextlib.nullcontext()
        with prof:  # the profiled step only: the batch fetch and the step, for its breakdown
            with breakdown.marker(breakdown.DATA):
                micro = [b.micro_batch(step, m) for m in range(t.grad_accum) for b in batches]
            strategy.set_lr(lr := lr_at(step, cfg.optim, steps))
            if counting:
                counter.install()
            live = metrics.LivePeak() if step == probe and ctx.device.type == "cpu" else contextlib.nullcontext()
            t0 = time.perf_counter()
            with live, breakdown.marker(breakdown.STEP):  # live: the probe step's heap peak, sampled
                loss = strategy.train_step(micro, t.grad_clip)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            dt = time.perf_counter() - t0
        if step == profiled:
            bd = prof.result(pipeline=layout.pp > 1 and layout.processes > 1)
            if t.get("breakdown") == "trace" and run_dir:
                bd = {**(bd or {}), "trace": prof.export(run_dir / f"trace_rank{ctx.rank}.json")}
            if bd and "error" not in bd:
                bd.update(step=step, step_s=dt)
        if step == probe:
            live_peak = getattr(live, "peak", None)
        counter.uninstall()
        if counting:
            for kind, (calls, nbytes) in strategy.probe_comm().items():
                counter.add(kind, nbytes, calls)
        if counting and not ctx.instrument:
            probe_kinds = counter.by_kind()
        strategy.measuring = False
        step_loss = strategy.global_loss(loss)
        mem = max_over_ranks(next(iter(metrics.peak_memory(ctx.device).values())), ctx.device)
        if timed:
            times.append(dt)
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step}: lower optim.lr or use train.precision=fp32")
        if mfile:
            rec = {"step": step, "loss": step_loss, "lr": lr, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                   "peak_mem_bytes": int(mem)}
            mfile.write(json.dumps(rec) + "\n")
            mfile.flush()
        progress.update(step - start, step_loss, tokens_per_step / dt)
        comm = sum(v["bytes"] for v in probe_kinds.values()) if probe_kinds else None  # counted on the probe step
        board.scalars(step, {"train/loss": step_loss, "train/lr": lr, "speed/tokens_per_s": tokens_per_step / dt,
                             "speed/step_time_s": dt, "memory/peak_bytes_max_rank": mem,
                             "comm/bytes_per_step_rank0": comm if layout.processes > 1 else 0})
        if cfg.checkpoint.dir and cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
            window.before_save()  # a save's full-state gather is not the training peak: measured apart
            checkpoint.save(strategy, cfg, step + 1)
            window.after_save()
    peak, save_peak = window.finish()
    progress.close()
    board.close()
    if mfile:
        mfile.close()
    if ctx.instrument:  # the mean over the timed steps
        n = max(1, len(times))
        kinds = {k: {"calls": v["calls"] / n, "bytes": v["bytes"] / n} for k, v in counter.by_kind().items()}
        measured_on = f"every timed step (train.instrument=true; mean of {n})"
    else:
        kinds = probe_kinds
        measured_on = f"step {probe + 1} ({'untimed probe step' if untimed else 'the first step, also timed: train.untimed_steps=0'})"
    if layout.processes == 1:  # one process: collectives move nothing
        kinds = {}
    return Steps(losses, times, kinds, measured_on, peak, save_peak, live_peak, bd)


def train(plan: RunPlan, ctx: Context, run_dir: Path, summary: Summary) -> Summary:
    cfg, layout = plan.cfg, plan.layout
    summary.device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    strategy = make_strategy(plan, ctx, run_dir)
    summary.cpu_malloc = ctx.malloc
    run_probe = RunProbe(cfg, ctx.device, cfg.train.precision, verbose=ctx.rank == 0)  # calibrated peak; precision warning
    peak = run_probe.peak
    start = checkpoint.load(strategy, Path(cfg.checkpoint.resume)) if cfg.checkpoint.resume else 0
    done = run_steps(strategy, plan, start, run_dir, summary.label)
    times, losses, kinds, steps = done.times, done.losses, done.kinds, cfg.train.steps
    tokens_per_step = summary.tokens_per_step
    state = strategy.state_tensors()
    mine = {"breakdown": {k: tensor_bytes(v) for k, v in state.items()},
            "state": tensor_bytes(x for v in state.values() for x in v),
            "comm": sum(v["bytes"] for v in kinds.values()), "kinds": kinds, "peak": peak,
            "mem": done.peak, "save_mem": done.save_peak, "live": done.live_peak, "time_parts": done.breakdown}
    ranks = gather_named(mine)
    step_time = statistics.median(times)
    tps = tokens_per_step / step_time
    peak_dev = statistics.mean(r["peak"] for r in ranks)
    # per device that does the work: a GPU each; on a CPU a process each (one process driving several pipeline
    # "devices" does all their work on its own threads), as the projection divides
    workers = layout.world if ctx.device.type == "cuda" else layout.processes
    tflops = ctx.model.flops_per_token() * tps / workers / 1e12
    summary.update(
        status="ok", timed_steps=len(times), tokens_per_s=tps, step_time_s=step_time, step_times_s=times,
        tflops=tflops, peak_tflops=peak_dev, mfu=tflops / peak_dev if peak_dev else None,
        peak_mem_bytes=[int(next(iter(r["mem"].values()))) for r in ranks],
        peak_mem_kind="cuda_max_allocated" if ctx.device.type == "cuda" else "cpu_peak_rss",
        model_state_bytes=[int(r["state"]) for r in ranks],
        model_state_breakdown=[{k: int(v) for k, v in r["breakdown"].items()} for r in ranks],
        comm_bytes_per_step=[int(r["comm"]) for r in ranks], comm_by_kind=[r["kinds"] for r in ranks],
        save_peak_mem_bytes=[int(next(iter(r["save_mem"].values()))) for r in ranks] if ranks[0]["save_mem"] else None,
        live_peak_mem_bytes=[r["live"] for r in ranks] if all(r["live"] for r in ranks) else None,
        step_breakdown=[r["time_parts"] for r in ranks] if any(r["time_parts"] for r in ranks) else None,
        measured_on=done.measured_on, losses=losses, final_loss=losses[-1], first_step=start,
        strategy_facts=strategy.describe())
    summary.step_why = breakdown.top_parts({"step_breakdown": summary.step_breakdown, "step_time_s": step_time})
    summary.update(**run_probe.finish(times, tflops, peak_dev))  # step-time spread, drift, host; MFU and its check
    if ctx.device.type == "cuda":
        summary.peak_reserved_bytes = [int(r["mem"]["reserved"]) for r in ranks]
    if cfg.checkpoint.dir and cfg.checkpoint.get("save_final", False):
        checkpoint.save(strategy, cfg, steps)
    strategy.teardown()
    return summary


def worker(plan: RunPlan, run_dir: Path) -> int:
    """Run one rank of ``plan``. Returns the exit code; the summary is written by rank 0 in any case."""
    run_dir = Path(run_dir)
    ctx, summary = None, None
    try:
        ctx = init_distributed(plan.layout)
        summary = train(plan, ctx, run_dir, summary := base_summary(plan))  # train fills in the base summary
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status and one line
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        summary = summary or base_summary(plan)  # none yet when init_distributed failed
        summary.update(status="oom" if oom else "failed", error=one_line(e))
        rank = ctx.rank if ctx else int(os.environ.get("RANK", 0))
        (run_dir / "errors").mkdir(exist_ok=True)
        (run_dir / "errors" / f"rank{rank}.txt").write_text(summary.error + "\n")
        print(f"parallelkit: rank {rank}: {summary.error}", file=sys.stderr, flush=True)
        if not isinstance(e, Exception):
            raise
        import traceback

        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        write_json(run_dir / "summary.json", summary)
    return code


def main() -> None:
    die_with_parent()
    run_dir = Path(sys.argv[1])
    try:
        plan = RunPlan.load(run_dir)
    except Exception as e:  # noqa: BLE001 - e.g. the backend's library missing in this worker's environment
        rank = int(os.environ.get("RANK", 0))
        (run_dir / "errors").mkdir(exist_ok=True)
        (run_dir / "errors" / f"rank{rank}.txt").write_text(one_line(e) + "\n")
        print(f"parallelkit: rank {rank}: {one_line(e)}", file=sys.stderr, flush=True)
        os._exit(1)
    code = worker(plan, run_dir)
    # The results are written and the process group is gone. Skip the interpreter's teardown:
    # backend threads (gloo, DeepSpeed, FairScale) can abort it after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
