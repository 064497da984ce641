"""Checkpoints: atomic saves (rank 0 killed mid-save), resume choices, native export, checks before launch."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import (
    FAST,
    START,
    assert_close_trajectory,
    compose_plan,
    compose_run,
    run_cli,
    train_ranks,
)

from parallelkit.config.errors import ConfigError
from parallelkit.config.resume import DirLock

DDP = ["strategy=ddp", "train.steps=6"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """ddp, 6 steps, a portable checkpoint every 2: the straight trajectory and step_2, step_4, step_6."""
    tmp = tmp_path_factory.mktemp("ddp")
    s = train_ranks(tmp, "run", *DDP, f"checkpoint.dir={tmp / 'ck'}", "checkpoint.every=2")
    assert len(s["save_peak_mem_bytes"]) == 2 and min(s["save_peak_mem_bytes"]) > 0  # the saves' peak, apart
    return s["losses"], tmp / "ck"


def _dying_main(rank: int, run_dir: str, crash_step: int) -> None:
    """A rank of a real run whose rank 0 is SIGKILLed after writing part of step ``crash_step``'s files."""
    from safetensors.torch import save_file

    from parallelkit.checkpoint import format as checkpoint
    from parallelkit.config.plan import RunPlan
    from parallelkit.runtime.loop import worker

    whole = checkpoint.write_portable

    def write_half_then_die(path: Path, model: dict, optim: dict) -> None:
        if path.name.startswith(f"step_{crash_step}."):
            save_file(model, str(path / "model.safetensors"))
            os.kill(os.getpid(), signal.SIGKILL)
        whole(path, model, optim)

    if rank == 0:
        checkpoint.write_portable = write_half_then_die
    worker(RunPlan.load(Path(run_dir)), Path(run_dir))
    sys.stdout.flush()
    os._exit(0)


def test_rank0_killed_mid_save_leaves_the_step_refused_and_the_previous_one_resumes(tmp_path, ddp_run):
    from parallelkit.runtime.processes import spawn

    losses, _ = ddp_run
    ck, run = tmp_path / "ck", tmp_path / "run"
    compose_plan(*DDP, f"checkpoint.dir={ck}", "checkpoint.every=2").save(run)
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        spawn(_dying_main, 2, str(run), 4, timeout=600, start_method=START)
    partial = ck / "step_4.incomplete"
    assert (ck / "step_2" / "complete").is_file() and not (ck / "step_4").exists()
    assert (partial / "model.safetensors").is_file() and not (partial / "complete").exists()
    for resume, says in ((partial, "is incomplete"), (ck / "step_4", "was never completed")):
        with pytest.raises(ConfigError) as e:
            compose_run(*DDP, f"checkpoint.resume={resume}")
        assert says in str(e.value) and str(ck / "step_2") in str(e.value) and "\n" not in str(e.value)
    resumed = train_ranks(tmp_path, "resumed", *DDP, f"checkpoint.resume={ck}")  # the folder: its newest complete step
    assert_close_trajectory(resumed["losses"], losses[2:], rtol=1e-5)


def test_resume_with_fewer_steps_left_than_untimed_steps(tmp_path, ddp_run, capsys):
    losses, ck = ddp_run
    s = train_ranks(tmp_path, "short", *DDP, "train.untimed_steps=3", f"checkpoint.resume={ck / 'step_4'}")
    assert s["timed_steps"] == 1 and s["step_time_s"] > 0
    assert_close_trajectory(s["losses"], losses[4:], rtol=1e-5)
    assert "leaves 2 step(s)" in capsys.readouterr().err


def test_resume_latest_and_a_longer_schedule_is_said(ddp_run, capsys):
    _, ck = ddp_run
    cfg = compose_run(*DDP, f"checkpoint.dir={ck}", "checkpoint.resume=latest", "train.steps=10")
    assert cfg.checkpoint.resume == str(ck / "step_6")
    notes = [l for l in capsys.readouterr().err.splitlines() if "schedule differs" in l]
    assert len(notes) == 1 and "train.steps=10 (the original run planned 6)" in notes[0]


