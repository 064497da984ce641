"""The one training loop, run by every worker process whatever the strategy.

``python -m parallelkit.train RUN_DIR`` is what the launcher starts under torch's elastic
agent; ``run.py`` calls ``worker`` directly when the user's own torchrun started us.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf

from . import metrics
from .config import strategy_class
from .data import Batches, make_dataset
from .model import GPTConfig, build_model
from .results import base_summary, one_line, write_json
from .strategies.base import Context, Strategy


def lr_at(step: int, optim, total_steps: int) -> float:
    """Linear warmup over optim.warmup_steps, then cosine decay to lr * min_lr_ratio."""
    warm = optim.warmup_steps
    if step < warm:
        return optim.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total_steps - warm)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases, LayerNorms or position tables (GPT-2/nanoGPT practice)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "pos" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_kwargs(optim) -> dict:
    return {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def make_optimizer(optim, model_or_groups) -> torch.optim.Optimizer:
    groups = (param_groups(model_or_groups, optim.weight_decay) if isinstance(model_or_groups, torch.nn.Module)
              else model_or_groups)
    return torch.optim.AdamW(groups, **optimizer_kwargs(optim))


def init_distributed() -> Context:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(metrics.cpu_threads(local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(cfg=None, rank=rank, world_size=world, local_rank=local_rank, device=device)


def gather(values: list[float], device: torch.device) -> list[list[float]]:
    """All ranks' small float vectors, rank by rank (float64 keeps byte counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


