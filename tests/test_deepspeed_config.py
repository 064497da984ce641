"""The generated DeepSpeed config and a user's DeepSpeed JSON: DeepSpeed's own size constraints over every
model shape, adoption of the JSON (no workers), and a few real runs through the CLI."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, summary
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("deepspeed")

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # noqa: E402

from parallelkit.config.compose import (
    explicit_keys,  # noqa: E402
    open_strategy_keys,  # noqa: E402
)
from parallelkit.config.errors import ConfigError  # noqa: E402
from parallelkit.models.gpt import GPT, GPTConfig  # noqa: E402
from parallelkit.runtime.plan import build_plan  # noqa: E402
from parallelkit.strategies.deepspeed.config import (  # noqa: E402
    adopt_user_config,
    build_config,
    sizes,
)
from parallelkit.strategies.deepspeed.zero import DeepSpeedStrategy  # noqa: E402
from parallelkit.strategies.shared.optim import param_groups  # noqa: E402

# The JSON of the DeepSpeed-vs-FairScale talk: written for 2 GPUs x micro-batch 4 x accumulation 2, fp16,
# ZeRO-2 with both offloads (DeepSpeed ignores offload_param below stage 3), its own AdamW and scheduler.
TALK = {
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupDecayLR",
                  "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000, "total_num_steps": 10000}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                          "overlap_comm": True, "contiguous_gradients": True},
    "fp16": {"enabled": True}, "gradient_clipping": 1.0,
}


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        return compose("config", overrides=open_strategy_keys(list(overrides)))


# ---------------------------------------------------------------- DeepSpeed's constraints on generated sizes

def shapes():
    """Every conf/model shape at several seq_lens, and odd ones (odd d_model, odd vocab, one layer, untied)."""
    models = sorted(p.stem for p in (ROOT / "parallelkit" / "conf" / "model").glob("*.yaml")
                    if "arch: hf" not in p.read_text())  # a Hugging Face model's shape is its folder's
    out = [(m, {"seq_len": t}) for m in models for t in (64, 127, 128, 256, 257, 1024)]
    out += [("tiny", {"d_model": 65, "n_head": 5}), ("tiny", {"vocab_size": 50257}), ("tiny", {"n_layer": 1}),
            ("small", {"d_model": 255, "n_head": 5, "vocab_size": 50257, "seq_len": 99, "n_layer": 1}),
            ("tiny", {"tie_weights": False, "vocab_size": 1001, "seq_len": 33})]
    return out


def group_numels(m) -> list[list[int]]:
    """Parameter sizes of train.param_groups (decay, no decay) of the model ``m`` (built on the meta device), in
    model order: what DeepSpeed groups."""
    from parallelkit.models.gpt import build_model
    from parallelkit.strategies.shared.optim import param_groups

    model = build_model(m, 0, device="meta", init=False)
    return [[p.numel() for p in g["params"]] for g in param_groups(model, 0.1)]


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
        assert group_numels(OmegaConf.create(dataclasses.asdict(c))) == [[p.numel() for p in g["params"]] for g in groups]


def test_generated_sizes_meet_deepspeeds_constraints():
    """No shape, seq_len, world size or memory may give a size DeepSpeed refuses: an odd allgather bucket
    (stage 1/2 assert), a non-positive reduce bucket, a non-integer, a field its config model rejects, or an
    NVMe parameter buffer smaller than a parameter or the largest optimizer sub-group's partition."""
    base = {s: compose_cfg("strategy=zero3_offload" if s == 3 else f"strategy=zero{s}") for s in (1, 2, 3)}
    checked = 0
    for model, change in shapes():
        m = OmegaConf.merge(OmegaConf.load(ROOT / "parallelkit" / "conf" / "model" / f"{model}.yaml"), change)
        groups = group_numels(m)
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
                "train.untimed_steps=1", "train.micro_batch_size=2", "peak_tflops=1")
    assert p.returncode == 0, p.stderr[-3000:]
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["allgather_bucket_size"] % 2 == 0 and summary(out)["status"] == "ok"


# ---------------------------------------------------------------- a user's DeepSpeed JSON: adoption, no workers

def adopt(tmp_path, *overrides: str, ds: dict | None = None, strategy: str = "deepspeed"):
    """The run's config as run.task() resolves it: composed, world_size 2, the JSON adopted, checked."""
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(TALK if ds is None else ds))
    given = [f"strategy={strategy}", f"strategy.config_file={f}", "world_size=2", *overrides]
    return build_plan(compose_cfg(*given), explicit=explicit_keys(given, strategy)).cfg


def test_explicit_keys_of_overrides_and_presets():
    keys = explicit_keys(["train.steps=3", "+train.x=1", "++optim.lr=2", "~checkpoint.dir", "strategy.config={a: 1}"])
    assert keys == {"train.steps", "train.x", "optim.lr", "strategy.config"}
    assert explicit_keys(["strategy=deepspeed"], "deepspeed") == {"strategy"}  # the base preset chooses nothing
    assert explicit_keys([], "zero3") == {"strategy.zero_stage"}
    assert explicit_keys([], "zero3_nvme") >= {"strategy.zero_stage", "strategy.offload_optimizer",
                                               "strategy.offload_param", "strategy.nvme_path"}
    assert explicit_keys([], "ddp") == set()