def test_checkpoint_dir_in_use_by_a_live_run_is_refused(tmp_path):
    lock = DirLock(tmp_path / "ck").acquire(Path("elsewhere"))
    try:
        p = run_cli(tmp_path / "run", *FAST, f"checkpoint.dir={tmp_path / 'ck'}",
                    "checkpoint.every=1", timeout=120)
    finally:
        lock.release()
    assert p.returncode == 2 and "is in use by another live run" in p.stderr and f"pid {os.getpid()}" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_native_checkpoint_exports_and_resumes_under_another_strategy(tmp_path):
    """A ZeRO-3 native checkpoint (each rank's DeepSpeed shards) -> python -m parallelkit.export -> ddp resumes it."""
    common = ["train.steps=8", "world_size=2"]
    z3 = train_ranks(tmp_path, "z3", "strategy=zero3", *common, f"checkpoint.dir={tmp_path / 'ck'}",
                     "checkpoint.every=3", "checkpoint.format=native")
    native = tmp_path / "ck" / "step_3"
    assert (native / "deepspeed").is_dir() and not (native / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="is a native zero3 checkpoint.*python -m parallelkit.export"):
        compose_run("strategy=ddp", *common, f"checkpoint.resume={native}")
    p = run_cli(tmp_path, str(tmp_path / "ck"), module="parallelkit.export")  # the dir: its newest step (step_6)
    assert p.returncode == 0 and "checkpoint.resume=" in p.stdout, p.stderr[-3000:]
    assert (tmp_path / "ck" / "step_6_portable" / "complete").is_file()
    s = train_ranks(tmp_path, "ddp", "strategy=ddp", *common, f"checkpoint.resume={tmp_path / 'ck' / 'step_6_portable'}")
    assert_close_trajectory(s["losses"], z3["losses"][6:], rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["checkpoint.every=abc"], "checkpoint.every='abc': must be an integer >= 0"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be an integer >= 0"),
    (["checkpoint.every=2"], "checkpoint.every=2 needs checkpoint.dir"),
    (["checkpoint.format=zip"], "checkpoint.format='zip': choose portable"),
    (["checkpoint.resume=latest"], "checkpoint.resume=latest needs checkpoint.dir"),
    (["checkpoint.resume={file}"], "is a file, not a checkpoint"),
    (["checkpoint.resume={empty}"], "holds no checkpoint (no complete step_N folder)"),
    (["checkpoint.dir={file}", "checkpoint.every=1"], "is a file: give a folder"),
    (["data=text", "data.path={file}"], "is empty; one sequence needs model.seq_len + 2 = 66 bytes"),
    (["data=text", "data.path={short}"], "holds 65 bytes; one sequence needs model.seq_len + 2 = 66 bytes"),
    (["data=text", "data.path={empty}"], "is an empty folder"),
])
def test_bad_checkpoint_and_data_options_refused_before_launch(tmp_path, overrides, message):
    paths = {"file": tmp_path / "empty.txt", "short": tmp_path / "short.txt", "empty": tmp_path / "nothing"}
    paths["file"].write_text("")
    paths["short"].write_text("x" * 65)
    paths["empty"].mkdir()
    with pytest.raises(ConfigError) as e:
        compose_run(*[o.format(**paths) for o in overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_of_another_model_or_with_nothing_left_is_refused(ddp_run):
    _, ck = ddp_run
    with pytest.raises(ConfigError, match=r"is of another model: model.d_model=32 \(checkpoint: 64\)"):
        compose_run(*DDP, "model.d_model=32", f"checkpoint.resume={ck / 'step_2'}")
    with pytest.raises(ConfigError, match="is at step 6 and train.steps=6 leaves nothing to train"):
        compose_run(*DDP, f"checkpoint.resume={ck / 'step_6'}")
