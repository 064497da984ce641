"""The step-time projection (projection.py), the collective benchmark (bench_comm.py) and estimate's columns."""
import json
import math
import time

import pytest
import torch
from conftest import compose_run

from parallelkit.advisor import bench_comm
from parallelkit.advisor.estimate import main
from parallelkit.advisor.projection import SHORT_GAP_S, comm_seconds, group_size, project
from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.measure import calibrate
from parallelkit.models.gpt import GPTConfig
from parallelkit.util.devices import CUDA_PEAK_TFLOPS

A, B = 5e-6, 10e9  # 5 us, 10 GB/s
LINK = ["projection.latency_us=5", "projection.bandwidth_GBps=10"]


def test_alpha_beta_costs_by_hand():
    n, s, one = 4, 1e8, 2**40  # one message: the textbook formulas
    t = comm_seconds({"all_reduce": s, "all_gather": s, "reduce_scatter": s, "broadcast": s, "send_recv": s},
                     n, A, B, bucket=one)
    assert t["all_reduce"] == pytest.approx(2 * 3 * 5e-6 + 1.5 * 1e8 / 1e10)
    assert t["all_gather"] == t["reduce_scatter"] == pytest.approx(3 * 5e-6 + 0.75 * 1e8 / 1e10)
    assert t["broadcast"] == pytest.approx(2 * 5e-6 + 1e8 / 1e10)  # ceil(log2 4) = 2
    assert t["send_recv"] == pytest.approx(5e-6 + 1e8 / 1e10)
    # the default: 25 MiB messages, each paying the latency (1e8 bytes: 4 of them)
    assert comm_seconds({"all_reduce": s}, n, A, B)["all_reduce"] == pytest.approx(4 * 6 * 5e-6 + 1.5e-2)
    assert comm_seconds({"all_reduce": 0.0}, n, A, B) == {}


def test_a_call_after_compute_costs_its_run_like_time_once_per_wait():
    """comm_seconds with bench_comm's run-like fits: a wait after ``gap`` of compute costs the fit at that gap,
    interpolated from back to back at none and flat past the last; only the calls that wait pay it; never less
    than back to back. waits(): a kind the backend overlaps waits once per block per pass, per micro-batch."""
    from parallelkit.advisor.projection import waits

    s, n = 1e6, 2
    b2b = bench_comm.model_time("all_reduce", s, n, A, B, 4)
    between = {"all_reduce": [(0.002, 10 * A, B), (0.016, 30 * A, B)]}
    at = lambda g, w=4: comm_seconds({"all_reduce": s}, n, A, B, calls={"all_reduce": 4}, between=between,  # noqa: E731
                                     gap=g, waits={"all_reduce": w})["all_reduce"]
    first, last = (bench_comm.model_time("all_reduce", s, n, a, B, 4) for a in (10 * A, 30 * A))
    assert at(0.0) == pytest.approx(b2b) and at(0.002) == pytest.approx(first) and at(0.1) == pytest.approx(last)
    assert at(0.001) == pytest.approx((b2b + first) / 2) and at(0.009) == pytest.approx((first + last) / 2)
    assert at(0.002, w=1) == pytest.approx(b2b + (first - b2b) / 4)  # one of the 4 calls waits
    faster = {"all_reduce": [(0.002, A / 10, B * 10)]}
    assert comm_seconds({"all_reduce": s}, n, A, B, between=faster, gap=0.01)["all_reduce"] == pytest.approx(
        bench_comm.model_time("all_reduce", s, n, A, B))
    # a calibration with a short gap (bench_comm's BETWEEN_S): a wait after less compute than that costs its time,
    # not back to back (a narrow copy's calls come a fraction of a millisecond apart)
    short = {"all_reduce": [(0.0002, 4 * A, B), *between["all_reduce"]]}
    at_short = bench_comm.model_time("all_reduce", s, n, 4 * A, B, 4)
    on = lambda g: comm_seconds({"all_reduce": s}, n, A, B, calls={"all_reduce": 4}, between=short,  # noqa: E731
                                gap=g, waits={"all_reduce": 4})["all_reduce"]
    assert b2b < at_short < first
    assert on(0.0) == pytest.approx(at_short) and on(0.0001) == pytest.approx(at_short)
    assert on(0.0011) == pytest.approx((at_short + first) / 2) and on(0.002) == pytest.approx(first)
    calls = {"all_gather": 41, "reduce_scatter": 13, "all_reduce": 2}
    comm = {k: 1e6 for k in calls}
    assert waits(comm, calls, {}, 4, 1) == calls  # each waited where it is called
    assert waits(comm, calls, {"all_gather": "forward+backward", "reduce_scatter": "backward"}, 4, 1) == {
        "all_gather": 12, "reduce_scatter": 6, "all_reduce": 2}
    assert waits(comm, None, {}, 4, 1) == {k: 1 for k in calls}  # uncounted: a message per bucket
    assert waits(comm, calls, {}, 4, 1, bursts={"all_gather": 0.5})["all_gather"] == 20.5  # half follow compute


