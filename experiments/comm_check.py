"""Predicted against measured communication per step, by collective kind, for a list of strategies.

Each strategy runs once, isolated (``python -m parallelkit.run``, real worker processes, gloo); its
``summary.json`` gives what ``metrics.CommCounter`` counted on the probe step (``comm_by_kind``, per
rank), and ``Strategy.comm`` on the same resolved config gives the prediction. Printed per kind: the
busiest rank's measured bytes, the prediction and the error.

    python experiments/comm_check.py [--out DIR] [--strategies ddp,zero3,...] [OVERRIDE ...]
    python experiments/comm_check.py model=small model.seq_len=64 train.grad_accum=2

Overrides after the options go to every run (``model=tiny`` and 4 steps unless given). A strategy may
carry its own overrides after a colon: ``neox_3d:world_size=4``, ``torch_pipe:train.grad_accum=2``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT = ("ddp,zero0,zero1,zero2,zero3,zero2_offload,zero3_offload,fsdp_zero3,fsdp_zero2,fsdp_zero3_offload,"
           "fairscale_oss,fairscale_oss_ddp,fairscale_tp,torch_pipe:train.grad_accum=2,deepspeed_pipe,"
           "deepspeed_pipe:world_size=4,neox_3d:world_size=4,fairscale_pipe,single")
# the probe step (the last untimed one) is the third: DeepSpeed's ZeRO-3 records its parameter trace on the first two
BASE = ["model=tiny", "train.steps=4", "train.untimed_steps=3", "peak_tflops=1"]


def predicted(run_dir: Path) -> dict[str, float]:
    from parallelkit.config.plan import RunPlan

    p = RunPlan.load(run_dir)
    return p.cls.comm(p.cfg, p.opts, p.layout) or {}  # None: its backend does not predict communication


def busiest(by_rank: list[dict]) -> dict[str, int]:
    """The measured bytes per kind of the rank that moved the most in all (what comm() predicts)."""
    if not by_rank:
        return {}
    top = max(by_rank, key=lambda r: sum(v["bytes"] for v in r.values()))
    return {k: int(v["bytes"]) for k, v in top.items()}


def rows(name: str, meas: dict, pred: dict) -> list[str]:
    out = []
    for kind in sorted(set(meas) | set(pred)) or ["-"]:
        m, p = meas.get(kind, 0), pred.get(kind, 0)
        err = "" if kind == "-" else ("0.0%" if m == p else f"{(p - m) / m:+.1%}" if m else "n/a")
        out.append(f"| {name} | {kind} | {m:,} | {p:,.0f} | {err} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default=DEFAULT)
    ap.add_argument("--out", default="/tmp/parallelkit_comm_check")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    given = {o.split("=")[0] for o in a.overrides}
    common = [o for o in BASE if o.split("=")[0] not in given] + a.overrides
    print("| strategy | kind | measured B/step (busiest rank) | predicted | error |\n|---|---|---|---|---|")
    for spec in a.strategies.split(","):
        name, *extra = spec.split(":")
        out = Path(a.out) / "_".join([name, *(e.split("=")[-1] for e in extra)])
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "parallelkit.run", f"strategy={name}", *common, *extra,
                            f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True)
        try:
            s = json.loads((out / "summary.json").read_text())
        except FileNotFoundError:
            s = {"status": "failed", "error": p.stderr.strip().splitlines()[-1:] or "no summary"}
        if s.get("status") != "ok":
            print(f"| {' '.join([name, *extra])} | {s.get('status')}: {s.get('error')} | | | |", flush=True)
            continue
        for line in rows(" ".join([name, *extra]), busiest(s.get("comm_by_kind") or []), predicted(out)):
            print(line, flush=True)
        print(f"    ({name}: {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
