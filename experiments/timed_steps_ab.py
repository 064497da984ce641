"""Benchmark, not a test: do the timed steps of this tree run as fast as those of an earlier commit?

    python experiments/timed_steps_ab.py BASE_REF [--strategies ddp,fsdp,zero2] [--rounds 4] [--out DIR]
                                         [-- extra run overrides]

A change to the loop must not slow the steps it times (issue 20: the step-time breakdown profiles an untimed step
only; the timed ones pass three named spans). This checks out BASE_REF into a temporary git worktree, then runs
round by round, for each strategy, one ``python -m parallelkit.run`` from the base and one from this tree, their
order alternated from round to round so that a drift of the machine's load falls on both. Same model, data,
steps, seed; predictions off. Per strategy it prints the median over rounds of the per-round ratio
this / base of the median timed step time, with its min-max, and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model=small", "model.seq_len=128", "train.micro_batch_size=4", "train.steps=12", "train.untimed_steps=3",
       "world_size=2", "preflight=false"]


def run(tree: Path, strategy: str, out: Path, extra: list[str]) -> float:
    env = {**os.environ, "PARALLELKIT_NO_PREDICTION": "1", "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "parallelkit.run", f"strategy={strategy}", *RUN, *extra, f"hydra.run.dir={out}"]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if s.get("status") != "ok":
        raise SystemExit(f"{strategy} in {tree}: {s.get('error') or p.stderr[-2000:]}")
    return s["step_time_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the git ref to compare with (e.g. a commit before the change)")
    ap.add_argument("--strategies", default="ddp,fsdp,zero2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("extra", nargs="*", help="more run overrides, after --")
    a = ap.parse_args()
    strategies = a.strategies.split(",")
    with tempfile.TemporaryDirectory(prefix="parallelkit-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), a.base], cwd=ROOT, check=True,
                       capture_output=True)
        out = a.out or Path(tmp) / "runs"
        ratios: dict[str, list[float]] = {s: [] for s in strategies}
        try:
            for r in range(a.rounds):
                load = os.getloadavg()[0]
                for strategy in strategies:
                    order = [("base", base), ("this", ROOT)][:: 1 if r % 2 == 0 else -1]
                    t = {name: run(tree, strategy, out / f"r{r}_{strategy}_{name}", a.extra) for name, tree in order}
                    ratios[strategy].append(t["this"] / t["base"])
                    print(f"round {r + 1}: {strategy}: this {t['this'] * 1e3:.1f} ms, base {t['base'] * 1e3:.1f} ms, "
                          f"ratio {t['this'] / t['base']:.3f}", flush=True)
                print(f"round {r + 1}: load {load:.2f} before, {os.getloadavg()[0]:.2f} after", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"\nthis tree / {a.base}, median timed step time, median over {a.rounds} rounds [min-max]:")
    for s, v in ratios.items():
        print(f"  {s:<12} {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]")


if __name__ == "__main__":
    main()
