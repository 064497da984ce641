"""DeepSpeed pipelines end to end: deepspeed_pipe and neox_3d on real DeepSpeed, gloo, CPU processes.

Every run takes the same global batch as ``single`` (8 samples a step: train.global_batch_size=8 sets
grad_accum from each layout's dp) with clipping active at every step (grad_clip 0.1: the tiny model's
gradient norm is between 0.1 and 1; without clipping the losses move by 3.7e-5).
"""
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

pytest.importorskip("deepspeed")

from parallelkit.config.errors import ConfigError  # noqa: E402

COMMON = ["train.global_batch_size=8", "train.grad_clip=0.1"]
# Same weights, data, AdamW and schedule as single; pipelines add the micro-batch losses, the tied gradient
# and the norm in another order, and tensor parallelism sums partial matmuls: <= 8e-8 relative measured over
# 6 steps. With DeepSpeed's norm left as it is (stage 0's parameters only in its fp32 path, tensor rank 0's only
# under ZeRO) the losses move by 2.5e-6 (pp2 zero0) and 4.6e-6 (tp2 pp2 zero1): 1e-6 tells the two apart.
RTOL = 1e-6


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_ranks(tmp_path_factory.mktemp("single"), "single", "strategy=single", *COMMON)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single):
    tmp = tmp_path_factory.mktemp("pipes")
    four = train_together(tmp, {"pp2dp2": ["strategy=deepspeed_pipe", "world_size=4", *COMMON],
                                "tp2pp2": ["strategy=neox_3d", "world_size=4", *COMMON]}, nproc=4)  # one start-up
    return {"single": single,
            "pp2": train_ranks(tmp, "pp2", "strategy=deepspeed_pipe", "strategy.zero_stage=0", *COMMON,
                               f"checkpoint.dir={tmp / 'ck'}", "checkpoint.every=3", "checkpoint.format=native"),
            **four, "tmp": tmp}


@pytest.mark.slow  # pays for the runs fixture: 1-3 minutes on 2 busy cores; CI runs it
def test_deepspeed_pipe_matches_single(runs):
    """pp2 dp1 with ZeRO-0 (the torch AdamW stepped by the engine): 4 micro-batches in the 1F1B schedule."""
    s = runs["pp2"]
    assert s["label"] == "deepspeed pipe pp2 dp1 zero0" and (s["pp"], s["dp"], s["world_size"]) == (2, 1, 2)
    facts = s["strategy_facts"]
    assert facts["schedule"] == "1F1B (DeepSpeed)" and facts["micro_batches"] == 4 and facts["balance"] == [3, 3]
    assert facts["bubble_estimate"] == pytest.approx(1 / 5)
    assert_close_trajectory(s["losses"], runs["single"]["losses"], rtol=RTOL)


def test_deepspeed_pipe_with_zero1_over_two_replicas_matches_single(runs):
    """pp2 x dp2 on 4 processes: ZeRO-1's optimizer (flat fp32 partitions, DeepSpeed's norm) over the replicas."""
    s = runs["pp2dp2"]
    assert s["label"] == "deepspeed pipe pp2 dp2 zero1" and s["strategy_facts"]["micro_batches"] == 2
    assert_close_trajectory(s["losses"], runs["single"]["losses"], rtol=RTOL)
    # each stage's optimizer state is split over the 2 replicas; the predicted stage rows match what ranks hold
    pred = s["strategy_facts"]["stage_memory_predicted"]
    for rank, held in enumerate(s["model_state_breakdown"]):
        stage = rank // 2  # DeepSpeed's topology: (pipe, data), data fastest
        assert held["params"] == pred[stage]["params"]
        assert abs(held["optimizer"] - pred[stage]["optimizer"]) <= 0.01 * pred[stage]["optimizer"]


def test_deepspeed_pipe_with_deepspeeds_own_optimizer_matches_single(single, tmp_path):
    """An optimizer section in the DeepSpeed config: DeepSpeed builds and steps its own AdamW (measured 8e-8 here;
    its CPU kernels may round differently elsewhere, hence 1e-4)."""
    s = train_ranks(tmp_path, "dsopt", "strategy=deepspeed_pipe", "strategy.config={optimizer: {type: AdamW}}", *COMMON)
    assert s["strategy_facts"]["optimizer"] == "AdamW (from the DeepSpeed config)"
    assert_close_trajectory(s["losses"], single["losses"], rtol=1e-4)