def test_ulysses_all_to_alls_come_in_bursts_and_only_their_first_waits_on_compute():
    """DeepSpeed-Ulysses all-to-alls q, k and v one after another: half of its calls follow compute
    (``Strategy.bursts``), and the other half are projected at their back-to-back time."""
    from parallelkit.runtime.plan import build_plan

    def bursts(*overrides):
        p = build_plan(compose_run(*overrides), quiet=True)
        return p.cls.bursts(p.cfg, p.opts, p.layout)

    assert bursts("strategy=torch_nd_ulysses") == {"all_to_all": 0.5}
    assert bursts("strategy=torch_nd_ring") == {} and bursts("strategy=ddp") == {}


def test_waits_placed_where_the_backend_makes_them_cost_the_run_like_time_of_their_own_gap():
    """``Strategy.wait_gaps``: a kind's waits after their own share of a micro-batch's compute, the rest after the
    mean gap. A wait after longer compute costs more, but less than in proportion: FairScale's tensor parallelism
    waits 16 times after a few ms of a block and a few times after tens of ms of `small`'s head, which costs less
    than 21 waits after their mean gap."""
    from parallelkit.runtime.plan import build_plan

    s, n = 1e6, 2
    between = {"all_reduce": [(0.0002, 4 * A, B), (0.002, 10 * A, B), (0.016, 30 * A, B)]}
    at = lambda gaps, g=0.005: comm_seconds({"all_reduce": s}, n, A, B, calls={"all_reduce": 4},  # noqa: E731
                                            between=between, gap=g, waits={"all_reduce": 4}, gaps=gaps)["all_reduce"]
    assert at({"all_reduce": [(4, 0.005)]}) == pytest.approx(at(None))  # placed at the mean gap: the same
    assert at({"all_reduce": [(2, 0.005)]}) == pytest.approx(at(None))  # the rest after the mean gap
    assert at({"all_reduce": [(3, 0.002), (1, 0.014)]}) < at(None)  # the same compute, unevenly: less
    assert at({"all_reduce": [(8, 0.1)]}) == pytest.approx(at(None, g=0.1))  # more than the run waits: scaled
    p = build_plan(compose_run("strategy=fairscale_tp", "model=small"), quiet=True)
    placed = p.cls.wait_gaps(p.cfg, p.opts, p.layout)["all_reduce"]
    assert sum(k for k, _ in placed) == 4 * 4 + 5 and sum(k * g for k, g in placed) == pytest.approx(1.0)
    assert max(g for _, g in placed) > 0.4 > 0.02 > min(g for k, g in placed if g)  # the head's: most of it
    whole = build_plan(compose_run("strategy=fairscale_tp", "model=small", "strategy.vocab_parallel=false"),
                       quiet=True)
    assert sum(k for k, _ in whole.cls.wait_gaps(whole.cfg, whole.opts, whole.layout)["all_reduce"]) == 4 * 4
    assert build_plan(compose_run("strategy=ddp"), quiet=True).cls.wait_gaps(None, None, None) == {}


def test_group_size_from_layout():
    assert group_size(Layout.data_parallel(8)) == 8
    assert group_size(Layout.model_parallel(8, tp=2, pp=2)) == 2
    assert group_size(Layout.model_parallel(2, tp=2)) == 2 and group_size(Layout.model_parallel(4, pp=4)) == 2


def test_project_named_device_by_hand():
    cfg = compose_run("world_size=4", "projection.device=H100", "projection.efficiency=0.5", *LINK)
    lay = Layout.data_parallel(4)
    p = project(cfg, {"all_reduce": 1e8}, lay)
    c = GPTConfig.from_cfg(cfg.model)
    flops = c.flops_per_token() * cfg.train.micro_batch_size * cfg.train.grad_accum * 4 * c.seq_len / 4
    assert p["compute_s"] == pytest.approx(flops / (66.9e12 * 0.5))  # H100 fp32, the data sheet
    assert p["comm_s"] == pytest.approx(4 * 6 * 5e-6 + 1.5e-2)
    assert p["step_s"] == pytest.approx(p["compute_s"] + p["comm_s"])
    assert (p["device"], p["peak_tflops"]) == ("H100", 66.9)
    assert (p["alpha_s"], p["bandwidth_Bps"]) == pytest.approx((A, B))
    assert "no overlap" in p["assumptions"] and "H100" in p["assumptions"] and "\n" not in p["assumptions"]
    # a named GPU without an efficiency: 0.4, said to be an assumption; bf16 takes the bf16 peak
    q = project(compose_run("world_size=4", "projection.device=A100", "train.precision=bf16", *LINK), {}, lay)
    assert q["efficiency"] == 0.4 and "assumed" in q["source"] and q["peak_tflops"] == CUDA_PEAK_TFLOPS["A100"]["bf16"]
    assert q["comm_s"] == 0 and q["step_s"] == q["compute_s"]
    for bad, key in (("projection.device=Z80", "projection.device"), ("projection.efficiency=1.5", "efficiency"),
                     ("projection.bandwidth_GBps=0", "bandwidth_GBps")):
        with pytest.raises(ConfigError, match=key):
            project(compose_run("projection.device=H100", bad), {"all_reduce": 1.0}, Layout.data_parallel(2))


