"""DeepSpeed ZeRO end to end: real DeepSpeed, 2 gloo processes on CPU, the real CLI.

The parity runs use grad_accum=2 so that DeepSpeed's own accumulation is exercised and so that
stage 1 (which keeps full gradients while it accumulates) differs from stage 2 in memory.
"""
import json
import os
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    START,
    assert_close_trajectory,
    gpu,
    train_ranks,
    train_together,
)
from hydra import compose, initialize_config_dir

pytest.importorskip("deepspeed")

from parallelkit.config.compose import explicit_keys, open_strategy_keys  # noqa: E402
from parallelkit.config.errors import ConfigError  # noqa: E402
from parallelkit.runtime.plan import build_plan  # noqa: E402
from parallelkit.strategies.deepspeed.config import aio_available, build_config, sizes  # noqa: E402

PARITY = ["train.steps=12", "train.grad_accum=2", "world_size=2"]
# Same torch AdamW, weights, data and schedule as ddp: the only difference is the order of fp32
# additions (DeepSpeed reduces flat buckets/partitions and sums the clipping norm partition by
# partition), ~1e-7 relative per step; measured <= 2e-7 over 12 steps. A wrong lr schedule,
# accumulation scale or missed clip moves the loss by > 1e-4, so 1e-5 separates the two.
RTOL = 1e-5


def cfg_of(*overrides: str):
    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        return compose("config", overrides=["world_size=2", *open_strategy_keys(list(overrides))])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ddp and ZeRO 0-3 on the same 12 steps; stage 3 also writes native checkpoints at steps 6 and 12."""
    tmp = tmp_path_factory.mktemp("ds")
    ck = [f"checkpoint.dir={tmp / 'ck'}", "checkpoint.every=6", "checkpoint.format=native"]
    runs = {"ddp": ["strategy=ddp", *PARITY]}
    runs.update({f"zero{s}": ["strategy=deepspeed", f"strategy.zero_stage={s}", *PARITY, *(ck if s == 3 else [])]
                 for s in range(4)})
    done = train_together(tmp, runs)  # one spawn: the runs' figures are tensor bytes and losses, not RSS
    return {"tmp": tmp, "ddp": done["ddp"], **{s: done[f"zero{s}"] for s in range(4)}}


@pytest.mark.slow  # over a minute on 2 busy cores; CI runs it (plain `pytest` selects every marker)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_matches_ddp(runs, stage):
    s = runs[stage]
    assert s["label"] == f"deepspeed zero{stage}" and s["strategy_facts"]["zero_stage"] == stage
    assert s["strategy_facts"]["optimizer"] == "torch.optim.AdamW"
    assert_close_trajectory(s["losses"], runs["ddp"]["losses"], rtol=RTOL)
    ds = json.loads((runs["tmp"] / f"zero{stage}" / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_clipping"] == 1.0


def test_model_state_shrinks_stage_by_stage(runs):
    """ZeRO (Rajbhandari et al. 2020) per parameter, fp32, N=2 ranks. DeepSpeed keeps an fp32 master copy
    beside the fp32 weights once it shards (stages 1-3), so optimizer state is 4 + 8 bytes, sharded from
    stage 1; gradients (4) from stage 2 (stage 1 holds them whole while accumulating); weights (4) at 3."""
    n, N = runs[0]["params"], 2
    expected = {0: 4 + 4 + 8, 1: 4 + 4 + 12 / N, 2: 4 + (4 + 12) / N, 3: (4 + 4 + 12) / N}
    per_param = {s: max(runs[s]["model_state_bytes"]) / n for s in range(4)}
    for s, want in expected.items():
        assert abs(per_param[s] - want) <= 0.1 * want, (s, per_param, expected)
    assert per_param[0] > per_param[1] > per_param[2] > per_param[3], per_param
    p3 = runs[3]["model_state_breakdown"][0]["params"] / n
    assert p3 < 0.6 * 4, "ZeRO-3 holds only its shard of the weights (plus small persistent ones)"


def test_communication_is_counted(runs):
    """Payload per rank and step, by kind, as each stage's comm model says (exact: DeepSpeed's buckets, its norm
    scalars and ZeRO-3's gathers): ZeRO-0 all-reduces every gradient once (4 bytes/param); the sharded stages
    reduce gradients and all-gather updated weights."""
    from conftest import compose_plan

    for s in range(3):  # stage 3 records its trace in the first steps: exact from the third (test_comm_model.py)
        p = compose_plan("strategy=deepspeed", f"strategy.zero_stage={s}", *PARITY)
        want = p.cls.comm(p.cfg, p.opts, p.layout)
        for got in runs[s]["comm_by_kind"]:
            assert {k: v["bytes"] for k, v in got.items()} == want, (s, got, want)


def test_stage3_checkpoint_round_trip(runs):
    """Resume at step 6 from the DeepSpeed checkpoint (each rank's shards) and continue exactly."""
    tmp = runs["tmp"]
    assert (tmp / "ck" / "step_6" / "deepspeed").is_dir()
    resumed = train_ranks(tmp, "resumed", "strategy=zero3", *PARITY, f"checkpoint.resume={tmp / 'ck' / 'step_6'}")
    assert_close_trajectory(resumed["losses"], runs[3]["losses"][6:], rtol=1e-6)


def test_cpu_offload_trains(runs):
    """Parameters and optimizer state on the CPU, stepped by DeepSpeedCPUAdam (its AdamW rounds differently
    from torch's in the 6th digit, hence 1e-4), the model built already partitioned (deepspeed.zero.Init,
    as for big models): the same weights and the same trajectory as ddp."""
    s = train_ranks(runs["tmp"], "offload", "strategy=zero3_offload", "strategy.zero_init=true", *PARITY)
    f = s["strategy_facts"]
    assert (f["offload_optimizer"], f["offload_param"], f["zero_init"]) == ("cpu", "cpu", True)
    assert "CPUAdam" in f["optimizer"] and s["label"] == "deepspeed zero3 offload"
    assert_close_trajectory(s["losses"], runs["ddp"]["losses"], rtol=1e-4)


def test_bf16_with_a_users_config_file(tmp_path):
    """bf16 trains and its loss falls; a DeepSpeed-docs style JSON gets its "auto" values filled, keeps
    its own bucket size, and its scheduler gives way to the run's schedule (with a note)."""
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 10}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 50000, "overlap_comm": "auto"}}))
    s = train_ranks(tmp_path, "bf16", "strategy=zero2", f"strategy.config_file={f}", "train.precision=bf16",
              "train.steps=10", "optim.lr=3e-3")
    assert s["losses"][-1] < s["losses"][0] - 0.05, s["losses"]
    ds = json.loads((tmp_path / "bf16" / "deepspeed_config.json").read_text())
    assert ds["bf16"]["enabled"] is True and ds["train_batch_size"] == 4 and "scheduler" not in ds
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50000 and ds["zero_optimization"]["overlap_comm"] is False
    assert any("scheduler" in n for n in s["strategy_facts"]["notes"])


