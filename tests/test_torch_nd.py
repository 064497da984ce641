"""strategy=torch_nd: PyTorch's own N-D parallelism on one DeviceMesh (FSDP2, HSDP, DTensor tensor parallelism with
sequence parallelism, context parallelism by Ulysses' all-to-all and by a ring) against single, on gloo CPU
processes; what its memory and communication models predict against what the runs hold and send; its mesh errors.
The 2 x 2 x 2 form on 8 processes, and its resume from a neox_3d checkpoint, are in test_pipelines_ds.py."""
from __future__ import annotations

import json
import re

import pytest
from conftest import (
    assert_close_trajectory,
    compose_plan,
    compose_run,
    jobs_in_one_group,
    prepare_run,
    summary,
    train_ranks,
    train_together,
)

from parallelkit.config.errors import ConfigError

# 4 blocks, one global batch of 8, clipping active at every step (the norm starts near 1.3), 6 steps
PARITY = ["model.n_layer=4", "train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_clip=0.5",
          "train.timeout_s=180"]
RTOL = 1e-5  # measured: <= 1.6e-7 for cp and HSDP, <= 1.4e-6 where tensor parallelism sums partial matmuls


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_ranks(tmp_path_factory.mktemp("single"), "single", "strategy=single", *PARITY)


def _check(name: str, s: dict, single: dict, overrides: list[str]) -> None:
    assert_close_trajectory(s["losses"], single["losses"], rtol=RTOL)
    p = compose_plan(*PARITY, *overrides)
    mem = p.cls.memory(p.cfg, p.opts, p.layout, None)
    want = mem["params"] + mem["grads"] + mem["optimizer"]
    assert max(s["model_state_bytes"]) == pytest.approx(want, rel=0.02), (name, s["model_state_bytes"], want)
    comm = p.cls.comm(p.cfg, p.opts, p.layout)
    for kind in ("all_to_all", "send_recv", "all_gather", "reduce_scatter", "all_reduce"):
        got = max(r.get(kind, {}).get("bytes", 0) for r in s["comm_by_kind"])
        assert got == pytest.approx(comm.get(kind, 0), rel=0.02), (name, kind, s["comm_by_kind"], comm)


TWO = {"tp2_sp": ["strategy=torch_nd", "train.untimed_steps=2", "train.breakdown=trace"],  # its profile, below
       "ulysses_cp2": ["strategy=torch_nd_ulysses"],
       "ring_cp2": ["strategy=torch_nd_ring"],
       "rep2": ["strategy=torch_nd_hsdp"]}  # replicas of one shard: HSDP's 2-D mesh, all-reduced as predicted
FOUR = {"fsdp2_tp2": ["strategy=torch_nd", "world_size=4"],
        "hsdp_2x2": ["strategy=torch_nd_hsdp", "world_size=4", "train.micro_batch_size=1"],
        "ulysses_cp4": ["strategy=torch_nd_ulysses", "world_size=4", "strategy.cp=4"],
        "ring_cp4": ["strategy=torch_nd_ring", "world_size=4", "strategy.cp=4"],
        "ring_cp2_tp2": ["strategy=torch_nd_ring", "world_size=4", "strategy.tp=2"]}


def test_two_ranks_tp_ulysses_and_ring_match_single_and_resume_each_other(single, tmp_path):
    """In one group of 2: each form trains straight; the tensor-parallel run writes a portable checkpoint at step 3
    (its qkv rows back in single's order), which the ring run then resumes and continues its own straight run.
    DTensor's collectives are counted and predicted (``_check``), and its profiled step shows its waits on them
    as exposed communication by kind, with the trace written beside the summary."""
    ck = tmp_path / "ck"
    dirs = {k: prepare_run(tmp_path / k, *PARITY, *v, *([f"checkpoint.dir={ck}", "checkpoint.every=3"]
                                                        if k == "tp2_sp" else [])) for k, v in TWO.items()}
    jobs_in_one_group(2, [*(("train", d) for d in dirs.values()), ("resume", dirs["ring_cp2"], [ck / "step_3"])])
    runs = {k: summary(d) for k, d in dirs.items()}
    for name, s in runs.items():
        assert s["status"] == "ok", (name, s)
        _check(name, s, single, TWO[name])
    assert runs["ring_cp2"]["label"] == "torch nd cp2 ring" and runs["tp2_sp"]["label"] == "torch nd tp2+sp"
    assert set(runs["rep2"]["comm_by_kind"][0]) == {"all_reduce"}, runs["rep2"]["comm_by_kind"]
    for rank, b in enumerate(runs["tp2_sp"]["step_breakdown"]):
        assert set(b["exposed_s_by_kind"]) == {"all_gather", "reduce_scatter", "all_reduce"}, b  # no unnamed kind
        assert min(b["exposed_s_by_kind"].values()) > 0 and sum(b["parts_s"].values()) == pytest.approx(b["wall_s"])
        assert "_c10d_functional::wait_tensor" in (dirs["tp2_sp"] / f"trace_rank{rank}.json").read_text()
    resumed = json.loads((dirs["ring_cp2"] / "resumed.json").read_text())[str(ck / "step_3")]
    assert_close_trajectory(resumed, runs["ring_cp2"]["losses"][3:], rtol=RTOL)


@pytest.mark.slow
def test_four_ranks_fsdp_x_tp_hsdp_and_sequence_splits_match_single(single, tmp_path):
    runs = train_together(tmp_path, {k: [*PARITY, *v] for k, v in FOUR.items()}, nproc=4)
    for name, s in runs.items():
        _check(name, s, single, FOUR[name])
    assert runs["hsdp_2x2"]["strategy_facts"]["mesh"] == {"pp": 1, "dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 1}


@pytest.mark.parametrize("overrides,message", [
    (["strategy=torch_nd", "world_size=6", "strategy.tp=4"], "pp x dp_replicate x cp x tp = 1 x 1 x 1 x 4 = 4 does not "
                                                             "divide world_size=6"),
    (["strategy=torch_nd", "world_size=8", "strategy.dp_shard=3"], "times strategy.dp_shard=3, is 6, not world_size=8"),
    (["strategy=torch_nd", "model.n_head=3", "model.d_model=48"], "strategy.tp=2 does not divide model.n_head=3"),
    (["strategy=torch_nd_ring", "model.seq_len=63"], "strategy.cp=2 does not divide model.seq_len=63"),
    (["strategy=torch_nd_ulysses", "world_size=4", "strategy.cp=4", "model.n_head=2", "model.d_model=32"],
     "the 2 heads per tensor-parallel rank (model.n_head=2 / tp=1) must divide by cp"),
    (["strategy=torch_nd", "strategy.cp_mode=stripes"], "strategy.cp_mode='stripes': choose one of ulysses, ring"),
    (["strategy=torch_nd_3d", "world_size=8", "train.micro_batch_size=4"], "strategy.schedule=1f1b needs at least "
                                                                          "strategy.pp=2 micro-batches"),
    (["strategy=torch_nd_ring", "model=llama_tiny"], "strategy.cp=2 splits the sequence, and model.arch=llama's rotary"),
    (["strategy=torch_nd", "model=llama_tiny", "model.n_kv_head=1"], "strategy.tp=2 does not divide model.n_kv_head=1"),
])
def test_a_wrong_mesh_is_one_line_before_launch(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        compose_run(*overrides)
    assert "\n" not in str(e.value)
