"""python -m parallelkit.tune: candidates pruned by the config checks and the estimator, the rest measured as real
runs within the budget, a ranked table, the winner as a command; one-line config errors; Ctrl-C keeps the table."""
import csv
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, compose_plan, compose_run, run_cli

from parallelkit.advisor.tune import main

TINY = ["model=tiny", "world_size=2"]


def rows(out) -> list[dict]:
    with open(out / "tune.csv") as f:
        return list(csv.DictReader(f))


def test_tune_prunes_measures_and_names_the_fastest(tmp_path):
    from parallelkit.advisor.predict import predict
    from parallelkit.advisor.projection import refresh_plan_rates

    for name in ("ddp", "zero2", "fsdp"):  # what a first prediction measures (footprints, calibrations, and the
        plan = compose_plan(f"strategy={name}", *TINY)  # rates a tune measures again when over 2 minutes old),
        refresh_plan_rates(plan)  # done here, not in the budget, whatever ran before in this session
        predict(plan)
    out = tmp_path / "tune"
    t0 = time.monotonic()
    p = run_cli(out, *TINY, "tune.strategies=ddp,zero2,fsdp,deepspeed,neox_3d", "tune.micro_batch_sizes=[2]",
                "tune.activation_checkpointing=[false]", "tune.budget_s=25", "projection.framework=false",
                f"hydra.run.dir={out}",
                module="parallelkit.tune", timeout=300, predict=True)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert took < 25 + 45, took  # the budget, plus the report (and the start-up of this Python)
    table = rows(out)
    by = {r["candidate"]: r for r in table}
    assert by["deepspeed"]["status"] == "pruned" and by["deepspeed"]["why"] == "same as zero2"
    assert by["neox_3d"]["status"] == "pruned" and by["neox_3d"]["why"].startswith("config: strategy.tp_size")
    ok = [r for r in table if r["status"] == "ok"]
    assert ok and all(r["run"] for r in ok), table
    assert [float(r["tokens_per_s"]) for r in ok] == sorted((float(r["tokens_per_s"]) for r in ok), reverse=True)
    assert table[0] is ok[0]  # ranked: the fastest measured first
    assert all(r["status"] in ("ok", "pruned", "not run", "timeout", "failed") for r in table)
    assert all(r["why"].startswith("budget: not measured") for r in table if r["status"] == "not run")
    assert "trial 1/3: " in p.stderr and "s of budget left" in p.stderr
    # the winner: the fastest measured row, as a command line that composes to that very run
    md = (out / "tune.md").read_text()
    cmd = next(line for line in p.stdout.splitlines() if line.startswith("winner: ")).split(": ", 1)[1]
    assert f"`{cmd}`" in md
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "parallelkit.run"] and f"strategy={ok[0]['strategy']}" in args
    assert "train.micro_batch_size=2" in args and "train.global_batch_size=8" in args
    cfg = compose_run(*args[3:])
    assert cfg.strategy.name == ok[0]["strategy"] and cfg.train.grad_accum == 2
    # the measured trials got the sweep report
    assert (out / "comparison.md").exists() and (out / "comparison.csv").exists()
    # predicted and measured step time side by side, and how well the projection ordered them
    assert "pred. step" in md and "predicted vs measured step time: " in p.stdout and "predicted vs measured" in md


def test_rank_correlation():
    from parallelkit.advisor.tune import order_agreement, rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # ties: mean ranks
    assert rank_correlation([1, 2], [1, 2]) is None and rank_correlation([1, 1, 1], [1, 2, 3]) is None
    rows = [{"status": "ok", "predicted_step_time_s": p, "step_time_s": m} for p, m in ((1, 2), (2, 3), (3, 1))]
    assert order_agreement(rows) == "predicted vs measured step time: Spearman rank correlation -0.50 over 3 measured candidates"


