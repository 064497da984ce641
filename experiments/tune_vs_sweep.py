"""Benchmark, not a test: does ``parallelkit.tune`` finish within its budget, and is its winner as fast as the best
row of a plain sweep over the same candidates?

    python experiments/tune_vs_sweep.py [--model small] [--world-size 2] [--budget 900] [--out DIR] [OVERRIDES...]

1. ``python -m parallelkit.tune model=M world_size=W tune.budget_s=B hydra.run.dir=OUT/tune OVERRIDES``, timed
   (its search, from tune.md, against the budget; the wall time with start-up and the report beside it).
2. The candidates it measured (every row of tune.csv with a run folder), again as plain sweeps
   (``python -m parallelkit.run -m strategy=a,b,...``), one per micro-batch size and checkpointing setting, with
   each trial's global batch and steps (read from its config.yaml) and the same OVERRIDES; into OUT/sweep/.
3. Prints and writes OUT/tune_vs_sweep.json: the tune's search time against its budget, the winner's tokens/s (as
   the tune measured it) over the sweep's best, and the winner's configuration's tokens/s in the sweep over the
   sweep's best (did the tune pick the configuration the sweep finds fastest?). On a shared machine one step's
   tokens/s varies by tens of percent between runs: read the ratios with the load in mind.

OVERRIDES go to both (e.g. ``tune.strategies=ddp,zero2,fsdp tune.micro_batch_sizes=2,4``; the sweeps ignore
``tune.*``). The default (small, 2 ranks, 900 s) takes the budget plus about as long again for the sweeps.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def python(*args: str) -> tuple[int, float]:
    """Run ``python -m ...`` from the repository root (this checkout first on the path); (exit code, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print("$ python " + " ".join(args), flush=True)
    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env).returncode
    return rc, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--budget", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path(f"outputs/tune_vs_sweep/{time.strftime('%Y-%m-%d_%H-%M-%S')}"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = a.out.resolve()
    common = [f"model={a.model}", f"world_size={a.world_size}"]
    tune_rc, tune_s = python("-m", "parallelkit.tune", *common, f"tune.budget_s={a.budget:g}",
                             f"hydra.run.dir={out / 'tune'}", *a.overrides)
    with open(out / "tune" / "tune.csv") as f:
        rows = list(csv.DictReader(f))
    used = re.search(r"; (\d+) s of tune.budget_s=", (out / "tune" / "tune.md").read_text())
    used_s = float(used[1]) if used else None  # the search itself: the report is written after it
    measured = [r for r in rows if r["run"]]
    winner = next((r for r in rows if r["status"] == "ok"), None)  # tune.csv is ranked
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in measured:
        groups.setdefault((r["micro_batch_size"], r["activation_checkpointing"]), []).append(r)
    sweep_s, sweep = 0.0, []
    for (mb, ckpt), group in groups.items():
        run_cfg = OmegaConf.load(Path(group[0]["run"]) / "config.yaml")
        where = out / "sweep" / f"mb{mb}{'_ckpt' if ckpt == 'True' else ''}"
        _, s = python("-m", "parallelkit.run", "-m", "strategy=" + ",".join(r["strategy"] for r in group), *common,
                      f"train.micro_batch_size={mb}", f"train.global_batch_size={run_cfg.train.global_batch_size}",
                      f"train.activation_checkpointing={ckpt.lower()}", f"train.steps={run_cfg.train.steps}",
                      f"train.untimed_steps={run_cfg.train.untimed_steps}", f"hydra.sweep.dir={where}",
                      *[o for o in a.overrides if not o.startswith("tune.")])
        sweep_s += s
        for p in sorted(where.glob("*/summary.json")):
            summ = json.loads(p.read_text())
            sweep.append({"candidate": f"{summ['strategy']} mb={mb}" + (" ckpt" if ckpt == "True" else ""),
                          "status": summ["status"], "tokens_per_s": summ.get("tokens_per_s")})
    ok = [r for r in sweep if r["status"] == "ok" and r["tokens_per_s"]]
    best = max(ok, key=lambda r: r["tokens_per_s"], default=None)
    again = next((r for r in ok if winner and r["candidate"] == winner["candidate"]), None)
    res = {"model": a.model, "world_size": a.world_size, "budget_s": a.budget, "tune_wall_s": round(tune_s, 1),
           "tune_search_s": used_s, "tune_exit_code": tune_rc,
           "within_budget": used_s is not None and used_s <= a.budget,
           "candidates": len(rows),
           "measured": len(measured), "winner": winner and winner["candidate"],
           "winner_tokens_per_s": winner and float(winner["tokens_per_s"]), "sweep_wall_s": round(sweep_s, 1),
           "sweep_best": best and best["candidate"], "sweep_best_tokens_per_s": best and best["tokens_per_s"],
           "winner_in_sweep_tokens_per_s": again and again["tokens_per_s"], "sweep": sweep}
    res["winner_over_sweep_best"] = (res["winner_tokens_per_s"] / best["tokens_per_s"]) if winner and best else None
    res["winner_config_in_sweep_over_best"] = (again["tokens_per_s"] / best["tokens_per_s"]) if again and best else None
    (out / "tune_vs_sweep.json").write_text(json.dumps(res, indent=1))
    g = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    r = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\ntune: {used_s:.0f} s of tune.budget_s={a.budget:g} searching (within it: "
          f"{'yes' if res['within_budget'] else 'no'}), {tune_s:.0f} s wall with start-up and the report; "
          f"{len(measured)} of {len(rows)} candidates measured; winner "
          f"{res['winner']}: {g(res['winner_tokens_per_s'])} tokens/s")
    print(f"sweep over the {len(measured)} measured candidates: {sweep_s:.0f} s; best {res['sweep_best']}: "
          f"{g(res['sweep_best_tokens_per_s'])} tokens/s; the winner's configuration there: "
          f"{g(res['winner_in_sweep_tokens_per_s'])} tokens/s")
    print(f"winner (tune's measurement) / sweep best: {r(res['winner_over_sweep_best'])}; winner's configuration / "
          f"sweep best, both in the sweep: {r(res['winner_config_in_sweep_over_best'])}")
    print(f"-> {out / 'tune_vs_sweep.json'}")


if __name__ == "__main__":
    main()
