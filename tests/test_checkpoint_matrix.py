"""Any strategy resumes from any other's checkpoint: the N x N matrix of the strategies that run on CPU.

Each strategy trains 6 steps straight, writing a portable checkpoint at step 3 (tiny model, global
batch 8, clipping on every step). Then each strategy, set up once, loads every step-3 checkpoint in
turn and trains steps 3-5 from it: its losses must equal its own straight run's (and the source's)
to the parity tolerance. Runs share process groups (``jobs_in_one_group``): four spawns in all.

``PARALLELKIT_MATRIX_OUT=DIR`` also writes the table (README.md) there: results/checkpoint_matrix.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import jobs_in_one_group, prepare_run, summary

pytestmark = pytest.mark.slow

ONE_PROCESS = ["single", "fairscale_pipe"]
# each export / import path once: zero2 is zero1's (DeepSpeed's flat partitions), fsdp_zero2 fsdp_zero3's, and
# fairscale_oss_ddp fairscale_oss's (OSS's consolidated state); they ran in the matrix until it was cut for CI time
TWO_PROCESSES = ["ddp", "fsdp_zero3", "zero0", "zero1", "zero3", "zero2_offload", "fairscale_oss", "fairscale_tp",
                 "torch_pipe"]
STRATEGIES = ONE_PROCESS + TWO_PROCESSES
COMMON = ["world_size=2", "train.global_batch_size=8", "train.grad_clip=0.1", "train.steps=6", "train.untimed_steps=1"]
CPU_ADAM = {"zero2_offload"}  # DeepSpeedCPUAdam rounds differently from torch's AdamW in the 6th digit


def rtol(a: str, b: str) -> float:
    return 1e-4 if {a, b} & CPU_ADAM else 1e-5


def worst(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 3, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    t0 = time.time()
    for group, names in ((1, ONE_PROCESS), (2, TWO_PROCESSES)):
        jobs_in_one_group(group, [("train", str(prepare_run(tmp / n, f"strategy={n}", *COMMON, f"checkpoint.dir={tmp / n / 'ck'}",
                                                             "checkpoint.every=3"))) for n in names])
    straight = {n: summary(tmp / n)["losses"] for n in STRATEGIES}
    ckpts = [str(tmp / n / "ck" / "step_3") for n in STRATEGIES]
    for group, names in ((1, ONE_PROCESS), (2, TWO_PROCESSES)):
        jobs_in_one_group(group, [("resume", str(prepare_run(tmp / f"to_{n}", f"strategy={n}", *COMMON)), ckpts)
                                  for n in names])
    resumed = {b: {a: json.loads((tmp / f"to_{b}" / "resumed.json").read_text())[ck] for a, ck in zip(STRATEGIES, ckpts)}
               for b in STRATEGIES}
    return straight, resumed, time.time() - t0


def test_every_strategy_resumes_from_every_other(matrix):
    straight, resumed, seconds = matrix
    rows, failed = [], []
    for a in STRATEGIES:
        cells = []
        for b in STRATEGIES:
            got = resumed[b][a]
            dev = worst(got, straight[b][3:])
            dev_a = worst(got, straight[a][3:])
            cells.append(f"{dev:.0e}" if dev else "0")
            if dev > rtol(a, b) or dev_a > rtol(a, b):
                failed.append(f"{a} -> {b}: {dev:.1e} from {b}'s straight run, {dev_a:.1e} from {a}'s")
        rows.append(f"| **{a}** | " + " | ".join(cells) + " |")
    table = "\n".join([f"| from \\ to | {' | '.join(STRATEGIES)} |", "|---" * (len(STRATEGIES) + 1) + "|", *rows])
    out = os.environ.get("PARALLELKIT_MATRIX_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table.md").write_text(f"{table}\n\n{len(STRATEGIES) ** 2} resumes, {seconds:.0f} s\n")
    assert not failed, "\n".join(failed)
    assert all(straight[n][-1] < straight[n][0] for n in STRATEGIES)  # they really trained