def test_conflicting_batch_size_fails_before_workers(tmp_path):
    """The file's global batch against a micro-batch and accumulation both given on the command line (without
    train.grad_accum, accumulation would follow from the file: train_batch_size / (micro x dp))."""
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as e:  # refused by the plan, before any worker
        given = ["train.grad_accum=1", "train.micro_batch_size=2", "strategy=deepspeed", f"strategy.config_file={f}"]
        build_plan(cfg_of(*given), explicit=explicit_keys(given, "deepspeed"))  # as the CLI plans it
    err = str(e.value)
    assert "train_batch_size=32" in err and "2 x 1 x 2 = 4" in err and "\n" not in err, err


@pytest.mark.parametrize("overrides, key", [
    (["strategy=deepspeed", "strategy.zero_stage=4"], "strategy.zero_stage=4"),
    (["strategy=zero2", "strategy.offload_param=cpu"], "strategy.offload_param=cpu"),
    (["strategy=zero3", "strategy.offload_optimizer=disk"], "strategy.offload_optimizer='disk'"),
    (["strategy=zero3_nvme", "strategy.nvme_path=null"], "strategy.offload_param=nvme"),
    (["strategy=zero2", "train.micro_batch_size=4", "strategy.config={train_micro_batch_size_per_gpu: 8}"],
     "train.micro_batch_size=4"),
    (["strategy=zero2", "strategy.config={zero_optimization: {stage: 3}}"], "strategy.zero_stage=2"),
    (["strategy=zero2", "train.precision=bf16", "strategy.config={fp16: {enabled: true}}"], "train.precision=bf16"),
])
def test_bad_config_is_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        strategy = next(o.split("=", 1)[1] for o in overrides if o.startswith("strategy="))
        build_plan(cfg_of(*overrides), explicit=explicit_keys(overrides, strategy))  # as the CLI plans it
    assert key in str(e.value) and "\n" not in str(e.value)


