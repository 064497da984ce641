"""Hand-written training loops, one per data-parallel backend: the baseline parallelkit is timed against.

Each ``loop_*`` function is the plainest correct code a user would write for that backend:
the same GPT (``build_model``, same seed), the same data (``Batches``, same global batch),
torch AdamW with the same hyper-parameters and decay groups, clipping the way the backend
needs it, the same warmup + cosine schedule. Only parallelkit's model and data modules are
imported; everything a strategy or the training loop would do is written out here, so the
difference in step time is what parallelkit's wrapping costs.

Timing is parallelkit's: ``perf_counter`` around the step (zero_grad, forward, backward,
clip, optimizer step), the median over the steps after the warm-up. Loading the batch,
setting the lr and averaging the loss over ranks stay outside the timed region, as there.

    python -m torch.distributed.run --standalone --nproc-per-node=2 experiments/bare_loops.py SPEC.json OUT.json

CPU and gloo only, fp32, no gradient accumulation: the setting the harness benchmark runs in.

SPEC.json is written by ``bench_harness.py`` from the composed parallelkit config:
``strategy``, ``model``, ``data``, ``optim``, ``seed``, ``world_size``, ``steps``,
``untimed_steps``, ``micro_batch_size``, ``grad_clip``, and for DeepSpeed ``ds_config``: the
config parallelkit generates for the run (``ds_config`` below writes one when it is missing).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from parallelkit.data.datasets import Batches, make_dataset  # noqa: E402
from parallelkit.models.gpt import build_model  # noqa: E402

Micro = list[tuple[torch.Tensor, torch.Tensor]]
Step = Callable[[Micro], torch.Tensor]


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases, LayerNorms or position tables (nanoGPT's split)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "pos" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(o: dict) -> dict:
    return {"lr": o["lr"], "betas": tuple(o["betas"]), "eps": o["eps"], "weight_decay": o["weight_decay"]}


def lr_at(step: int, o: dict, total: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < o["warmup_steps"]:
        return o["lr"] * (step + 1) / o["warmup_steps"]
    frac = (step - o["warmup_steps"]) / max(1, total - o["warmup_steps"])
    return o["lr"] * (o["min_lr_ratio"] + (1 - o["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---- one function per backend: build, then the step ----

def loop_single(spec: dict, model: nn.Module) -> tuple[Step, torch.optim.Optimizer]:
    """One process running every rank's micro-batch: gradients accumulate over them."""
    opt = torch.optim.AdamW(param_groups(model, spec["optim"]["weight_decay"]), **adamw_kwargs(spec["optim"]))

    def step(micro: Micro) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in micro:
            loss = lm_loss(model(x), y)
            (loss / len(micro)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        return total / len(micro)

    return step, opt


def loop_ddp(spec: dict, model: nn.Module) -> tuple[Step, torch.optim.Optimizer]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)  # default buckets (25 MB), parallelkit's setting too
    opt = torch.optim.AdamW(param_groups(model, spec["optim"]["weight_decay"]), **adamw_kwargs(spec["optim"]))

    def step(micro: Micro) -> torch.Tensor:
        (x, y), = micro
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), spec["grad_clip"])
        opt.step()
        return loss.detach()

    return step, opt