def test_neox_3d_tp2_pp2_matches_single(runs):
    s = runs["tp2pp2"]
    assert s["label"] == "neox 3d tp2 pp2 dp1" and (s["tp"], s["pp"], s["dp"]) == (2, 2, 1)
    assert_close_trajectory(s["losses"], runs["single"]["losses"], rtol=RTOL)
    pipe = runs["pp2"]["model_state_breakdown"]  # the same stages, block matmuls split in two
    for rank, held in enumerate(s["model_state_breakdown"]):
        assert held["params"] < pipe[rank // 2]["params"]


def test_deepspeed_pipe_resumes_from_deepspeed_engine_checkpoints(runs):
    """DeepSpeed's pipeline checkpoint (one file per layer, the engine's optimizer state), written at step 3."""
    tmp = runs["tmp"]
    s = train_ranks(tmp, "resumed", "strategy=deepspeed_pipe", "strategy.zero_stage=0", *COMMON,
                    f"checkpoint.resume={tmp / 'ck' / 'step_3'}")
    assert len(list((tmp / "ck" / "step_3" / "deepspeed").glob("layer_*-model_states.pt"))) >= 5
    assert_close_trajectory(s["losses"], runs["pp2"]["losses"][3:], rtol=RTOL)


@pytest.mark.slow
def test_neox_3d_tp2_pp2_dp2_on_8_processes_matches_single_and_torch_nd_resumes_it(single, tmp_path):
    """8 processes on however few cores (one thread each), the same 6 steps (the lr schedule spans train.steps).
    Then torchtitan's composition, torch_nd pp2 x fsdp2 x tp2, on the same 8: its straight run matches single too,
    and it resumes neox_3d's portable checkpoint of step 3 and continues its own straight run."""
    neox = prepare_run(tmp_path / "3d", "strategy=neox_3d", "world_size=8", *COMMON, f"checkpoint.dir={tmp_path / 'ck'}",
                       "checkpoint.every=3")
    nd = prepare_run(tmp_path / "nd", "strategy=torch_nd_3d", "world_size=8", *COMMON)
    jobs_in_one_group(8, [("train", neox), ("train", nd), ("resume", nd, [tmp_path / "ck" / "step_3"])])  # one start-up
    s = summary(neox)
    assert s["status"] == "ok" and s["label"] == "neox 3d tp2 pp2 dp2", s
    assert (s["tp"], s["pp"], s["dp"], s["processes"]) == (2, 2, 2, 8)
    assert_close_trajectory(s["losses"], single["losses"], rtol=RTOL)
    straight = summary(nd)
    assert straight["status"] == "ok", straight
    assert straight["label"] == "torch nd pp2 fsdp2 tp2+sp" and straight["strategy_facts"]["mesh"] == {
        "pp": 2, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2}
    assert_close_trajectory(straight["losses"], single["losses"], rtol=1e-5)  # DTensor's partial sums: ~1e-6
    p = compose_plan("strategy=torch_nd_3d", "world_size=8", *COMMON)  # its stages' state and traffic, as predicted
    stages = [r["params"] + r["grads"] + r["optimizer"] for r in p.cls.memory(p.cfg, p.opts, p.layout, None)["stages"]]
    assert straight["model_state_bytes"] == pytest.approx([stages[0]] * 4 + [stages[1]] * 4, rel=1e-3)
    comm = p.cls.comm(p.cfg, p.opts, p.layout)
    assert max(r["all_gather"]["bytes"] for r in straight["comm_by_kind"]) == comm["all_gather"]
    resumed = json.loads((nd / "resumed.json").read_text())[str(tmp_path / "ck" / "step_3")]
    assert_close_trajectory(resumed, straight["losses"][3:], rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["strategy=deepspeed_pipe", "strategy.zero_stage=2"], "strategy.zero_stage=2: DeepSpeed refuses ZeRO-2 and ZeRO-3"),
    (["strategy=neox_3d", "world_size=8", "strategy.zero_stage=3"], "strategy.zero_stage=3: DeepSpeed refuses"),
    (["strategy=deepspeed_pipe", "strategy.pp_size=3"], "strategy.pp_size=3 does not divide world_size=2"),
    (["strategy=neox_3d", "world_size=6"], "strategy.tp_size x strategy.pp_size = 2 x 2 does not divide world_size=6"),
    (["strategy=deepspeed_pipe", "world_size=8", "strategy.pp_size=8"], "strategy.pp_size=8 is more stages than the "
                                                                         "pipeline's 6 layers"),
    (["strategy=neox_3d", "world_size=8", "strategy.tp_size=4", "strategy.pp_size=1", "model.n_head=2"],
     "strategy.tp_size=4 does not divide model.n_head=2"),
    (["strategy=deepspeed_pipe", "strategy.partition_method=type:conv"], "'type:conv' matches none of the pipeline's layers"),
    (["strategy=deepspeed_pipe", "strategy.partition_method=blocks"], "choose parameters, uniform or type:REGEX"),
    (["strategy=deepspeed_pipe", "strategy.config={zero_optimization: {stage: 2}}"], "strategy.zero_stage=2: DeepSpeed "
                                                                                     "refuses ZeRO-2"),
])
def test_bad_pipeline_configs_fail_before_workers_start(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        compose_run(*overrides)
    assert "\n" not in str(e.value)


def test_deepspeed_batch_sizes_count_the_pipeline_replicas_only():
    """dp = world / (tp x pp): a DeepSpeed train_batch_size of 16 on 8 ranks of 2 x 2 x 2 is 2 x 4 micro-batches
    of 2 per replica, and the generated config says so (DeepSpeed's engine asserts it)."""
    from parallelkit.strategies.deepspeed.config import build_config

    p = compose_plan("strategy=neox_3d", "world_size=8", "strategy.config={train_batch_size: 16}")
    cfg, lay = p.cfg, p.layout
    assert (lay.tp, lay.pp, lay.dp) == (2, 2, 2) and cfg.train.grad_accum == 4
    ds = build_config(cfg, lay.dp)[0]
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (16, 4, 2)
