"""The foundation end to end: real worker processes (gloo), the real CLI."""
import json
import math

import pytest
from conftest import (
    FAST,
    assert_close_trajectory,
    board_scalars,
    compose_plan,
    jobs_in_one_group,
    prepare_run,
    run_cli,
    summary,
    train,
    train_ranks,
)

CONTRACT_FIELDS = {
    "status", "error", "strategy", "label", "model", "params", "world_size", "dp", "tp", "pp", "precision",
    "device", "steps", "timed_steps", "tokens_per_step", "tokens_per_s", "step_time_s", "tflops", "mfu",
    "peak_tflops", "peak_mem_bytes", "model_state_bytes", "comm_bytes_per_step", "losses", "final_loss", "versions",
}


def test_ddp_matches_single_step_by_step(tmp_path):
    common = ["train.steps=12", "train.grad_accum=2", "world_size=2"]
    ref = train_ranks(tmp_path, "single", "strategy=single", *common)
    ddp = train_ranks(tmp_path, "ddp", "strategy=ddp", *common)
    assert ref["tokens_per_step"] == ddp["tokens_per_step"]
    assert len(ref["losses"]) == 12
    assert_close_trajectory(ddp["losses"], ref["losses"], rtol=1e-5)
    assert ddp["losses"][-1] < ddp["losses"][0]


def test_cli_writes_contract_summary_and_metrics(tmp_path):
    s = train(tmp_path, "run", "strategy=ddp")
    assert CONTRACT_FIELDS <= s.keys()
    assert s["world_size"] == 2 and s["dp"] == 2 and s["timed_steps"] == 5
    assert len(s["peak_mem_bytes"]) == len(s["model_state_bytes"]) == len(s["comm_bytes_per_step"]) == 2
    # DDP holds params + grads + AdamW's two moments: 16 bytes per parameter in fp32 (tied weights once).
    assert abs(s["model_state_bytes"][0] / s["params"] - 16) < 0.5
    # every step all-reduces every gradient once: at least 4 bytes per parameter
    assert s["comm_bytes_per_step"][0] >= 4 * s["params"]
    assert 0 < s["mfu"] and s["peak_tflops"] == 1
    # the live heap's peak on the probe step, beside the RSS peak (glibc's allocator untouched by default)
    assert s["cpu_malloc"].startswith("glibc default") and 0 < min(s["live_peak_mem_bytes"])
    assert max(s["live_peak_mem_bytes"]) <= max(s["peak_mem_bytes"])
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(6))
    assert {"step", "loss", "lr", "step_time_s", "tokens_per_s", "peak_mem_bytes"} <= lines[0].keys()
    assert [r["loss"] for r in lines] == s["losses"]
    # TensorBoard's reader finds every step's loss, lr, tokens/s, memory; communication from the probe step on
    board = board_scalars(tmp_path / "run")
    assert [v for _, v in board["train/loss"]] == pytest.approx(s["losses"], rel=1e-6)
    assert [st for st, _ in board["speed/tokens_per_s"]] == list(range(6)) and board["train/lr"][0][1] > 0
    assert [v for _, v in board["comm/bytes_per_step_rank0"]] == [s["comm_bytes_per_step"][0]] * 6
    assert max(v for _, v in board["memory/peak_bytes_max_rank"]) > 0


def test_synthetic_loss_falls_well_below_ln_vocab(tmp_path):
    s = train_ranks(tmp_path, "learn", "strategy=ddp", "train.steps=150", "train.micro_batch_size=8", "optim.lr=3e-3",
              "train.untimed_steps=1")
    assert s["losses"][0] > math.log(512) - 0.3
    assert s["final_loss"] < 0.6 * math.log(512), s["losses"][-10:]


def test_bf16_trains(tmp_path):
    s = train_ranks(tmp_path, "bf16", "strategy=ddp", "train.precision=bf16", "train.steps=10", "optim.lr=3e-3")
    assert s["losses"][-1] < s["losses"][0]