def test_buffers_sized_for_gpt_1b_on_a_24_gib_box():
    """The sizes that let gpt_1b train under ZeRO-3 NVMe on 24 GiB (2 ranks), where DeepSpeed's defaults
    (buckets 5e8, sub-groups and live parameters 1e9) are killed at initialisation."""
    z = sizes(cfg_of("strategy=zero3_nvme", "model=gpt_1b"), mem=24 * 2**30 // 2)
    assert 1.9e7 < z["bucket"] < 2.1e7 and 0.95e8 < z["live"] < 1.05e8 and 4.8e7 < z["sub_group"] < 5.2e7
    assert 50304 * 2048 < z["param_buffer"] <= 1.15e8  # one offload buffer must hold the largest tensor
    ds, _ = build_config(cfg_of("strategy=zero3", "model=tiny"))  # tiny: buckets a tenth of the model
    assert ds["zero_optimization"]["reduce_bucket_size"] < 1e5 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.skipif(not aio_available(), reason="NVMe offload needs libaio (bash scripts/setup.sh --nvme)")
def test_nvme_offload_trains(runs):
    """ZeRO-Infinity (params and optimizer state swapped to disk, model built under zero.Init) follows ddp;
    its swap folder is removed at the end. The first run on a machine builds DeepSpeed's async_io op."""
    nvme = runs["tmp"] / "nvme"
    s = train_ranks(runs["tmp"], "nvme", "strategy=zero3_nvme", f"strategy.nvme_path={nvme}", "strategy.zero_init=true", *PARITY)
    assert s["label"] == "deepspeed zero3 nvme" and s["strategy_facts"]["zero_init"] is True
    assert_close_trajectory(s["losses"], runs["ddp"]["losses"], rtol=1e-4)
    assert not any(nvme.glob("parallelkit_*"))


@gpu
def test_fp16_dynamic_loss_scaling_on_gpu(tmp_path):
    s = train_ranks(tmp_path, "fp16", "strategy=zero2", "train.precision=fp16", "train.steps=10", "optim.lr=3e-3",
              "world_size=null")
    ds = json.loads((tmp_path / "fp16" / "deepspeed_config.json").read_text())
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert s["losses"][-1] < s["losses"][0]


@gpu
def test_zero3_bf16_on_gpu(tmp_path):
    s = train_ranks(tmp_path, "bf16", "strategy=zero3", "train.precision=bf16", "train.steps=10", "optim.lr=3e-3",
              "world_size=null")
    assert s["losses"][-1] < s["losses"][0] and s["peak_mem_kind"] == "cuda_max_allocated"


def _probe_keeps_nothing_main(rank: int, run_dir: str, out: str) -> None:
    import gc

    import torch

    from parallelkit.config.plan import RunPlan
    from parallelkit.runtime.loop import init_distributed, make_strategy, run_steps
    from parallelkit.util.tensors import tensor_bytes

    plan = RunPlan.load(Path(run_dir))
    strategy = make_strategy(plan, init_distributed(plan.layout), None)
    run_steps(strategy, plan, 0, None)  # the probe step snapshots the gradients at their high point

    def live() -> int:
        gc.collect()
        return tensor_bytes(o for o in gc.get_objects() if torch.is_tensor(o))

    with_snapshot = live()
    strategy._grads, strategy._grad_bytes = None, 0  # what a run without the probe step would hold
    without = live()
    if rank == 0:
        Path(out).write_text(json.dumps({"with": with_snapshot, "without": without}))
    os._exit(0)


@pytest.mark.parametrize("preset", ["zero1", "zero2"])
def test_the_probe_step_keeps_no_gradient_alive_into_the_timed_steps(tmp_path, preset):
    """ZeRO's probe step records where the gradients peak for model_state_bytes; it must keep numbers, not the
    tensors, or the timed steps' memory peak includes a gradient copy DeepSpeed had freed: the live tensor bytes
    after the steps are the same with the snapshot as without it."""
    from conftest import compose_plan

    from parallelkit.runtime.processes import spawn

    run = tmp_path / "run"
    compose_plan(f"strategy={preset}", "train.grad_accum=2", "train.steps=4", "train.untimed_steps=2").save(run)
    spawn(_probe_keeps_nothing_main, 2, str(run), str(tmp_path / "live.json"), timeout=300,
          start_method=START)
    live = json.loads((tmp_path / "live.json").read_text())
    assert live["with"] == live["without"], live
