"""The generated DeepSpeed config: DeepSpeed's own size constraints over every model shape (no workers), and a
real run of a shape DeepSpeed used to refuse."""
import json
import math

import pytest
import torch
from conftest import ROOT, run_cli, summary
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("deepspeed")

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # noqa: E402

from parallelkit.config import ConfigError  # noqa: E402
from parallelkit.model import GPT, GPTConfig  # noqa: E402
from parallelkit.strategies.deepspeed_config import build_config, sizes  # noqa: E402
from parallelkit.train import param_groups  # noqa: E402


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---------------------------------------------------------------- DeepSpeed's constraints on generated sizes

def shapes():
    """Every conf/model shape at several seq_lens, and odd ones (odd d_model, odd vocab, one layer, untied)."""
    models = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    out = [(m, {"seq_len": t}) for m in models for t in (64, 127, 128, 256, 257, 1024)]
    out += [("tiny", {"d_model": 65, "n_head": 5}), ("tiny", {"vocab_size": 50257}), ("tiny", {"n_layer": 1}),
            ("small", {"d_model": 255, "n_head": 5, "vocab_size": 50257, "seq_len": 99, "n_layer": 1}),
            ("tiny", {"tie_weights": False, "vocab_size": 1001, "seq_len": 33})]
    return out


def group_numels(c: GPTConfig) -> list[list[int]]:
    """Parameter sizes of train.param_groups (decay, no decay) for a GPT of shape ``c``, in model order."""
    d, V, T = c.d_model, c.vocab_size, c.seq_len
    decay = [V * d, *[n for _ in range(c.n_layer) for n in (3 * d * d, d * d, 4 * d * d, 4 * d * d)]]
    no_decay = [T * d, *[n for _ in range(c.n_layer) for n in (d, d, 3 * d, d, d, d, 4 * d, d)], d, d]
    return [decay + ([] if c.tie_weights else [V * d]), no_decay]


def sub_group_partitions(groups: list[list[int]], dp: int, sub_group: int) -> int:
    """The largest optimizer sub-group's partition on one rank, grouped as DeepSpeed's
    stage3._create_fp16_sub_groups does (per param group; each parameter padded to a multiple of dp)."""
    largest = 0
    for group in groups:
        numels = [math.ceil(n / dp) for n in group]
        if sub_group >= sum(numels):
            largest = max(largest, sum(numels))
            continue
        acc = 0
        for n in numels:
            acc += n
            if acc >= sub_group:
                largest, acc = max(largest, acc), 0
        largest = max(largest, acc)
    return largest


def test_group_numels_are_the_models():
    for c in (GPTConfig(), GPTConfig(n_layer=1, d_model=65, n_head=5, vocab_size=1001, seq_len=33, tie_weights=False)):
        groups = param_groups(GPT(c), 0.1)
        assert group_numels(c) == [[p.numel() for p in g["params"]] for g in groups]


def test_generated_sizes_meet_deepspeeds_constraints():
    """No shape, seq_len, world size or memory may give a size DeepSpeed refuses: an odd allgather bucket
    (stage 1/2 assert), a non-positive reduce bucket, a non-integer, a field its config model rejects, or an
    NVMe parameter buffer smaller than a parameter or the largest optimizer sub-group's partition."""
    base = {s: compose_cfg("strategy=zero3_offload" if s == 3 else f"strategy=zero{s}") for s in (1, 2, 3)}
    checked = 0
    for model, change in shapes():
        m = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml"), change)
        c = GPTConfig.from_cfg(m)
        groups = group_numels(c)
        biggest = max(max(g) for g in groups)
        for stage, cfg in base.items():
            cfg = cfg.copy()
            cfg.model = m
            for ws in (1, 2, 3, 8):
                cfg.world_size = ws
                for mem in (None, 2**30, 12 * 2**30, 2**40):
                    z = sizes(cfg, mem)
                    assert all(isinstance(v, int) and v > 0 for v in z.values()), (model, change, z)
                    assert z["bucket"] % 2 == 0 and z["prefetch"] % 2 == 0, (model, change, z)
                    assert z["param_buffer"] >= biggest, (model, change, z)  # one whole parameter per NVMe buffer
                    assert z["param_buffer"] >= sub_group_partitions(groups, ws, z["sub_group"]), (model, change, ws, z)
                zero = build_config(cfg)[0]["zero_optimization"]
                assert zero["allgather_bucket_size"] % 2 == 0 and zero["reduce_bucket_size"] > 0
                DeepSpeedZeroConfig(**zero)  # DeepSpeed's own validation of the section
                checked += 1
    assert checked == len(shapes()) * 3 * 4


def test_odd_user_bucket_is_one_line():
    cfg = compose_cfg("strategy=zero2", "world_size=2", "strategy.config={zero_optimization: {allgather_bucket_size: 14105}}")
    with pytest.raises(ConfigError) as e:
        build_config(cfg)
    assert "allgather_bucket_size=14105" in str(e.value) and "multiple of 2" in str(e.value)


def test_zero2_trains_where_the_bucket_used_to_be_odd(tmp_path):
    """tiny at seq_len 128 has 141,056 parameters: params // 10 = 14,105, which DeepSpeed refused after the
    workers had started (allgather_bucket_size must be a multiple of 2)."""
    assert GPTConfig(seq_len=128).num_params() // 10 % 2 == 1
    out = tmp_path / "z2"
    p = run_cli(out, "strategy=zero2", "model=tiny", "model.seq_len=128", "world_size=2", "train.steps=3",
                "train.warmup_steps=1", "train.micro_batch_size=2", "peak_tflops=1")
    assert p.returncode == 0, p.stderr[-3000:]
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["allgather_bucket_size"] % 2 == 0 and summary(out)["status"] == "ok"
