"""torch.distributed.pipelining (strategy=torch_pipe) against single, on gloo processes; its checkpoints
(portable across layouts and strategies, native in place); its config errors; the report's pipeline columns."""
from __future__ import annotations

import pytest
from conftest import assert_close_trajectory, compose_plan, compose_run, train_ranks
from test_report import rows, write_run

from parallelkit.config.errors import ConfigError
from parallelkit.config.plan import RunPlan, options_dict, planned_strategy  # noqa: F401
from parallelkit.report.compare import write_report
from parallelkit.runtime.plan import build_plan  # noqa: F401
from parallelkit.strategies.shared.memory_model import in_flight

# 4 blocks (6 layers: 4 stages for interleaving), 2 micro-batches of 4 per pipeline, clipping active (the
# gradient norm starts near 1.3), 6 steps; every run at the same global batch of 8 as single.
PARITY = ["model.n_layer=4", "train.global_batch_size=8", "train.micro_batch_size=4", "train.grad_clip=0.5",
          "train.timeout_s=120"]
PIPE = ["strategy=torch_pipe", *PARITY]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_ranks(tmp_path_factory.mktemp("single"), "single", "strategy=single", *PARITY)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """1f1b, a portable checkpoint at step 3 (saving must not change the trajectory)."""
    tmp = tmp_path_factory.mktemp("1f1b")
    s = train_ranks(tmp, "1f1b", *PIPE, "strategy.schedule=1f1b", f"checkpoint.dir={tmp / 'ck'}", "checkpoint.every=3")
    return s, tmp / "ck" / "step_3"


def _check_pipeline(s: dict, single: dict, chunks: int) -> None:
    f, cfg = s["strategy_facts"], compose_run(*PIPE, f"strategy.schedule={s['strategy_facts']['schedule']}")
    assert s["global_batch"] == single["global_batch"] == 8 and f["micro_batches"] == 2 and f["pp"] == 2
    assert_close_trajectory(s["losses"], single["losses"], rtol=1e-5)
    assert len(f["balance"]) == 2 * chunks and sum(f["balance"]) == 6 and f["stage_of_rank"] == [0, 1]
    assert f["bubble_estimate"] == pytest.approx(1 / (chunks * 2 + 1), abs=1e-4) and len(f["stage_idle_share"]) == 2
    # activations and their gradients, point to point: 2 micro-batches x (forward + backward) x chunks,
    # each 4 x 64 x 64 fp32, on every rank; the tied weight's gradient all-reduced (512 x 64 fp32)
    p = RunPlan.of(cfg)
    want = p.cls.comm(cfg, p.opts, p.layout)  # the busiest rank: here both send and receive the same
    assert want["send_recv"] >= 2 * 2 * chunks * 4 * 64 * 64 * 4 and want["all_reduce"] >= 512 * 64 * 4
    for kinds in s["comm_by_kind"]:
        assert set(kinds) == set(want) and kinds["all_reduce"]["bytes"] == want["all_reduce"], (kinds, want)
        extra = kinds["send_recv"]["bytes"] - want["send_recv"]  # pipelining's own small messages (see comm())
        assert 0 <= extra <= 4 * kinds["send_recv"]["calls"], (kinds, want)
    # the memory model's state per stage (the last stage also holds the head's copy and its moments),
    # against the bytes each rank holds (AdamW's scalar step counters aside)
    p = RunPlan.of(cfg)
    cls, o, lay = p.cls, p.opts, p.layout
    want = [st["params"] + st["grads"] + st["optimizer"] for st in cls.memory(cfg, o, lay, None)["stages"]]
    assert s["model_state_bytes"] == pytest.approx(want, rel=1e-3)


def test_1f1b_matches_single(single, ckpt):
    _check_pipeline(ckpt[0], single, chunks=1)


def test_gpipe_matches_single(tmp_path, single):
    _check_pipeline(train_ranks(tmp_path, "gpipe", *PIPE, "strategy.schedule=gpipe"), single, chunks=1)


def test_interleaved_1f1b_matches_single_and_resumes_natively(tmp_path, single):
    """Two stages per rank; a native checkpoint (torch.distributed.checkpoint per stage) resumed in place."""
    run = [*PIPE, "strategy.schedule=interleaved_1f1b", "strategy.stages_per_rank=2"]
    s = train_ranks(tmp_path, "interleaved", *run, f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=3",
                    "checkpoint.format=native")
    _check_pipeline(s, single, chunks=2)
    assert s["label"] == "torch pipe interleaved_1f1b pp2 v2"
    resumed = train_ranks(tmp_path, "resumed", *run, f"checkpoint.resume={tmp_path / 'ck' / 'step_3'}")
    assert_close_trajectory(resumed["losses"], single["losses"][3:], rtol=1e-5)


@pytest.mark.slow
def test_pp2_x_fsdp_dp2_matches_single(tmp_path, single):
    """4 processes: two pipelines, each stage's parameters sharded over its two data-parallel copies."""
    s = train_ranks(tmp_path, "pp2dp2", *PIPE, "world_size=4", "train.micro_batch_size=2", "strategy.dp_mode=fsdp")
    f = s["strategy_facts"]
    assert (f["pp"], f["dp"], f["micro_batches"], f["stage_of_rank"]) == (2, 2, 2, [0, 0, 1, 1])  # the layout's rank map: pp slowest
    assert_close_trajectory(s["losses"], single["losses"], rtol=1e-5)
    assert {"all_gather", "reduce_scatter", "send_recv"} <= set(s["comm_by_kind"][0])
    assert max(s["model_state_bytes"]) < 0.55 * max(single["model_state_bytes"])