def test_project_without_measuring_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLELKIT_CACHE", str(tmp_path))  # nothing cached
    p = project(compose_run(), {"all_reduce": 1e6}, Layout.data_parallel(2), measure=False)
    if p["device"].startswith("CPU"):  # peak_tflops=1 (conftest.FAST), but no training rate measured
        assert p["step_s"] is None and "no training-rate measurement cached" in p["source"]
    assert "no collective calibration cached" in p["source"] and p["comm_s"] is None
    assert not list(tmp_path.iterdir())
    if p["device"].startswith("CPU"):  # measured: the proxy's forward + backward rate, cached; the peak cancels
        q = project(compose_run(), {}, Layout.data_parallel(2))
        rate = json.loads(next(tmp_path.glob("efficiency-*.json")).read_text())["tflops"]
        assert "measured" in q["source"] and q["compute_s"] == pytest.approx(q["flops_per_device"] / (rate * 1e12))
        assert q["step_s"] == pytest.approx(q["compute_s"]) and q["comm_s"] == 0


def test_bench_comm_quick_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLELKIT_CACHE", str(tmp_path))
    assert bench_comm.load_calibration(2, quick=True) is None
    c = bench_comm.calibration(2, quick=True)
    assert not c["cached"] and calibrate.cache_path(c["key"], "comm").is_file()
    saved = bench_comm.load_calibration(2, quick=True)
    assert saved is not None and saved["alpha_s"] > 0 and saved["bandwidth_Bps"] > 0
    assert set(saved["kinds"]) == set(bench_comm.KINDS)
    for kind, f in saved["kinds"].items():
        assert f["alpha_s"] >= 0 and f["bandwidth_Bps"] > 0
        assert [p["bytes"] for p in f["points"]] == list(bench_comm.QUICK_SIZES)
        # a busy 2-core machine delays a handoff between ranks by up to a scheduler tick (10x on a 256 KiB
        # ping-pong was seen): each point within a factor of 20, their geometric mean within a factor of 3
        ratios = [p["fit_s"] / p["median_s"] for p in f["points"]]
        assert all(len(p["trials_s"]) == bench_comm.TRIALS for p in f["points"])
        assert all(1 / 20 < r < 20 for r in ratios) and 1 / 3 < math.prod(ratios) ** (1 / len(ratios)) < 3, (kind, f)
    # the run-like timing: each collective after ~0.2, ~2 and ~16 ms of compute, fitted per kind and compute
    assert set(saved["between"]) == set(bench_comm.RUN_KINDS) == set(bench_comm.KINDS)
    for kind, runs in saved["between"].items():
        short, *rest = runs  # the short gap: one small matmul, below what the projection takes as short
        assert short["between_s"] < SHORT_GAP_S < rest[0]["between_s"], (kind, runs)
        assert [0.5 < r["between_s"] / g < 2 for r, g in zip(rest, bench_comm.BETWEEN_S[1:])] == [True, True], runs
        for r in runs:
            assert r["alpha_s"] >= 0 and r["bandwidth_Bps"] > 0
            assert [p["bytes"] for p in r["points"]] == list(bench_comm.QUICK_RUN_SIZES)
            assert all(len(p["trials_s"]) == bench_comm.QUICK_RUN_TRIALS and p["calls"] >= 3 for p in r["points"])
    assert "as a run calls them" in bench_comm.render({**saved, "world_size": 2})
    assert bench_comm.calibration(2, quick=True)["cached"] and bench_comm.load_calibration(2) is None
    # a projection with no projection.* link reads the full calibration (here: the quick one saved as it), per kind
    calibrate.write_cache(bench_comm.cache_key(2), {k: v for k, v in saved.items() if k != "key"}, "comm")
    p = project(compose_run("projection.device=H100"), {"all_gather": 4e6, "all_to_all": 4e6},
                Layout.data_parallel(2))  # a named device: back to back (the run-like timing is this CPU's)
    for kind in ("all_gather", "all_to_all"):
        g = saved["kinds"][kind]
        assert p["comm_s_by_kind"][kind] == pytest.approx(
            bench_comm.model_time(kind, 4e6, 2, g["alpha_s"], g["bandwidth_Bps"]))
    assert "bench_comm" in p["source"] and "not the named device's interconnect" in p["source"]