def loop_fsdp(spec: dict, model: nn.Module, reshard_after_forward: bool) -> tuple[Step, torch.optim.Optimizer]:
    """FSDP2: every block its own unit, the root holds embeddings, tied head and final LayerNorm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the root: backward needs the head first
    opt = torch.optim.AdamW(param_groups(model, spec["optim"]["weight_decay"]), **adamw_kwargs(spec["optim"]))

    def step(micro: Micro) -> torch.Tensor:
        (x, y), = micro
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])  # DTensor grads: the global norm
        opt.step()
        return loss.detach()

    return step, opt


def ds_config(spec: dict, stage: int, n: int) -> dict:
    """A DeepSpeed config for this run when the spec brings none (the harness passes the one parallelkit
    generates): buckets a tenth of the model, at least d_model^2, even (DeepSpeed asserts it)."""
    d, world, mb = spec["model"]["d_model"], spec["world_size"], spec["micro_batch_size"]
    bucket = max(d * d, n // 10) // 2 * 2
    zero = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "contiguous_gradients": True, "overlap_comm": stage == 3}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=10 * d,
                    stage3_max_live_parameters=10 * bucket, stage3_max_reuse_distance=10 * bucket, sub_group_size=10 * bucket)
    return {"train_batch_size": mb * world, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": 1,
            "gradient_clipping": float(spec["grad_clip"]), "steps_per_print": 2**31 - 1,
            "zero_allow_untested_optimizer": True, "zero_optimization": zero}


def loop_deepspeed(spec: dict, model: nn.Module, stage: int) -> tuple[Step, torch.optim.Optimizer]:
    """torch AdamW handed to deepspeed.initialize; the engine clips (gradient_clipping) and steps."""
    import logging
    import warnings

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed 0.19 calls renamed torch collectives
    if spec.get("ds_config", {}).get("zero_optimization", {}).get("stage") != stage:
        spec["ds_config"] = ds_config(spec, stage, sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(param_groups(model, spec["optim"]["weight_decay"]), **adamw_kwargs(spec["optim"]))
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=spec["ds_config"])

    def step(micro: Micro) -> torch.Tensor:
        (x, y), = micro
        loss = lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, opt


def loop_oss(spec: dict, model: nn.Module, sharded_ddp: bool) -> tuple[Step, torch.optim.Optimizer]:
    """FairScale OSS (optimizer state sharded) under ShardedDDP, or under torch DDP."""
    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim import OSS
    from torch.nn.parallel import DistributedDataParallel as DDP

    opt = OSS(param_groups(model, spec["optim"]["weight_decay"]), optim=torch.optim.AdamW, **adamw_kwargs(spec["optim"]))
    # reduce_buffer_size=0: no buckets, each gradient goes to its owner rank only (parallelkit's setting)
    wrapped = ShardedDataParallel(model, opt, reduce_buffer_size=0) if sharded_ddp else DDP(model)

    def step(micro: Micro) -> torch.Tensor:
        (x, y), = micro
        wrapped.zero_grad(set_to_none=True)
        loss = lm_loss(wrapped(x), y)
        loss.backward()
        opt.clip_grad_norm(spec["grad_clip"])  # a rank holds only its shard's gradients: OSS computes the global norm
        opt.step()
        return loss.detach()

    return step, opt


LOOPS: dict[str, Callable[[dict, nn.Module], tuple[Step, torch.optim.Optimizer]]] = {
    "single": loop_single,
    "ddp": loop_ddp,
    "fsdp": lambda s, m: loop_fsdp(s, m, reshard_after_forward=True),
    "fsdp_zero3": lambda s, m: loop_fsdp(s, m, reshard_after_forward=True),
    "fsdp_zero2": lambda s, m: loop_fsdp(s, m, reshard_after_forward=False),
    "zero0": lambda s, m: loop_deepspeed(s, m, 0),
    "zero1": lambda s, m: loop_deepspeed(s, m, 1),
    "zero2": lambda s, m: loop_deepspeed(s, m, 2),
    "zero3": lambda s, m: loop_deepspeed(s, m, 3),
    "fairscale_oss": lambda s, m: loop_oss(s, m, sharded_ddp=True),
    "fairscale_oss_ddp": lambda s, m: loop_oss(s, m, sharded_ddp=False),
}


def run(spec: dict) -> dict:
    """Train ``spec["steps"]`` steps; return the step times and rank-averaged losses."""
    name, world = spec["strategy"], spec["world_size"]
    distributed = name != "single"
    if distributed:
        dist.init_process_group("gloo")
        assert dist.get_world_size() == world, f"{name}: started {dist.get_world_size()} processes, spec says {world}"
    rank = dist.get_rank() if distributed else 0
    model = build_model(OmegaConf.create(spec["model"]), spec["seed"])
    dataset = make_dataset(OmegaConf.create(spec["data"]), OmegaConf.create(spec["model"]), spec["seed"])
    mb = spec["micro_batch_size"]
    batches = [Batches(dataset, mb, 1, world, r) for r in (range(world) if not distributed else [rank])]
    step, opt = LOOPS[name](spec, model)

    times, losses = [], []
    for s in range(spec["steps"]):
        micro = [b.micro_batch(s, 0) for b in batches]
        for g in opt.param_groups:
            g["lr"] = lr_at(s, spec["optim"], spec["steps"])
        t0 = time.perf_counter()
        loss = step(micro)
        dt = time.perf_counter() - t0
        if distributed:  # the global batch's loss, averaged in float64 as parallelkit logs it
            dist.all_reduce(loss := loss.double(), op=dist.ReduceOp.SUM)
            loss /= world
        losses.append(float(loss))
        if s >= spec["untimed_steps"]:
            times.append(dt)
    out = {"strategy": name, "status": "ok", "step_time_s": statistics.median(times), "step_times_s": times,
           "losses": losses, "threads": torch.get_num_threads(), "processes": world if distributed else 1}
    if "ds_config" in spec:
        out["ds_config"] = spec["ds_config"]
    if distributed:
        dist.barrier()
        dist.destroy_process_group()  # FairScale aborts at exit without it
    return out if rank == 0 else {}


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    out = run(json.loads(Path(spec_path).read_text()))
    if out:
        Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results are written; backend threads (gloo, DeepSpeed) can abort a normal interpreter teardown


if __name__ == "__main__":
    main()