def test_talk_json_is_adopted_with_a_bf16_override(tmp_path, capsys):
    cfg = adopt(tmp_path, "train.precision=bf16")
    t, s = cfg.train, cfg.strategy
    assert (s.zero_stage, s.offload_optimizer, s.offload_param) == (2, "cpu", "none")
    assert (t.micro_batch_size, t.grad_accum, t.precision, t.grad_clip) == (4, 2, "bf16", 1.0)
    assert cfg.optim.lr == 0.001 and list(cfg.optim.betas) == [0.8, 0.999] and cfg.optim.warmup_steps == 1000
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("parallelkit:")]
    assert len(lines) == 1, lines
    line = lines[0]
    for part in ("adopted zero_stage=2, offload_optimizer=cpu, micro_batch_size=4, grad_accum=2",
                 "overridden fp16 by train.precision=bf16", "ignored offload_param=cpu (stage 2",
                 "scheduler WarmupDecayLR (translated: optim.warmup_steps=1000, optim.lr=0.001"):
        assert part in line, line
    ds, _ = build_config(cfg)  # what DeepSpeed gets agrees with the run
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "offload_param" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "scheduler" not in ds


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a CUDA GPU")
def test_fp16_json_on_cpu_names_the_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        adopt(tmp_path)
    msg = str(e.value)
    assert "fp16" in msg and "train.precision=bf16" in msg and "\n" not in msg


def test_command_line_wins_over_the_file(tmp_path):
    """An explicit override is a choice, not a contradiction: stage 3 (also as the zero3 preset) wins over the
    file's 2, and the file's offload_param then applies; the file's scheduler peak gives way to optim.lr."""
    for cfg in (adopt(tmp_path, "train.precision=bf16", "strategy.zero_stage=3", "optim.lr=3e-3"),
                adopt(tmp_path, "train.precision=bf16", "optim.lr=3e-3", strategy="zero3")):
        assert (cfg.strategy.zero_stage, cfg.strategy.offload_param, cfg.optim.lr) == (3, "cpu", 3e-3)
        ds, _ = build_config(cfg)
        assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
        DeepSpeedStrategy.check(cfg, DeepSpeedStrategy.options(cfg))
    cfg = adopt(tmp_path, "train.precision=fp32", "train.micro_batch_size=2")  # accumulation follows
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.precision) == (2, 4, "fp32")
    assert build_config(cfg)[0]["train_batch_size"] == 16


def test_strategy_config_overrides_the_file(tmp_path):
    cfg = adopt(tmp_path, "strategy.config={fp16: {enabled: false}, zero_optimization: {stage: 1}}")
    assert (cfg.train.precision, cfg.strategy.zero_stage) == ("fp32", 1)
    ds, _ = build_config(cfg)
    assert ds["fp16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("overrides, words", [
    (["train.precision=bf16", "train.micro_batch_size=3"], ["train_batch_size=16", "train.micro_batch_size x dp = 3 x 2",
                                                             "train.micro_batch_size=2"]),
    (["train.precision=bf16", "train.grad_accum=1"], ["train_batch_size=16", "4 x 1 x 2 = 8", "train.grad_accum"]),
    (["train.precision=fp32", "strategy.config={bf16: {enabled: true}}"], ["bf16.enabled", "train.precision=fp32"]),
    (["train.precision=bf16", "world_size=3"], ["train_batch_size=16", "4 x 3 = 12"]),
])
def test_real_contradictions_are_one_line(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as e:
        adopt(tmp_path, *overrides)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_a_json_without_batch_or_precision_changes_only_what_it_says(tmp_path):
    cfg = adopt(tmp_path, "train.micro_batch_size=2", ds={"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5})
    assert (cfg.strategy.zero_stage, cfg.train.grad_clip, cfg.train.micro_batch_size, cfg.train.grad_accum,
            cfg.train.precision) == (1, 0.5, 2, 1, "fp32")
    assert adopt_user_config(compose_cfg("strategy=ddp"), set()) == []


def test_estimate_adopts_the_json(tmp_path):
    """python -m parallelkit.estimate composes without Hydra's runtime: the overrides it was given are explicit."""
    from parallelkit.advisor.estimate import estimate_all

    f = tmp_path / "ds.json"
    f.write_text(json.dumps(TALK))
    rep = estimate_all(["strategy=deepspeed", f"strategy.config_file={f}", "train.precision=bf16", "world_size=2",
                        "projection.framework=false", "projection.device=H100"])  # a data sheet's step time: no
    # CPU rates measured for every preset in bf16 (40 s), which this test does not read
    row = next(r for r in rep["rows"] if r["configured"])
    assert rep["micro_batch_size"] == 4 and rep["precision"] == "bf16" and row["offloaded"] > 0


# ---------------------------------------------------------------- the talk's JSON through the real CLI

def talk_run(tmp_path: Path, *overrides: str):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(TALK))
    out = tmp_path / "run"
    return out, run_cli(out, "strategy=deepspeed", f"strategy.config_file={f}", "model=tiny", "world_size=2",
                        "train.steps=4", "train.untimed_steps=1", "peak_tflops=1", *overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a CUDA GPU")
def test_talk_json_fp16_on_cpu_fails_before_workers(tmp_path):
    with pytest.raises(ConfigError) as e:  # refused by the plan, before any worker
        adopt(tmp_path, "world_size=2", "train.steps=4", ds=TALK)
    assert "fp16" in str(e.value) and "train.precision=bf16" in str(e.value) and "\n" not in str(e.value)


def test_talk_json_runs_as_written_with_bf16(tmp_path):
    out, p = talk_run(tmp_path, "train.precision=bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    adopted = [line for line in p.stderr.splitlines() if line.startswith("parallelkit: strategy.config_file")]
    assert len(adopted) == 1 and "overridden fp16 by train.precision=bf16" in adopted[0], p.stderr[-3000:]
    s = summary(out)
    assert s["status"] == "ok" and (s["micro_batch_size"], s["grad_accum"], s["world_size"]) == (4, 2, 2)
    f = s["strategy_facts"]
    assert (f["zero_stage"], f["offload_optimizer"], f["offload_param"]) == (2, "cpu", "none")
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