def test_estimate_cli_prints_projection(capsys):
    args = ["model=tiny", "world_size=2", "projection.device=H100", "projection.efficiency=0.5", *LINK]
    main(args)
    out = capsys.readouterr().out
    assert "comm/step" in out and "step (proj.)" in out and "a model, not a measurement" in out
    main([*args, "--json"])
    rep = json.loads(capsys.readouterr().out)
    c = GPTConfig.from_cfg(compose_run("model=tiny").model)
    ddp = next(r for r in rep["rows"] if r["strategy"] == "ddp")
    flops = c.flops_per_token() * rep["micro_batch_size"] * 1 * 2 * c.seq_len / 2
    assert ddp["projection"]["compute_s"] == pytest.approx(flops / (66.9e12 * 0.5))
    assert ddp["comm_bytes"] == sum(ddp["comm_by_kind"].values())
    proj = ddp["projection"]
    # by part, as the breakdown measures them: on a GPU DDP's all-reduce hides under backward up to its length,
    # the optimizer is not projected without projection.memory_GBps, and the parts add up to the step
    parts = proj["parts_s"]
    assert parts["forward"] + parts["backward"] == pytest.approx(proj["compute_s"])
    assert parts["backward"] == pytest.approx(2 * parts["forward"])
    assert parts["exposed_comm"] == pytest.approx(proj["comm_s"] - min(proj["comm_s"], parts["backward"]))
    assert parts["optimizer"] is None and parts["pipeline_idle"] == 0
    assert ddp["step_s"] == pytest.approx(sum(v or 0 for v in parts.values()))
    fsdp = next(r for r in rep["rows"] if r["strategy"] == "fsdp")  # the prefetch hides under forward and backward
    f = fsdp["projection"]
    assert f["exposed_s_by_kind"]["all_gather"] == pytest.approx(
        f["comm_s_by_kind"]["all_gather"] - min(f["comm_s_by_kind"]["all_gather"], f["compute_s"]))
    zero0 = next(r for r in rep["rows"] if r["strategy"] == "zero0")  # no overlap rule: it waits for all of it
    assert zero0["projection"]["parts_s"]["exposed_comm"] == pytest.approx(zero0["projection"]["comm_s"])
    assert all(r["step_s"] is not None and math.isfinite(r["step_s"]) for r in rep["rows"])


def test_projected_parts_on_cpu_pipeline_bubble_and_optimizer():
    """On CPU nothing hides (gloo shares the cores); a pipeline of one stage per process: its slowest stage waits
    while the other fills and drains it (a micro-batch of that stage's work), plus its p2p; the optimizer is the
    elements a rank updates at this machine's AdamW rate."""
    from conftest import compose_plan

    from parallelkit.advisor.projection import at_once, optimizer_proxy, optimizer_rate, project_plan
    from parallelkit.measure.metrics import cpu_threads

    plan = compose_plan("model=tiny", "world_size=2", "strategy=torch_pipe", "train.grad_accum=4", *LINK)
    p = project_plan(plan, {"send_recv": 1e6, "all_reduce": 1e6}, {"optimizer": 8 * 1000})
    parts = p["parts_s"]
    shares, v = plan.cls.pipeline_shares(plan.cfg, plan.opts, plan.layout)  # the head makes stage 1 the slower
    top = max(shares)
    assert p["bubble_s"] == pytest.approx(p["compute_s"] * (1 - top) / top / (v * 4))
    assert parts["pipeline_idle"] == pytest.approx(p["bubble_s"] + p["comm_s_by_kind"]["send_recv"])
    assert parts["exposed_comm"] == pytest.approx(p["comm_s_by_kind"]["all_reduce"])
    proxy = optimizer_proxy(plan.cfg, p["peak_tflops"])  # the model's proxy: AdamW timed after its backward
    assert proxy[0]["n_layer"] <= 2 and proxy[0]["d_model"] == plan.cfg.model.d_model
    rate = optimizer_rate(cpu_threads(plan.layout.processes), False, at_once(plan.layout), proxy=proxy)  # cached by
    assert rate["steps_timed"] >= 10 and rate["elements"] == GPTConfig(**proxy[0]).num_params()  # the projection
    assert parts["optimizer"] == pytest.approx(1000 * rate["s_per_element"], rel=1e-6)
    assert p["step_s"] == pytest.approx(sum(v or 0.0 for v in parts.values())) and parts["framework"] is None  # FAST: off