def test_text_data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    s = train_ranks(tmp_path, "text", "strategy=ddp", "data=text", f"data.path={corpus}", "train.steps=10", "optim.lr=3e-3")
    assert s["losses"][-1] < s["losses"][0]


def test_checkpoint_resume_continues_the_trajectory(tmp_path):
    full = train_ranks(tmp_path, "full", "strategy=ddp", "train.steps=8")
    ck = tmp_path / "ck"
    train_ranks(tmp_path, "first", "strategy=ddp", "train.steps=8", f"checkpoint.dir={ck}", "checkpoint.every=4")
    resumed = train(tmp_path, "resumed", "strategy=ddp", "train.steps=8", f"checkpoint.resume={ck}/step_4")
    assert_close_trajectory(resumed["losses"], full["losses"][4:], rtol=1e-5)


def test_two_torchrun_agents_as_two_nodes(tmp_path):
    """Multi-node through torchrun's rendezvous: two agents (--nnodes 2) on this one machine."""
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tr"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={n}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pk-test",
         "-m", "parallelkit.run", *FAST, "strategy=ddp", f"hydra.run.dir={out}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], logs
    s = summary(out)
    assert s["status"] == "ok" and s["world_size"] == 2 and s["dp"] == 2
    local = train_ranks(tmp_path, "local", "strategy=ddp")
    assert_close_trajectory(s["losses"], local["losses"], rtol=1e-6)