class Progress:
    """A tqdm bar on a terminal; a line every ~10% of the steps in a log file."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.bar = total, label, enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, loss: float, tps: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(1)
        elif (step + 1) % max(1, self.total // 10) == 0 or step + 1 == self.total:
            print(f"[{self.label}] step {step + 1}/{self.total} loss {loss:.4f} tokens/s {tps:,.0f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg, ctx: Context, run_dir: Path, summary: dict) -> dict:
    cls = strategy_class(cfg)
    layout = cls.layout(cfg)
    strategy: Strategy = instantiate(cfg.strategy, _recursive_=False, _convert_="all")
    ctx.cfg, ctx.precision = cfg, cfg.train.precision
    ctx.extra.setdefault("run_dir", run_dir)  # strategies may write files beside the summary (e.g. DeepSpeed's config)
    ctx.comm = metrics.CommCounter().install()
    summary["device"] = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    from .noise import RunProbe  # measure (issue 10): calibrated peak and precision warning now, noise fields at the end

    probe = RunProbe(cfg, ctx.device, ctx.precision, verbose=ctx.rank == 0)
    peak = probe.peak

    model_factory = lambda: build_model(cfg.model, cfg.seed, cfg.train.activation_checkpointing)  # noqa: E731 - same weights on every rank
    strategy.setup(ctx, model_factory, lambda m: make_optimizer(cfg.optim, m))
    dataset = make_dataset(cfg.data, cfg.model, cfg.seed)
    dp_size = layout.get("virtual_dp", layout["dp"])
    batches = [Batches(dataset, cfg.train.micro_batch_size, cfg.train.grad_accum, dp_size, r)
               for r in strategy.dp_ranks_per_process()]

    start = 0
    if cfg.checkpoint.resume:
        start = strategy.load(Path(cfg.checkpoint.resume))
    steps, warm = cfg.train.steps, cfg.train.warmup_steps
    gcfg = GPTConfig.from_cfg(cfg.model)
    tokens_per_step = summary["tokens_per_step"]
    rank0 = ctx.rank == 0
    mfile = open(run_dir / "metrics.jsonl", "a" if start else "w") if rank0 else None
    progress = Progress(steps - start, summary["label"], rank0)
    times, losses = [], []
    ctx.comm.active = False
    metrics.reset_peak_memory(ctx.device)
    for step in range(start, steps):
        if step == start + warm:  # timing, memory and communication count from here on
            metrics.reset_peak_memory(ctx.device)
            ctx.comm.bytes, ctx.comm.active = 0, ctx.world_size > 1  # one process: collectives move nothing
        micro = [b.micro_batch(step, m) for m in range(cfg.train.grad_accum) for b in batches]
        strategy.set_lr(lr := lr_at(step, cfg.optim, steps))
        t0 = time.perf_counter()
        loss = strategy.train_step(micro, cfg.train.grad_clip)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        dt = time.perf_counter() - t0
        with ctx.comm.paused():
            mem = next(iter(metrics.peak_memory(ctx.device).values()))
            rows = gather([float(loss), mem], ctx.device)
        step_loss = sum(r[0] for r in rows) / len(rows)
        if step >= start + warm:
            times.append(dt)
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {step}: lower optim.lr or use train.precision=fp32")
        if rank0:
            rec = {"step": step, "loss": step_loss, "lr": lr, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                   "peak_mem_bytes": int(max(r[1] for r in rows))}
            mfile.write(json.dumps(rec) + "\n")
            mfile.flush()
        progress.update(step - start, step_loss, tokens_per_step / dt)
        if cfg.checkpoint.dir and cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
            with ctx.comm.paused():
                strategy.save(Path(cfg.checkpoint.dir) / f"step_{step + 1}", step + 1)
    progress.close()
    comm = ctx.comm.bytes / max(1, len(times))
    ctx.comm.active = False
    state = strategy.state_tensors()
    breakdown = {k: metrics.tensor_bytes(v) for k, v in state.items()}
    mem = metrics.peak_memory(ctx.device)
    rows = gather([metrics.tensor_bytes(t for v in state.values() for t in v), comm, peak,
                   *(breakdown[k] for k in ("params", "grads", "optimizer")), *mem.values()], ctx.device)
    if mfile:
        mfile.close()
    step_time = statistics.median(times)
    tps = tokens_per_step / step_time
    peak_dev = statistics.mean(r[2] for r in rows)
    tflops = gcfg.flops_per_token() * tps / layout["world"] / 1e12
    summary.update({
        "status": "ok", "timed_steps": len(times), "tokens_per_s": tps, "step_time_s": step_time,
        "tflops": tflops, "peak_tflops": peak_dev, "mfu": tflops / peak_dev if peak_dev else None,
        "peak_mem_bytes": [int(r[6]) for r in rows], "peak_mem_kind": "cuda_max_allocated" if ctx.device.type == "cuda" else "cpu_peak_rss",
        "model_state_bytes": [int(r[0]) for r in rows],
        "model_state_breakdown": [{"params": int(r[3]), "grads": int(r[4]), "optimizer": int(r[5])} for r in rows],
        "comm_bytes_per_step": [int(r[1]) for r in rows], "losses": losses, "final_loss": losses[-1],
        "strategy_facts": strategy.describe(), "one_process": cls.one_process,
    })
    summary.update(probe.finish(times, tflops, peak_dev))  # measure (issue 10): step times, spread, drift, host, MFU <= 1
    if ctx.device.type == "cuda":
        summary["peak_reserved_bytes"] = [int(r[7]) for r in rows]
    if cfg.checkpoint.dir and cfg.checkpoint.get("save_final", False):
        strategy.save(Path(cfg.checkpoint.dir) / f"step_{steps}", steps)
    strategy.teardown()
    ctx.comm.uninstall()
    return summary


def worker(cfg, run_dir: Path) -> int:
    """Run one rank. Returns the exit code; the summary is written by rank 0 in any case."""
    run_dir = Path(run_dir)
    summary = base_summary(cfg)
    ctx = None
    try:
        ctx = init_distributed()
        summary = train(cfg, ctx, run_dir, summary)
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status and one line
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        summary.update(status="oom" if oom else "failed", error=one_line(e))
        rank = ctx.rank if ctx else int(os.environ.get("RANK", 0))
        (run_dir / "errors").mkdir(exist_ok=True)
        (run_dir / "errors" / f"rank{rank}.txt").write_text(summary["error"] + "\n")
        print(f"parallelkit: rank {rank}: {summary['error']}", file=sys.stderr, flush=True)
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
    run_dir = Path(sys.argv[1])
    cfg = OmegaConf.load(run_dir / "config.yaml")
    code = worker(cfg, run_dir)
    # The results are written and the process group is gone. Skip the interpreter's teardown:
    # backend threads (gloo, DeepSpeed, FairScale) can abort it after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