def test_a_gpu_projection_never_benchmarks_gloo_and_only_rank_0_predicts(monkeypatch):
    """On a GPU machine the link comes from the GPUs' own collectives (NCCL) or the projection.* settings, never
    from gloo over CPU processes; under torchrun only rank 0 makes the predictions (no GPU needed to check)."""
    from conftest import compose_plan

    from parallelkit.advisor.projection import comm_benchmark
    from parallelkit.run import predictions

    plan = compose_plan("strategy=ddp")
    assert comm_benchmark(plan.cfg, 16, cuda=True, gpus=8)[:2] == ("nccl", 8)
    backend, _, why = comm_benchmark(plan.cfg, 2, cuda=True, gpus=1)
    assert backend is None and "projection.latency_us" in why
    assert comm_benchmark(plan.cfg, 2, cuda=False)[:2] == ("gloo", 2)
    monkeypatch.setenv("RANK", "1")
    assert predictions(plan, None) == {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("PARALLELKIT_NO_PREDICTION", "1")  # rank 0 goes on to predict (here: told not to measure)
    assert predictions(plan, None) == {}


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_alpha_beta_fit_recovers_the_coefficients_it_was_made_from(n):
    """Timings made by the cost formulas of bench_comm (ring, tree, point to point) at a known latency and
    bandwidth are fitted back exactly: a wrong coefficient in a formula or in the fit fails here."""
    from parallelkit.advisor import bench_comm

    alpha, bw = 37e-6, 3.1e9
    points = {k: [{"bytes": b, "median_s": bench_comm.model_time(k, b, n, alpha, bw)} for b in bench_comm.SIZES]
              for k in bench_comm.KINDS}
    fits = bench_comm.fit_points(points, n)
    assert fits["alpha_s"] == pytest.approx(alpha, rel=1e-6) and fits["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6)
    for kind, f in fits["kinds"].items():
        assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6), kind


def test_the_run_like_fit_recovers_its_coefficients_and_survives_noise():
    """A run-like timing made by the cost formula is fitted back; one where noise made the small call slower
    than the large one keeps the back-to-back bandwidth and fits the latency; none is below back to back."""
    alone = {"alpha_s": 2e-4, "bandwidth_Bps": 3e9}
    made = {"between_s": 0.002, "points": [{"bytes": b, "median_s": bench_comm.model_time("all_gather", b, 2, 9e-4,
                                                                                      1e9)} for b in (2**18, 2**23)]}
    f = bench_comm._fit_between("all_gather", made, 2, alone)
    assert f["alpha_s"] == pytest.approx(9e-4) and f["bandwidth_Bps"] == pytest.approx(1e9)
    noisy = {"between_s": 0.016, "points": [{"bytes": 2**18, "median_s": 3.9e-3}, {"bytes": 2**22, "median_s": 2.4e-3}]}
    f = bench_comm._fit_between("broadcast", noisy, 2, alone)
    assert f["bandwidth_Bps"] == alone["bandwidth_Bps"] and f["alpha_s"] > alone["alpha_s"]
    fast = {"between_s": 0.002, "points": [{"bytes": 2**18, "median_s": 1e-6}, {"bytes": 2**23, "median_s": 1e-5}]}
    f = bench_comm._fit_between("all_reduce", fast, 2, alone)
    assert all(p["median_s"] >= bench_comm.model_time("all_reduce", p["bytes"], 2, 2e-4, 3e9) for p in f["points"])


def test_a_proxy_measured_on_a_busy_machine_is_measured_again_not_scaled(monkeypatch):
    """The proxy's training rate is measured and cached; a matmul re-check beside it says whether another load
    slowed it. Below the calibration by more than the drift limit, it is measured once more and the faster kept,
    never scaled up (a noisy re-check made a rate 1.7x too fast), and the source says so."""
    from parallelkit.advisor import projection

    cfg = compose_run("train.micro_batch_size=1")
    entry = {"tflops": 0.02, "measured_at": "then", "key": {"proxy": {"n_layer": 2, "seq_len": 64}, "batch": 1}}
    for check, busy in ((None, False), ({"matmul_tflops": 0.09, "calibrated_tflops": 0.1}, False),
                        ({"matmul_tflops": 0.05, "calibrated_tflops": 0.1}, True)):
        monkeypatch.setattr(projection, "proxy_rate", lambda *a, **k: {**entry, "load_check": check})
        eff, source = projection.efficiency(cfg, Layout.data_parallel(2), 0.1)
        if "measured" not in source:  # a GPU here: the efficiency is assumed, not measured
            pytest.skip(source)
        assert eff == pytest.approx(0.2) and (("busy" in source) == busy), source
    monkeypatch.undo()  # proxy_rate itself again; its measurement and re-check stood in for
    steps = iter([(0.3, 10), (0.2, 10)])  # a busy first measurement, a faster second one
    monkeypatch.setattr(projection, "_alone", lambda *a: next(steps))
    monkeypatch.setattr(projection, "load_check", lambda *a: {"matmul_tflops": 0.05, "calibrated_tflops": 0.1})
    cfg = compose_run("model.n_layer=1", "train.micro_batch_size=1")
    r = projection.proxy_rate(cfg, 1, 1.0, processes=1)
    assert r["step_s"] == 0.2 and next(steps, None) is None  # measured twice, the faster kept
    # a sweep's rates are measured beside it: a cached one younger than the limit is kept, an older one measured again
    assert projection.proxy_rate(cfg, 1, 1.0, processes=1, max_age_s=600)["step_s"] == 0.2
    stale = {k: v for k, v in r.items() if k not in ("key", "samples")}  # measured long ago
    calibrate.write_cache(r["key"], {**stale, "measured_at": "2026-01-01T00:00:00+00:00"}, "efficiency")
    assert projection.proxy_rate(cfg, 1, 1.0, processes=1)["step_s"] == 0.2  # without a limit: any age
    steps = iter([(0.25, 10)])
    monkeypatch.setattr(projection, "load_check", lambda *a: None)  # a quiet machine: measured once
    assert projection.proxy_rate(cfg, 1, 1.0, processes=1, max_age_s=600)["step_s"] == 0.25
    assert next(steps, None) is None


def test_a_one_process_pipeline_proxy_steps_as_a_cpu_pipe_in_a_process_of_its_own(monkeypatch):
    """fairscale_pipe on CPU computes 1.4-1.6x slower than a plain step of its micro-batch (Pipe's chunks, its
    worker's own intra-op threads), so its training-rate proxy is stepped as a Pipe: the same model, so the same
    loss and gradients as the plain proxy, cached apart, and timed in a spawned process, since Pipe's worker
    (and its intra-op threads) outlive the step and would slow what the caller measures next."""
    import os

    from parallelkit.advisor import projection
    from parallelkit.models.gpt import build_model, lm_loss
    from parallelkit.runtime.plan import build_plan
    from parallelkit.strategies.fairscale.pipe import cpu_proxy

    plan = build_plan(compose_run("strategy=fairscale_pipe", "model.n_layer=2", "train.micro_batch_size=2"), quiet=True)
    held = plan.cls.proxy_held(plan.cfg, plan.opts, plan.layout)
    if torch.cuda.is_available():
        assert held is None  # on GPUs the stages are devices: a plain proxy
        pytest.skip("CPU pipelines only")
    assert held == {"pipe": [2, 2]} and build_plan(compose_run("strategy=ddp"), quiet=True).cls.proxy_held(
        None, None, None) is None
    m = {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 64, "seq_len": 8, "tie_weights": True}
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    plain, piped = build_model(m, seed=0), cpu_proxy(build_model(m, seed=0), 2, 2)
    (a := lm_loss(plain(x), x)).backward()
    (b := lm_loss(piped(x), x)).backward()
    assert torch.allclose(a, b, atol=1e-6)
    assert len(list(piped.parameters())) == len(list(plain.parameters())) + 1  # the head's own copy, untied
    total = lambda model: sum(p.grad.double().sum() for p in model.parameters())  # noqa: E731 - the tied
    assert float(total(piped)) == pytest.approx(float(total(plain)), rel=1e-5)  # gradient, split in two, sums as one
    del piped
    cfg = compose_run("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.vocab_size=64",
                      "model.seq_len=8", "train.micro_batch_size=2")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    monkeypatch.setattr(projection, "PROXY_SPAWNS", 1)  # one set of new processes is enough to see it is one
    r = projection.proxy_rate(cfg, 1, 1.0, processes=1, held=held)
    assert r["key"]["held"] == held and r["step_s"] > 0
    assert threads is None or len(os.listdir("/proc/self/task")) == threads  # no worker left in this process
    plain_r = projection.proxy_rate(cfg, 1, 1.0, processes=1, measure=False)
    assert plain_r is None or "held" not in plain_r.get("key", {})  # cached apart from the plain proxy


def test_an_fsdp2_run_has_its_proxies_held_under_fsdp2_the_same_model_and_its_optimizer_over_its_shards(
        tmp_path, monkeypatch):
    """FSDP2 runs (fsdp_*, torch_nd's replicas and shards) spend time FLOPs and collectives do not show: copies into
    and out of flat buffers, hooks, and AdamW over DTensors (1.4x plain AdamW over the same elements, measured), so
    their proxies are held under ``fully_shard`` too: the forward and backward on a mesh of each process alone (no
    collectives: the projection charges them apart), the same loss as the plain proxy; the optimizer over the
    run's own mesh, its rate per element of the shard a process updates; both cached apart from the plain ones."""

    import torch.distributed as dist

    from parallelkit.advisor import projection
    from parallelkit.models.gpt import build_model, lm_loss
    from parallelkit.runtime.plan import build_plan

    def held(*overrides):
        plan = build_plan(compose_run(*overrides), quiet=True)
        return plan.cls.proxy_held(plan.cfg, plan.opts, plan.layout)

    assert held("strategy=fsdp_zero2") == {"fsdp2": {"reshard": False, "mesh": [1, 2]}}
    assert held("strategy=torch_nd_hsdp") == {"fsdp2": {"reshard": True, "mesh": [2, 1]}}
    assert held("strategy=torch_nd_ring")["fsdp2"]["mesh"] == [1, 2]  # FSDP2 shards over dp_shard x cp
    assert held("strategy=torch_nd") is None and held("strategy=zero3") is None  # TP 2 alone; DeepSpeed's own
    m = {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 64, "seq_len": 8, "tie_weights": True}
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain, sharded = build_model(m, seed=0), build_model(m, seed=0)
        projection._shard_proxy(sharded, {"reshard": True, "mesh": [1, 2]}, optimizer=False)
        assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
        assert torch.allclose(lm_loss(plain(x), x), lm_loss(sharded(x), x), atol=1e-6)
    finally:
        dist.destroy_process_group()
    monkeypatch.setattr(projection, "PROXY_SPAWNS", 1)
    cfg = compose_run(*(f"model.{k}={v}" for k, v in m.items()), "train.micro_batch_size=2")
    fsdp = {"fsdp2": {"reshard": False, "mesh": [1, 2]}}
    r = projection.optimizer_rate(1, True, 2, proxy=(m, 1, False, "fp32", fsdp))
    assert r["elements"] == GPTConfig(**m).num_params() // 2 and r["s_per_element"] > 0  # a shard each
    assert projection.optimizer_rate(1, False, 2, proxy=(m, 1, False, "fp32", None)) is None  # cached apart
    e = projection.proxy_rate(cfg, 1, 1.0, processes=2, held=fsdp)
    assert e["key"]["held"] == {"fsdp2": {"reshard": False}} and e["step_s"] > 0  # one process's mesh: any run's
    assert projection.proxy_rate(cfg, 1, 1.0, processes=2, measure=False) is None
    other_mesh = projection.proxy_rate(cfg, 1, 1.0, False, 2, held={"fsdp2": {"reshard": False, "mesh": [2, 1]}})
    assert other_mesh["step_s"] == e["step_s"]


def test_an_offloaded_deepspeed_optimizer_is_timed_as_deepspeeds_cpu_adam_over_the_partition_it_steps():
    """ZeRO with an offloaded optimizer steps DeepSpeedCPUAdam (4x torch's AdamW on this machine), over the
    rank's partition: the offloaded state (master copy, moments, a host gradient) is one element's, not three."""
    from parallelkit.advisor import projection
    from parallelkit.runtime.plan import build_plan

    plan = build_plan(compose_run("strategy=zero2_offload"), quiet=True)
    held = plan.cls.proxy_held(plan.cfg, plan.opts, plan.layout)
    parts = plan.cls.memory(plan.cfg, plan.opts, plan.layout, None)
    assert held == {"cpu_adam": True} and projection._stepped_as(held) is None  # its forward: a plain one's
    psi = GPTConfig.from_cfg(plan.cfg.model).num_params()
    assert plan.cls.optimizer_elements(plan.cfg, plan.opts, parts) == psi // 2
    plain = build_plan(compose_run("strategy=zero2"), quiet=True)
    assert plain.cls.proxy_held(plain.cfg, plain.opts, plain.layout) is None
    m = {"n_layer": 1, "d_model": 32, "n_head": 2, "vocab_size": 64, "seq_len": 8, "tie_weights": True}
    r = projection.optimizer_rate(1, True, 1, proxy=(m, 1, False, "fp32", held))
    assert r["s_per_element"] > 0 and r["elements"] == GPTConfig(**m).num_params()  # no shards: one process
    assert projection.optimizer_rate(1, False, 1, proxy=(m, 1, False, "fp32", None)) is None  # cached apart


def test_how_long_rates_stay_fresh_is_two_minutes_unless_the_environment_says(monkeypatch):
    from parallelkit.advisor import projection

    monkeypatch.delenv(projection.RATES_FRESH_ENV, raising=False)
    assert projection.rates_fresh_s() == projection.RATES_FRESH_S == 120
    monkeypatch.setenv(projection.RATES_FRESH_ENV, "3600")
    assert projection.rates_fresh_s() == 3600
    monkeypatch.setenv(projection.RATES_FRESH_ENV, "soon")  # not a number: the default, not a crash mid-sweep
    assert projection.rates_fresh_s() == 120


def test_a_rate_a_refresh_measured_stays_fresh_for_the_rest_of_that_refresh(monkeypatch):
    """refresh_rates (a sweep's start, a tune's): each plan's rates may be as old as the refresh itself, so a proxy
    its first configs share is not measured again for its last ones."""
    from parallelkit.advisor import projection

    if torch.cuda.is_available():
        pytest.skip("rates are measured on CPU only")
    ages = []
    monkeypatch.setattr(projection, "refresh_plan_rates", lambda plan, max_age_s=None: (ages.append(max_age_s),
                                                                                        time.sleep(0.05)))
    projection.refresh_rates([compose_run("strategy=ddp"), compose_run("strategy=zero2")])
    assert len(ages) == 2 and projection.rates_fresh_s() <= ages[0] < ages[1] - 0.04


def test_a_rate_measured_again_is_the_median_of_its_recent_measurements():
    """A proxy measured again is the median of its last RATE_SAMPLES measurements within RATE_HISTORY_S: a slow
    measurement by chance moves the projection by less, a drift is followed within a few."""
    from datetime import datetime, timedelta, timezone

    from parallelkit.advisor import projection

    now = datetime.now(timezone.utc)
    at = lambda s: (now - timedelta(seconds=s)).isoformat(timespec="seconds")  # noqa: E731
    assert projection._recent(None, 0.3) == (0.3, [[projection._recent(None, 0.3)[1][0][0], 0.3]])
    old = {"measured_at": at(100), "step_s": 1.0, "samples": [[at(900), 5.0], [at(200), 1.2], [at(100), 1.0]]}
    step, samples = projection._recent(old, 1.4)  # the one 15 minutes old is left out
    assert step == 1.2 and [v for _, v in samples] == [1.2, 1.0, 1.4]
    assert projection._recent({"measured_at": at(60), "step_s": 2.0}, 1.0)[0] == 1.5  # an entry of before: its own
    assert projection._recent({"measured_at": at(700), "step_s": 2.0}, 1.0)[0] == 1.0  # too old to count


def test_a_tensor_parallel_rank_has_its_proxy_cut_to_its_share_of_the_layers_rated_per_flop_of_that_share():
    """A tensor-parallel rank computes 1/tp of each block (and of the head where the vocabulary is split): its
    proxy is cut the same way, and its rate is per FLOP of that share, the share the projection gives the rank."""

    from parallelkit.advisor import projection
    from parallelkit.models.gpt import build_model, lm_loss
    from parallelkit.runtime.plan import build_plan

    def plan_of(*overrides):
        return build_plan(compose_run(*overrides), quiet=True)

    fs = plan_of("strategy=fairscale_tp")
    held = fs.cls.proxy_held(fs.cfg, fs.opts, fs.layout)
    assert held == {"tp": [2, True]} and projection.optimizer_proxy(fs.cfg, 1.0, held)[4] is None  # vocab-parallel
    m = {k: fs.cfg.model[k] for k in ("n_layer", "n_head", "d_model", "vocab_size", "seq_len", "tie_weights")}
    flops = GPTConfig(**m).flops_per_token()
    assert projection._rank_flops_per_token(m, held) == pytest.approx(flops / 2)  # as project() counts it
    whole = plan_of("strategy=fairscale_tp", "strategy.vocab_parallel=false")  # the head whole on each rank
    assert whole.cls.proxy_held(whole.cfg, whole.opts, whole.layout) == {"tp": [2, False]}
    assert projection._rank_flops_per_token(m, {"tp": [2, False]}) == \
        pytest.approx(flops / 2 * whole.cls.compute_share(whole.cfg, whole.opts, whole.layout))
    gpt = build_model(m, seed=0)
    projection._tp_proxy(gpt, 2, True)
    assert gpt.blocks[0].attn.qkv.out_features == 3 * m["d_model"] // 2 and gpt.head.out.out_features == m["vocab_size"] // 2
    assert gpt.embed.tok.num_embeddings == m["vocab_size"] // 2  # FairScale's vocab-parallel embedding, tied as
    assert (gpt.embed.tok.weight is gpt.head.out.weight) == m["tie_weights"]  # the model ties it
    x = torch.randint(0, m["vocab_size"] // 2, (2, m["seq_len"]))
    logits = gpt(x)
    assert logits.shape[-1] == m["vocab_size"] // 2
    lm_loss(logits, x % (m["vocab_size"] // 2)).backward()
    # the proxy's batch is cut to what one process computes: a rank's share fits a batch the whole model would halve
    tokens = fs.cfg.train.micro_batch_size * m["seq_len"]
    peak = 2 * tokens * (flops + flops / 2) / 2 / 1e12 / projection.PROXY_STEP_S  # between the two
    assert projection.proxy_shape(fs.cfg, peak)[1] == fs.cfg.train.micro_batch_size // 2
    assert projection.proxy_shape(fs.cfg, peak, held)[1] == fs.cfg.train.micro_batch_size


def test_a_vocab_parallel_proxy_starts_as_the_run_and_computes_its_loss_as_fairscale_does(monkeypatch, tmp_path):
    """The cut layers get the model's initial values (torch's defaults made the logits span ~160 and the loss's
    exp() underflow, 40% of the step), and the loss is FairScale's vocab_parallel_cross_entropy as the run's (on a
    group of the timing process alone): the same value as cross_entropy over the slice, by other ops."""
    import fairscale.nn.model_parallel.cross_entropy as ce
    import torch.distributed as dist

    from parallelkit.advisor import projection
    from parallelkit.models.gpt import build_model, lm_loss

    m = {"n_layer": 1, "n_head": 4, "d_model": 64, "vocab_size": 512, "seq_len": 16, "tie_weights": True}
    gpt = build_model(m, seed=0)
    projection._tp_proxy(gpt, 2, True)
    for w in (gpt.embed.tok.weight, gpt.blocks[0].mlp.fc.weight):
        assert float(w.detach().std()) == pytest.approx(0.02, rel=0.2)  # GPT-2's N(0, 0.02), not torch's N(0, 1) or Kaiming
    assert projection._vocab_parallel_loss() is lm_loss  # no process group: the plain loss
    for name in ("get_model_parallel_group", "get_model_parallel_rank", "get_model_parallel_world_size"):
        monkeypatch.setattr(ce, name, getattr(ce, name))  # restored after the test
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loss_fn = projection._vocab_parallel_loss()
        x = torch.randint(0, 256, (2, 16))
        logits = gpt(x)
        assert loss_fn is not lm_loss
        assert float(loss_fn(logits.clone(), x)) == pytest.approx(float(lm_loss(logits, x)), rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_a_context_parallel_rank_has_its_proxy_at_the_tokens_it_computes_in_a_pass():
    """Context parallelism splits each micro-batch's sequences over cp ranks: a rank's pass, and the per-pass costs
    FSDP2 adds (its copies and hooks), come at 1/cp of the micro-batch's tokens. The proxy steps that much: the
    batch divided by cp where it divides, else the sequence (ulysses and ring at micro-batch 4, cp 2: projected
    9-11% short on a proxy of the whole micro-batch)."""
    from parallelkit.advisor import projection
    from parallelkit.runtime.plan import build_plan

    plan = build_plan(compose_run("strategy=torch_nd_ulysses", "train.micro_batch_size=4",
                                  "train.global_batch_size=8"), quiet=True)
    assert plan.layout.cp == 2
    big = 1e9  # no cut for the step's length
    m, b = projection.proxy_shape(plan.cfg, big)
    assert b == 4 and projection.proxy_shape(plan.cfg, big, split=plan.layout.cp) == (m, 2)
    one = build_plan(compose_run("strategy=torch_nd_ulysses", "train.micro_batch_size=1",
                                 "train.global_batch_size=2"), quiet=True)
    m1, b1 = projection.proxy_shape(one.cfg, big, split=one.layout.cp)
    assert b1 == 1 and m1["seq_len"] == one.cfg.model.seq_len // 2
