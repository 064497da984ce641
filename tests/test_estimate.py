"""The memory estimator: ZeRO / activation formulas, the CLI, and one real run to check it against."""
import json

import pytest
from conftest import FAST, run_cli, train

from parallelkit.config import ConfigError
from parallelkit.estimate import GiB, deepspeed_state, estimate_all, main, parse_bytes, stage_split

PSI_1B = 1_313_722_368  # gpt_1b: 24 layers, d_model 2048, vocab 50304, seq 1024, tied


def rows(*overrides: str) -> dict[str, dict]:
    return {r["strategy"]: r for r in estimate_all(list(overrides))["rows"]}


def test_parse_bytes_units():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("1.5 tb") == 1.5e12
    assert parse_bytes(12345) == 12345 and parse_bytes(None) is None
    for bad in ("lots", "80XB", "10iB", True, -1, "0GB"):
        with pytest.raises(ConfigError, match="gpu_memory"):
            parse_bytes(bad)


def test_zero_stages_follow_the_paper():
    psi, n = 1e9, 8
    fp32 = [deepspeed_state({"zero_stage": s}, psi, n, "fp32", {"reduce_bucket_size": 0, "overlap_comm": False,
            "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0}) for s in range(4)]
    state = [r["params"] + r["grads"] + r["optimizer"] for r in fp32]
    assert state[0] > state[1] > state[2] > state[3]
    assert state[0] == 16 * psi  # 4 + 4 + 8: no master copy in stage 0 fp32
    assert state[1] == 8 * psi + 12 * psi / n  # params + grads + (fp32 master + 2 moments) / N
    assert state[2] == 4 * psi + 16 * psi / n
    assert state[3] == 20 * psi / n  # BACKENDS.md: DeepSpeed keeps an fp32 master beside fp32 params
    bf16 = deepspeed_state({"zero_stage": 3}, psi, n, "bf16", {"reduce_bucket_size": 0, "overlap_comm": False,
                           "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0})
    assert bf16["params"] + bf16["grads"] + bf16["optimizer"] == 16 * psi / n  # (2 + 2 + 12) / N
    off = deepspeed_state({"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}, psi, n, "fp32",
                          {"reduce_bucket_size": 0, "overlap_comm": False, "stage3_max_live_parameters": 0,
                           "stage3_prefetch_bucket_size": 0})
    assert off["params"] == off["optimizer"] == off["grads"] == 0 and off["offloaded"] == 20 * psi / n


def test_gpt_1b_on_8_gpus_ballpark():
    r = rows("model=gpt_1b", "world_size=8", "train.micro_batch_size=1", "gpu_memory=80GB")
    assert abs(r["ddp"]["model_state"] / (16 * PSI_1B) - 1) < 1e-3  # ~21 GB
    assert abs(r["fsdp"]["model_state"] / (16 * PSI_1B / 8) - 1) < 1e-3  # ~2.6 GB
    assert r["ddp"]["model_state"] > r["fairscale_oss_ddp"]["model_state"] > r["fairscale_oss"]["model_state"] \
        > r["fsdp"]["model_state"]
    assert r["fsdp_zero2"]["buffers"] > r["fsdp_zero3"]["buffers"]  # zero2 keeps every gathered block
    assert r["fsdp_zero3_offload"]["model_state"] == 0 < r["fsdp_zero3_offload"]["offloaded"]
    assert r["ddp"]["configured"] and all(x["fits"] for x in r.values())
    assert 20 * GiB < r["ddp"]["total"] < 40 * GiB
    small = rows("model=gpt_1b", "world_size=8", "train.micro_batch_size=1", "gpu_memory=16GiB")
    assert not small["ddp"]["fits"] and small["fsdp"]["fits"]


def test_scaling_with_world_checkpointing_and_tp():
    w4 = rows("model=gpt_350m", "world_size=4")
    w8 = rows("model=gpt_350m", "world_size=8")
    assert w4["fsdp"]["model_state"] == pytest.approx(2 * w8["fsdp"]["model_state"], rel=1e-6)
    assert w4["ddp"]["model_state"] == w8["ddp"]["model_state"]
    ck = rows("model=gpt_350m", "world_size=8", "train.activation_checkpointing=true")
    assert ck["ddp"]["activations"] < w8["ddp"]["activations"] / 3
    if "fairscale_tp" in w8:  # tp=2 splits the block matmuls: less state and fewer activations than ddp
        assert w8["fairscale_tp"]["model_state"] < 0.6 * w8["ddp"]["model_state"]
        assert w8["fairscale_tp"]["activations"] < w8["ddp"]["activations"]
    # the configured strategy keeps its strategy.* overrides; the other presets their defaults
    z2 = rows("model=gpt_350m", "world_size=8", "strategy=fsdp", "strategy.reshard_after_forward=false")
    assert z2["fsdp"]["configured"] and z2["fsdp"]["buffers"] == w8["fsdp_zero2"]["buffers"]


def test_stage_split_balances_parameters():
    assert stage_split([1, 1, 1, 1], 2) == [2, 2]
    assert stage_split([10, 1, 1, 1, 10], 2) in ([2, 3], [3, 2])
    assert stage_split([5, 1, 1, 1, 1, 1, 5], 3) == [1, 5, 1]


def test_cli_table_json_and_one_line_errors(tmp_path, capsys):
    p = run_cli(tmp_path, "model=gpt_1b", "world_size=8", "gpu_memory=80GB", module="parallelkit.estimate")
    assert p.returncode == 0, p.stderr
    assert "1,313,722,368 params" in p.stdout and "* ddp" in p.stdout and " yes" in p.stdout
    main(["model=tiny", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["params"] == 136_960 and {"ddp", "fsdp", "single"} <= {r["strategy"] for r in rep["rows"]}
    for bad, key in (["model=nope"], "model=nope"), (["gpu_memory=lots"], "gpu_memory"), \
            (["train.micro_batch_size=0"], "train.micro_batch_size"), (["train.nokey=1"], "train.nokey"):
        with pytest.raises(SystemExit) as e:
            main(bad)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and key in err and "\n" not in err, err


def test_ddp_model_state_matches_a_real_run(tmp_path):
    s = train(tmp_path, "ddp", "strategy=ddp")
    est = rows(*FAST, "strategy=ddp")["ddp"]
    assert est["devices"] == len(s["model_state_bytes"]) == 2
    assert abs(s["model_state_bytes"][0] / est["model_state"] - 1) < 0.1, (s["model_state_bytes"], est)
