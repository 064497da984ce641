"""FairScale strategies end to end: real FairScale, 2 gloo processes, the real CLI and Hydra sweep.

One sweep runs single, ddp and the four CPU FairScale strategies on the same global batch
(8 samples: 2 ranks x 2 micro-batches of 2; tensor parallel has dp 1 so it runs 4
micro-batches; the pipe, one process, runs all of them) and writes checkpoints at step 3.
The tests compare its summaries; resume tests continue from those checkpoints.
"""
import re

import pytest
import torch
from conftest import FAST, ROOT, assert_close_trajectory, compose_plan, gpu, run_cli, summary, train

SWEEP = ["single", "ddp", "fairscale_oss", "fairscale_oss_ddp", "fairscale_pipe", "fairscale_tp"]
# grad_clip 0.1: the tiny model's gradient norm is below the default 1.0; at 0.1 every step
# clips, so a wrong global norm (local shards only, tied weight twice, tp shards not summed)
# moves the losses by 3e-6 to 1e-5 and fails the tolerances below.
COMMON = ["world_size=2", "train.global_batch_size=8", "train.grad_clip=0.1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    p = run_cli(out, "-m", f"strategy={','.join(SWEEP)}", *FAST, *COMMON, "checkpoint.dir=${hydra:runtime.output_dir}/ck",
                "checkpoint.every=3", f"hydra.sweep.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    runs = {name: summary(out / f"{i}_{name}") for i, name in enumerate(SWEEP)}
    for name, s in runs.items():
        assert s["status"] == "ok", (name, s["error"])
        assert s["tokens_per_step"] == runs["single"]["tokens_per_step"], name
    assert (out / "comparison.md").exists()
    return out, runs


@pytest.mark.slow  # over a minute on 2 busy cores; CI runs it (plain `pytest` selects every marker)
def test_oss_matches_ddp_step_by_step(sweep):
    _, runs = sweep
    ddp = runs["ddp"]["losses"]
    assert len(ddp) == 6 and ddp[-1] < ddp[0]
    # Same reduction order on 2 ranks; only OSS's norm-of-shards in clipping can differ, in the last bits.
    assert_close_trajectory(runs["fairscale_oss"]["losses"], ddp, rtol=1e-6)
    assert_close_trajectory(runs["fairscale_oss_ddp"]["losses"], ddp, rtol=1e-6)


def test_oss_halves_optimizer_state_and_sharded_ddp_the_gradients(sweep):
    _, runs = sweep
    ddp = runs["ddp"]["model_state_breakdown"][0]
    for name in ("fairscale_oss", "fairscale_oss_ddp"):
        ranks = runs[name]["model_state_breakdown"]
        assert len(ranks) == 2
        # each parameter's AdamW state lives on exactly one rank: the halves add up to DDP's full state
        assert sum(r["optimizer"] for r in ranks) == ddp["optimizer"]
        assert all(r["optimizer"] < 0.55 * ddp["optimizer"] for r in ranks), ranks
        assert all(r["params"] == ddp["params"] for r in ranks)
    assert all(r["grads"] < 0.55 * ddp["grads"] for r in runs["fairscale_oss"]["model_state_breakdown"])  # reduced to owner
    assert all(r["grads"] == ddp["grads"] for r in runs["fairscale_oss_ddp"]["model_state_breakdown"])  # all-reduced
    assert max(runs["fairscale_oss"]["model_state_bytes"]) < 0.8 * runs["ddp"]["model_state_bytes"][0]


def test_pipe_matches_single_and_says_it_is_one_process(sweep):
    _, runs = sweep
    s = runs["fairscale_pipe"]
    assert_close_trajectory(s["losses"], runs["single"]["losses"], rtol=2e-6)  # ~1e-7 observed
    assert (s["processes"], s["dp"], s["pp"], s["world_size"]) == (1, 1, 2, 2)
    assert s["one_process"] is True
    facts = s["strategy_facts"]
    assert "one process driving 2 devices" in facts["note"] and "not comparable" in facts["note"]
    assert facts["devices"] == ["cpu", "cpu"]
    assert "balance [2, 2]" in facts["sharded"]  # by parameter count: [embedding, block] [block, head]
    # one process does all the work on the CPU: its TFLOP/s is the whole pipeline's (not divided by its 2
    # "devices"), as the projection divides by processes too
    from conftest import compose_run

    from parallelkit.models.gpt import GPTConfig

    flops = GPTConfig.from_cfg(compose_run("strategy=single").model).flops_per_token()
    assert s["tflops"] == pytest.approx(flops * s["tokens_per_s"] / 1e12, rel=1e-6)


def test_tp_matches_single(sweep):
    _, runs = sweep
    s = runs["fairscale_tp"]
    # Same samples and math; tp sums partial matmuls over ranks and computes a vocab-parallel
    # cross-entropy, so rounding differs: ~1.5e-7 observed, 2e-6 allowed.
    assert_close_trajectory(s["losses"], runs["single"]["losses"], rtol=2e-6)
    assert (s["tp"], s["dp"], s["processes"]) == (2, 1, 2)
    single = runs["single"]["model_state_breakdown"][0]
    for r in s["model_state_breakdown"]:  # all but LayerNorms, positions and row biases split in two
        assert r["params"] < 0.6 * single["params"] and r["optimizer"] < 0.6 * single["optimizer"]


@pytest.mark.parametrize("strategy,source", [("fairscale_oss", "fairscale_oss"), ("fairscale_tp", "fairscale_tp"),
                                             ("fairscale_pipe", "single")])
def test_resume_continues_the_trajectory(sweep, tmp_path, strategy, source):
    """OSS: consolidated optimizer state; tp: one file per tp rank; pipe: reads single's checkpoint."""
    out, runs = sweep
    ck = out / f"{SWEEP.index(source)}_{source}" / "ck" / "step_3"
    s = train(tmp_path, "resumed", f"strategy={strategy}", *COMMON, f"checkpoint.resume={ck}")
    assert_close_trajectory(s["losses"], runs[strategy]["losses"][3:], rtol=1e-5)


@pytest.mark.slow  # over a minute on 2 busy cores; CI runs it (plain `pytest` selects every marker)
def test_bf16_follows_fp32_under_every_cpu_fairscale_strategy(sweep, tmp_path):
    """bf16 autocast (per pipeline stage for the pipe, whose stages run in worker threads)."""
    _, runs = sweep
    names = ["fairscale_oss", "fairscale_pipe", "fairscale_tp"]
    p = run_cli(tmp_path, "-m", f"strategy={','.join(names)}", *FAST, *COMMON, "train.precision=bf16",
                f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    for i, name in enumerate(names):
        s = summary(tmp_path / f"{i}_{name}")
        assert s["status"] == "ok" and s["precision"] == "bf16", (name, s["error"])
        assert s["losses"] != runs[name]["losses"], name  # really computed in bf16...
        assert_close_trajectory(s["losses"], runs[name]["losses"], rtol=2e-3)  # ...and still the same training


def _config_error(*overrides) -> str:
    """The one-line error the plan refuses these overrides with (the CLI's exit code and summary for such an
    error: test_foundation.py's contract test)."""
    from parallelkit.config.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose_plan(*overrides)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for CPU-only machines")
def test_fairscale_fsdp_on_cpu_is_a_config_error():
    err = _config_error("strategy=fairscale_fsdp")
    assert "needs a CUDA GPU" in err and "strategy=fsdp" in err and "strategy=fairscale_oss" in err


def test_wrong_pipe_balance_fails_fast():
    err = _config_error("strategy=fairscale_pipe", "strategy.balance=[1,2]")
    assert "strategy.balance=[1, 2]" in err and "4 layers" in err


@pytest.mark.parametrize("overrides,message", [
    (["strategy=fairscale_tp", "strategy.tp_size=8", "world_size=8"], "strategy.tp_size=8 does not divide model.n_head=4"),
    (["strategy=fairscale_tp", "model.vocab_size=511"], "model.vocab_size=511 is not divisible by strategy.tp_size=2"),
    (["strategy=fairscale_pipe", "strategy.chunks=3"], "strategy.chunks=3 does not divide train.micro_batch_size=2"),
    (["strategy=fairscale_pipe", "strategy.chunks=abc"], "strategy.chunks='abc': must be an integer"),
    (["strategy=fairscale_tp", "strategy.tp_size=3"], "strategy.tp_size=3 does not divide world_size=2: use strategy.tp_size=1 or 2"),
    (["strategy=fairscale_pipe", "strategy.pp_size=3", "strategy.balance=[2,2]"], "must be 3 positive layer counts"),
    (["strategy=fairscale_pipe", "strategy.pp_size=5"], "strategy.pp_size=5 is more stages than the model's 4 layers"),
])
def test_bad_layouts_are_config_errors(overrides, message):
    """The same checks as the CLI's, in-process (no start-up cost): composed config -> resolve."""
    from hydra import compose, initialize_config_dir

    from parallelkit.config.compose import open_strategy_keys
    from parallelkit.config.errors import ConfigError
    from parallelkit.runtime.plan import build_plan

    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=open_strategy_keys([*FAST, *overrides]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_plan(cfg)


@gpu
def test_fairscale_fsdp_matches_ddp_on_cuda(tmp_path):
    common = ["train.grad_accum=2", f"world_size={torch.cuda.device_count()}"]
    ddp = train(tmp_path, "ddp", "strategy=ddp", *common)
    fsdp = train(tmp_path, "fsdp", "strategy=fairscale_fsdp", *common)
    assert_close_trajectory(fsdp["losses"], ddp["losses"], rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_pipe_on_two_gpus_matches_single(tmp_path):
    common = ["world_size=2", "train.grad_accum=2"]
    ref = train(tmp_path, "single", "strategy=single", *common)
    pipe = train(tmp_path, "pipe", "strategy=fairscale_pipe", *common)
    assert_close_trajectory(pipe["losses"], ref["losses"], rtol=1e-4)
