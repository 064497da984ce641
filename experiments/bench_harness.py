"""Benchmark, not a test: `single` vs `ddp` side by side, and what the harness itself costs.

    python experiments/bench_harness.py [--model small] [--steps 12] [--rounds 3] [--out results/harness]

1. Runs ``strategy=single`` and ``strategy=ddp`` through the real CLI on the same model and
   global batch, and prints tokens/s, MFU and memory side by side.
2. Harness overhead: in one process, alternately runs a bare PyTorch loop (model, AdamW,
   forward/backward/clip/step, the same data) and parallelkit's own loop (``train.train``
   with ``strategy=single``) on the same model and batch, ``--rounds`` times each, and prints
   the ratio of their median wall time per step (target: the harness costs under 2%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cli_runs(args) -> list[dict]:
    rows = []
    for strat in ("single", "ddp"):
        out = Path(args.out) / "runs" / strat
        cmd = [sys.executable, "-m", "parallelkit.run", f"strategy={strat}", f"model={args.model}",
               f"train.steps={args.steps}", "train.warmup_steps=2", f"train.micro_batch_size={args.micro}",
               "world_size=2", f"hydra.run.dir={out}"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        rows.append(json.loads((out / "summary.json").read_text()))
    return rows


def bare_loop(cfg, steps: int) -> float:
    """Seconds per step (median after warm-up) of the plainest loop we can write."""
    import torch

    from parallelkit.data import Batches, make_dataset
    from parallelkit.model import build_model, lm_loss
    from parallelkit.train import lr_at, make_optimizer

    model = build_model(cfg.model, cfg.seed)
    opt = make_optimizer(cfg.optim, model)
    ds = make_dataset(cfg.data, cfg.model, cfg.seed)
    ranks = [Batches(ds, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.world_size, r) for r in range(cfg.world_size)]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        micro = [b.micro_batch(step, m) for m in range(cfg.train.grad_accum) for b in ranks]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, steps)
        opt.zero_grad(set_to_none=True)
        for x, y in micro:
            (lm_loss(model(x), y) / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[cfg.train.warmup_steps:])


def harness_loop(cfg, steps: int) -> float:
    """Seconds per step of parallelkit's loop, wall clock between steps (data, metrics, files included)."""
    from parallelkit import train as T
    from parallelkit.results import base_summary

    stamps: list[float] = []
    orig = T.Progress.update

    def stamp(self, *a):  # called once at the end of every step
        stamps.append(time.perf_counter())
        return orig(self, *a)

    T.Progress.update = stamp
    try:
        with tempfile.TemporaryDirectory() as d:
            ctx = T.init_distributed()
            summary = base_summary(cfg)
            t0 = time.perf_counter()
            T.train(cfg, ctx, Path(d), summary)
    finally:
        T.Progress.update = orig
    gaps = [b - a for a, b in zip([t0, *stamps], stamps)]
    return statistics.median(gaps[cfg.train.warmup_steps:])


def overhead(args) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "strategy=single", f"train.steps={args.steps}",
                                           "train.warmup_steps=2", f"train.micro_batch_size={args.micro}",
                                           "world_size=2", "peak_tflops=1"])
    bare, ours = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(cfg, args.steps))
        ours.append(harness_loop(cfg, args.steps))
        torch.set_num_threads(args.threads)  # init_distributed may have changed it
        print(f"round {r + 1}: bare {bare[-1] * 1e3:.1f} ms/step, parallelkit {ours[-1] * 1e3:.1f} ms/step", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    return {"bare_step_s": b, "harness_step_s": o, "overhead": o / b - 1, "rounds": args.rounds,
            "bare_rounds": bare, "harness_rounds": ours, "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="results/harness")
    ap.add_argument("--skip-cli", action="store_true")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [] if args.skip_cli else cli_runs(args)
    ov = overhead(args)
    lines = [f"# single vs ddp, and the harness overhead ({args.model})", "",
             f"Command: `python experiments/bench_harness.py --model {args.model} --steps {args.steps} "
             f"--micro {args.micro} --rounds {args.rounds}`", ""]
    if rows:
        lines += ["| strategy | processes | global batch | tokens/s | step ms | MFU | peak RSS MiB/rank | state MiB/rank | final loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            lines.append(f"| {s['label']} | {s['processes']} | {s['global_batch']} | {s['tokens_per_s']:,.0f} | "
                         f"{s['step_time_s'] * 1e3:,.0f} | {s['mfu']:.1%} | {max(s['peak_mem_bytes']) / 2**20:,.0f} | "
                         f"{max(s['model_state_bytes']) / 2**20:,.1f} | {s['final_loss']:.4f} |")
        lines += ["", f"ddp / single tokens/s: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x "
                      f"(single: 1 process using all {os.cpu_count()} cores; ddp: 2 processes sharing them)", ""]
    lines += [f"Harness overhead, one process, {ov['threads']} thread(s), {ov['rounds']} alternating rounds: "
              f"bare loop {ov['bare_step_s'] * 1e3:.1f} ms/step, parallelkit loop {ov['harness_step_s'] * 1e3:.1f} ms/step, "
              f"overhead {ov['overhead']:+.2%} (target < 2%)."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (Path(args.out) / "README.md").write_text(text)
    (Path(args.out) / "overhead.json").write_text(json.dumps(ov, indent=1))


if __name__ == "__main__":
    main()