def config_error(*overrides: str) -> str | None:
    """The one-line error ``python -m parallelkit.run`` gives these overrides before any worker starts, found
    in-process by the same checks in the same order (command line, then the plan), or None."""
    from parallelkit.config.compose import (
        check_group_choices,
        check_keys,
        open_strategy_keys,
    )
    from parallelkit.config.errors import ConfigError

    argv = open_strategy_keys([*FAST, *overrides])
    if (err := check_group_choices(argv) or check_keys(argv)) is not None:
        return err
    try:
        compose_plan(*overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


@pytest.mark.parametrize("override, message", [
    ("strategy=nope", "strategy=nope: no such strategy"),
    ("world_size=0", "world_size=0"),
    ("train.micro_batch_size=abc", "train.micro_batch_size"),
    ("train.global_batch_size=7", "train.global_batch_size=7 is not a multiple"),
    ("data=text data.path=/no/such/file", "data.path='/no/such/file' does not exist"),
    ("model.n_head=5", "model.n_head=5"),
    ("train.untimed_steps=6", "train.untimed_steps=6"),
    ("train.stepz=5", "train.stepz: no such key"),
    ("checkpoint.every=2", "checkpoint.every=2 needs checkpoint.dir"),
    ("train.grad_clip=nan", "train.grad_clip=nan: must be a finite number"),
    ("train.grad_clip=inf", "train.grad_clip=inf: must be a finite number"),
    ("train.grad_clip=-1", "train.grad_clip=-1"),
    ("train.tensorboard=sometimes", "train.tensorboard='sometimes': must be true or false"),
    ("train.breakdown=chrome", "train.breakdown='chrome': must be true, false, or trace"),
    ("train.breakdown=trace train.untimed_steps=1", "train.breakdown=trace profiles an untimed step after the first"),
])
def test_bad_config_is_one_line_before_any_worker(override, message):
    err = config_error(*override.split())
    assert err is not None and message in err, (override, err)


def test_a_sweep_over_a_hydra_setting_is_one_line_naming_the_key_to_sweep():
    """Hydra refuses to sweep its own settings, but only once the sweep starts (after the sweep's calibrations,
    minutes): the checks say it first, with the override that does what was meant."""
    from parallelkit.config.compose import check_keys

    err = check_keys(["-m", "hydra.sweeper.params.strategy=ddp,zero2"])
    assert err is not None and err.startswith("hydra.sweeper.params.strategy:") and "strategy=ddp,zero2" in err
    assert check_keys(["-m", "hydra.sweep.dir=/tmp/x", "strategy=ddp,zero2"]) is None  # a setting, not swept


def test_bad_config_exit_code_contract(tmp_path):
    """The CLI's side of a bad config: exit 2, one line on stderr, a failed summary, nothing of the user's lost,
    no worker started. A single run and a sweep (a misspelt key) alike."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    p = run_cli(out, *FAST, "train.grad_clip=nan", timeout=120)
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("parallelkit: config error: train.grad_clip"), err
    assert "torch.distributed.run" not in p.stderr and not (out / "metrics.jsonl").exists()
    assert (out / "keep.txt").read_text() == "user data"
    s = summary(out)
    assert s["status"] == "failed" and "train.grad_clip=nan" in s["error"]
    sweep = run_cli(tmp_path / "sweep", "-m", *FAST, "trian.steps=3", "strategy=ddp,zero2",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=120)
    err = [l for l in sweep.stderr.splitlines() if l.strip()]
    assert sweep.returncode == 2 and len(err) == 1 and "trian.steps: no such key" in err[0], err


def test_timeout_and_worker_failure_still_write_summary(tmp_path):
    p = run_cli(tmp_path / "slow", *FAST, "strategy=ddp", "train.steps=100000", "train.timeout_s=14")
    s = summary(tmp_path / "slow")
    assert p.returncode == 1 and s["status"] == "timeout" and "train.timeout_s=14" in s["error"]
    logged = [json.loads(l)["loss"] for l in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    assert s["losses"] and s["losses"] == logged[: len(s["losses"])]  # the steps it made are kept
    # a runtime failure inside the workers: divergence detected by the loop
    p = run_cli(tmp_path / "nan", *FAST, "strategy=ddp", "optim.lr=1e30", "train.grad_clip=0")
    s = summary(tmp_path / "nan")
    assert p.returncode == 1 and s["status"] == "failed" and "FloatingPointError" in s["error"], s["error"]
    assert p.stderr.strip().splitlines()[-1].startswith("parallelkit: failed:")


def test_one_rank_counts_no_communication(tmp_path):
    """DDP on one rank still calls all_reduce, but nothing leaves the process: 0 bytes."""
    s = train(tmp_path, "w1", "strategy=ddp", "world_size=1")
    assert s["world_size"] == 1 and s["comm_bytes_per_step"] == [0]


def test_probe_step_counts_what_instrumented_steps_count(tmp_path):
    """Communication counted on the untimed probe step (timed steps run the backend's own path) equals the
    per-step count of the old instrumented path, for DDP's C++ buckets and for DeepSpeed's Python calls."""
    runs = {(strategy, inst): prepare_run(tmp_path / f"{strategy}_{inst}", f"strategy={strategy}",
                                          "train.untimed_steps=2", f"train.instrument={inst}")
            for strategy in ("ddp", "zero2") for inst in ("false", "true")}
    jobs_in_one_group(2, [("train", d) for d in runs.values()])  # one spawn for the four runs
    for strategy in ("ddp", "zero2"):
        plain, inst = (summary(runs[strategy, i]) for i in ("false", "true"))
        assert plain["losses"] == inst["losses"]  # measuring changes nothing that is computed
        assert plain["measured_on"].startswith("step 2 (untimed probe step)") and "every timed step" in inst["measured_on"]
        assert plain["comm_bytes_per_step"] == inst["comm_bytes_per_step"], strategy
        assert plain["comm_bytes_per_step"][0] >= 4 * plain["params"]  # every gradient reduced once
        kinds = plain["comm_by_kind"][0]
        assert sum(k["bytes"] for k in kinds.values()) == plain["comm_bytes_per_step"][0]
    assert set(plain["comm_by_kind"][0]) == {"all_reduce", "all_gather"}  # ZeRO-2 as DeepSpeed 0.19 runs it


def test_old_untimed_step_key_still_works_with_a_note(tmp_path):
    p = run_cli(tmp_path / "old", *FAST, "train.warmup_steps=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "train.warmup_steps is deprecated" in p.stderr and "train.untimed_steps=2" in p.stderr
    s = summary(tmp_path / "old")
    assert s["timed_steps"] == 4 and s["measured_on"].startswith("step 2 ")