def test_portable_checkpoint_resumes_on_pp2_x_ddp_dp2_and_under_single(tmp_path, single, ckpt):
    """The pp2 run's portable checkpoint (single-process names) resumed by two DDP pipelines on 4 processes,
    and by single."""
    s = train_ranks(tmp_path, "resumed", *PIPE, "world_size=4", "train.micro_batch_size=2", f"checkpoint.resume={ckpt[1]}")
    assert s["strategy_facts"]["dp_mode"] == "ddp" and s["dp"] == 2
    assert_close_trajectory(s["losses"], single["losses"][3:], rtol=1e-5)
    one = train_ranks(tmp_path, "single", "strategy=single", *PARITY, f"checkpoint.resume={ckpt[1]}")
    assert_close_trajectory(one["losses"], single["losses"][3:], rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["world_size=3"], "strategy.pp_size=2 does not divide world_size=3: use strategy.pp_size=1 or 3"),
    (["strategy.schedule=interleaved_1f1b", "strategy.stages_per_rank=3"],
     "strategy.pp_size x stages_per_rank = 2 x 3 = 6 stages is more than the model's 4 layers"),
    (["strategy.schedule=zigzag"], "strategy.schedule='zigzag': choose one of gpipe, 1f1b, interleaved_1f1b"),
    (["train.grad_accum=1"], "strategy.schedule=1f1b needs at least strategy.pp_size=2 micro-batches per step"),
    (["strategy.schedule=interleaved_1f1b", "train.grad_accum=5"],
     "strategy.schedule=interleaved_1f1b runs micro-batches in rounds of strategy.pp_size=2"),
    (["strategy.schedule=gpipe", "strategy.stages_per_rank=2"], "strategy.stages_per_rank=2 needs strategy.schedule="),
    (["strategy.dp_mode=zero"], "strategy.dp_mode='zero': choose one of ddp, fsdp"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_run("strategy=torch_pipe", *overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_estimate_gives_every_stage_and_the_largest():
    from parallelkit.advisor.estimate import estimate

    gpipe, one = (estimate(compose_plan(*PIPE, f"strategy.schedule={k}", "train.global_batch_size=32"))
                  for k in ("gpipe", "1f1b"))
    assert len(gpipe["stage_totals"]) == 2 and gpipe["total"] == max(gpipe["stage_totals"])
    assert one["activations"] < gpipe["activations"]  # 1F1B keeps at most pp micro-batches, GPipe all 8


def test_activations_in_flight_follow_the_schedule():
    m, p = 8, 4
    assert [in_flight("gpipe", m, p, i) for i in range(p)] == [8] * 4
    assert [in_flight("1f1b", m, p, i) for i in range(p)] == [4, 3, 2, 1]  # the warm-up depth
    assert [in_flight("interleaved_1f1b", m, p, i, v=2) for i in range(p)] == [11, 9, 7, 5]  # chunks, not batches


def test_report_shows_layout_schedule_bubble_stage_memory_and_p2p(tmp_path):
    mib = 2**20
    write_run(tmp_path, "0_single", strategy="single", label="single", world_size=1, dp=1, processes=1)
    write_run(tmp_path, "1_ddp", comm_by_kind=[{"all_reduce": {"calls": 1, "bytes": 547840}}] * 2)
    write_run(tmp_path, "2_pipe", strategy="torch_pipe", label="torch pipe 1f1b pp2 x ddp dp2", world_size=4, dp=2,
              pp=2, processes=4, peak_mem_bytes=[300 * mib, 420 * mib, 310 * mib, 400 * mib],
              model_state_bytes=[1, 2, 1, 2], model_state_breakdown=[{"params": 1}] * 4, comm_bytes_per_step=[9] * 4,
              comm_by_kind=[{"send_recv": {"calls": 6, "bytes": 3 * mib}, "all_reduce": {"calls": 3, "bytes": mib}}] * 4,
              strategy_facts={"schedule": "1f1b", "micro_batches": 4, "pp": 2, "dp": 2, "stages_per_rank": 1,
                              "bubble_estimate": 0.2, "balance": [3, 3], "stage_of_rank": [0, 1, 0, 1],
                              "stage_idle_share": [0.25, 0.4]})
    r = rows(tmp_path)
    pipe = r["2_pipe"]
    assert pipe["peak_mem_by_stage"] == [310 * mib, 420 * mib] and pipe["bubble_estimate"] == 0.2
    assert (pipe["comm_p2p_bytes"], pipe["comm_collective_bytes"]) == (3 * mib, mib)
    assert r["1_ddp"]["comm_p2p_bytes"] == 0 and not isinstance(r["0_single"]["schedule"], str)
    md = write_report(tmp_path, echo=False).read_text()
    head = next(line for line in md.splitlines() if line.startswith("| #"))
    for col in ("world/dp/tp/pp", "pipeline schedule", "bubble: est. (idle by stage)", "peak mem by stage",
                "comm p2p / collectives"):
        assert col in head, head
    line = next(line for line in md.splitlines() if "torch pipe" in line and line.startswith("|"))  # its table row
    for text in ("4/2/1/2", "1f1b m=4", "20% (25% / 40%)", "310 MiB / 420 MiB", "3 MiB / 1 MiB"):
        assert text in line, line
    assert "| 0 / 535 KiB " in next(line for line in md.splitlines() if "| ddp" in line)  # collectives only
    assert "(p-1)/(m+p-1)" in md and (tmp_path / "comm.png").is_file()
    # without a pipeline the report has none of these columns and no comm.png
    (tmp_path / "2_pipe" / "summary.json").unlink()
    md = write_report(tmp_path, echo=False).read_text()
    assert "pipeline schedule" not in md and "p2p" not in md and not (tmp_path / "comm.png").exists()