def test_a_trial_starts_only_when_its_timeout_can_see_it_to_its_end():
    """The spread tune's ulysses mb=4 (predicted 1.87 s a step) was started with 31 s left, got train.timeout_s=21
    and was stopped after 9 of 10 steps: the budget must cover its steps at the predicted time, with the start-up
    the finished trials showed, and still leave the launch allowance the timeout keeps back."""
    from parallelkit.advisor.tune import FIRST_TRIAL_S, LAUNCH_S, STEP_MARGIN, need

    done = [{"status": "ok", "trial_s": 18.8, "step_time_s": 1.23}, {"status": "ok", "trial_s": 20.1, "step_time_s": 1.35},
            {"status": "failed", "trial_s": 3.0, "step_time_s": None}]
    ulysses = {"status": "todo", "step_time_s": None, "predicted_step_time_s": 1.87}
    got = need(ulysses, done, 10)
    beyond = (18.8 - 12.3 + 20.1 - 13.5) / 2  # start-up and end of the two that ended ok; the failed one is no guide
    assert got == pytest.approx(LAUNCH_S + beyond + 10 * 1.87 * STEP_MARGIN)
    assert got > 31 and got - LAUNCH_S >= beyond + 10 * 1.87  # not started at 31 s; started, its timeout covers it
    assert need({**ulysses, "step_time_s": 1.5}, done, 10) < got  # a re-measurement: its own measured step
    assert need({"predicted_step_time_s": None}, done, 10) == pytest.approx(18.8)  # no prediction: the median trial
    assert need(ulysses, [], 10) == FIRST_TRIAL_S


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device judges against itself")
def test_gpu_memory_plans_for_the_gpu(tmp_path, capsys):
    """With gpu_memory on a machine without CUDA, the device bytes are judged against it; budget 0: the plan only."""
    out = tmp_path / "plan"
    main(["model=gpt_1b", "world_size=2", "gpu_memory=24GB", "tune.budget_s=0", "tune.strategies=ddp,fsdp_zero3",
          "tune.activation_checkpointing=false", "projection.framework=false", f"hydra.run.dir={out}"])
    printed = capsys.readouterr().out
    by = {r["candidate"]: r for r in rows(out)}
    assert "planning for a GPU cluster" in printed, printed  # (the test skips on a CUDA machine, before running)
    assert by["ddp mb=4"]["status"] == "pruned" and "GiB available" in by["ddp mb=4"]["why"]
    assert by["fsdp_zero3 mb=1"]["status"] == "not run" and by["fsdp_zero3 mb=1"]["why"] == "budget: not measured"
    assert int(by["fsdp_zero3 mb=1"]["judged_bytes"]) < int(by["ddp mb=1"]["judged_bytes"])
    assert "winner: none" in printed and not (out / "comparison.md").exists()


@pytest.mark.parametrize("bad,key", [("tune.budgt_s=5", "tune.budgt_s: no such key"),
                                     ("tune.strategies=ddp,nope", "no such strategy nope"),
                                     ("tune.micro_batch_sizes=[0]", "tune.micro_batch_sizes"),
                                     ("strategy.zero_stage=3", "the tune searches presets"),
                                     ("model=nope", "model=nope: no such model")])
def test_bad_input_fails_in_one_line(tmp_path, capsys, bad, key):
    with pytest.raises(SystemExit) as e:
        main([*TINY, bad, f"hydra.run.dir={tmp_path / 't'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("parallelkit: config error: ") and key in err and "\n" not in err, err
    assert not (tmp_path / "t").exists()


def test_ctrl_c_stops_the_trial_and_keeps_the_table(tmp_path):
    out = tmp_path / "tune"
    proc = subprocess.Popen([sys.executable, "-m", "parallelkit.tune", *TINY, "tune.strategies=ddp,zero2",
                             "tune.micro_batch_sizes=2", "tune.activation_checkpointing=false",
                             f"hydra.run.dir={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    started = lambda: next(out.glob("01_*/config.yaml"), None)  # noqa: E731 - the run writes it once its plan is built
    deadline = time.monotonic() + 120
    while started() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started() is not None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    table = rows(out)
    assert table[0]["status"] == "interrupted" and all(r["status"] == "not run" for r in table[1:]), table
    assert all(r["why"] == "SIGINT: not measured" for r in table[1:])
    assert "winner: none" in stdout and (out / "tune.md").exists()


def test_the_winner_is_named_with_its_noise():
    """Finalists re-measured interleaved: the median ranks them, and the verdict says whether the winner's slowest
    trial still beats the runner-up's fastest."""
    from parallelkit.advisor.tune import _row, _settle, ranked, verdict

    def finalist(name, samples):
        r = _row(name, status="ok", micro_batch_size=2, activation_checkpointing=False, run="x",
                 tokens_per_s=samples[0], step_time_s=1000 / samples[0], samples=list(samples))
        return r

    close = [finalist("ddp", [1000, 1200, 1010]), finalist("zero2", [1100, 990, 1005])]
    _settle(close)
    assert [r["strategy"] for r in ranked(close)] == ["ddp", "zero2"]  # medians 1010 vs 1005, not first trials
    assert close[0]["tokens_per_s"] == 1010 and close[0]["step_time_s"] == pytest.approx(1000 / 1010)
    assert "within the noise of zero2" in verdict(close)
    apart = [finalist("ddp", [1300, 1310, 1290]), finalist("zero2", [1000, 1010, 990])]
    _settle(apart)
    assert "beyond the noise" in verdict(apart)
    single = [_row("ddp", status="ok", tokens_per_s=10.0, run="x"), _row("zero2", status="ok", tokens_per_s=9.0, run="x")]
    assert "not re-measured" in verdict(single)
