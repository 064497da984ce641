"""Comparison reports: hand-written summaries (fast, no processes) and real sweeps through the CLI."""
from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FAST, ROOT, board_scalars, run_cli
from PIL import Image

from parallelkit.report.compare import build, load, terminal_report, write_report
from parallelkit.report.tables import TERMINAL_WIDTH, hbytes, hcount, htime

PNG = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = ("comparison.md", "comparison.csv", "comparison.html", "memory.png", "throughput.png", "loss.png")
LOSSES = [6.0, 5.5, 5.0, 4.6, 4.3, 4.1]


def write_run(root: Path, name: str, seed: int = 0, **fields) -> None:
    """A run folder as the CLI leaves it: summary.json and the resolved config.yaml."""
    s = {"status": "ok", "error": None, "strategy": "ddp", "label": "ddp", "model": "tiny", "params": 136960,
         "world_size": 2, "dp": 2, "tp": 1, "pp": 1, "processes": 2, "precision": "fp32", "device": "cpu",
         "micro_batch_size": 2, "grad_accum": 1, "global_batch": 4, "seq_len": 64, "steps": 6, "timed_steps": 5,
         "tokens_per_step": 256, "tokens_per_s": 30000.0, "step_time_s": 0.0085, "tflops": 0.012, "mfu": 0.2,
         "peak_tflops": 0.06, "peak_mem_bytes": [340 * 2**20, 345 * 2**20], "model_state_bytes": [2191472, 2191472],
         "model_state_breakdown": [{"params": 547840, "grads": 547840, "optimizer": 1095792}] * 2,
         "comm_bytes_per_step": [547840, 547840], "losses": LOSSES, "final_loss": LOSSES[-1], "one_process": False,
         "versions": {"torch": "2.13.0"}, "machine": {"cpu": "Test CPU", "cores": 2, "memory_bytes": 24 * 2**30}}
    s.update(fields)
    s.setdefault("reference", {"single": 0, "ddp": 1}.get(s["strategy"]))  # what the strategy's class says
    if s["status"] != "ok":  # what a failed run's summary holds: the base fields, null metrics
        s.update({k: None for k in ("tokens_per_s", "step_time_s", "tflops", "mfu", "peak_mem_bytes", "model_state_bytes",
                                    "model_state_breakdown", "comm_bytes_per_step", "final_loss")}, losses=[])
        s.pop("one_process")
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"name": s["model"]}, "data": {"name": "synthetic"},
                                                   "optim": {"lr": 1e-3}, "train": {"grad_clip": 1.0}}))


def rows(root: Path) -> dict:
    return {r["run"]: r for r in build(load(root)).to_dict("records")}


# ---- hand-written summaries -----------------------------------------------------------------
def test_loss_deviation_prefers_single_and_needs_same_model_batch_seed_steps(tmp_path):
    shifted = [x + (0.01 if i == 3 else 0) for i, x in enumerate(LOSSES)]
    write_run(tmp_path, "0_ddp", losses=[x + 1e-6 for x in LOSSES])
    write_run(tmp_path, "1_single", strategy="single", label="single", world_size=1, dp=1, processes=1)
    write_run(tmp_path, "2_fsdp", strategy="fsdp", label="fsdp2 zero3", losses=shifted)
    write_run(tmp_path, "3_seed1", seed=1, strategy="fsdp", label="fsdp2 zero3", losses=shifted)
    write_run(tmp_path, "4_steps", strategy="fsdp", label="fsdp2 zero3", steps=4, losses=LOSSES[:4])
    write_run(tmp_path, "10_bf16", strategy="fsdp", label="fsdp2 zero3", precision="bf16", losses=shifted)
    r = rows(tmp_path)
    assert list(r) == ["0_ddp", "1_single", "2_fsdp", "3_seed1", "4_steps", "10_bf16"]  # job order, not text order
    assert r["1_single"]["loss_dev"] == 0 and r["1_single"]["reference"] == "single"
    assert r["0_ddp"]["reference"] == "single" and r["0_ddp"]["loss_dev"] == pytest.approx(1e-6, rel=1e-3)
    assert r["2_fsdp"]["loss_dev"] == pytest.approx(0.01) and r["2_fsdp"]["note"] == ""
    for other in ("3_seed1", "4_steps"):  # a different seed or length is not compared
        assert pd.isna(r[other]["loss_dev"]) and "no reference run" in r[other]["note"]
    assert r["10_bf16"]["loss_dev"] == pytest.approx(0.01) and "against the fp32 reference" in r["10_bf16"]["note"]


def test_unfair_rows_are_marked(tmp_path):
    write_run(tmp_path, "0_ddp")
    write_run(tmp_path, "1_single", strategy="single", label="single", world_size=1, dp=1, processes=1)
    write_run(tmp_path, "2_big", strategy="fsdp", label="fsdp2 zero3", global_batch=8, micro_batch_size=4)
    write_run(tmp_path, "3_pipe", strategy="fairscale_pipe", label="fairscale pipe", dp=1, pp=2, processes=1,
              one_process=True, peak_mem_bytes=[500 * 2**20], model_state_bytes=[2191472],
              model_state_breakdown=[{"params": 547840, "grads": 547840, "optimizer": 1095792}], comm_bytes_per_step=[0])
    write_run(tmp_path, "4_oom", strategy="zero3", label="deepspeed zero3", status="oom", error="OutOfMemoryError: boom")
    write_run(tmp_path, "5_pipe_failed", strategy="fairscale_pipe", label="fairscale pipe", dp=1, pp=2, processes=1,
              status="timeout", error="run exceeded train.timeout_s=1 s and was stopped")
    r = rows(tmp_path)
    assert r["0_ddp"]["note"] == "" and r["1_single"]["note"] == ""
    assert [r[k]["like_for_like"] for k in sorted(r)] == [True, True, False, False, False, False]
    assert "global batch 8, not 4" in r["2_big"]["note"] and pd.isna(r["2_big"]["loss_dev"])
    assert r["3_pipe"]["one_process"] and "one process drives every device" in r["3_pipe"]["note"]
    assert r["3_pipe"]["loss_dev"] == 0  # same trajectory as single
    assert r["4_oom"]["status"] == "oom" and r["4_oom"]["note"] == "oom: OutOfMemoryError: boom"
    assert r["5_pipe_failed"]["one_process"] and r["5_pipe_failed"]["status"] == "timeout"
    assert pd.isna(r["4_oom"]["peak_mem_bytes"]) and pd.isna(r["4_oom"]["tokens_per_s"])
    # the largest rank and its breakdown
    assert r["0_ddp"]["peak_mem_bytes"] == 345 * 2**20 and r["0_ddp"]["optimizer_bytes"] == 1095792
    assert r["0_ddp"]["layout"] == "2/2/1/1" and r["3_pipe"]["layout"] == "2/1/1/2"

    assert write_report(tmp_path, echo=False) is not None
    md = (tmp_path / "comparison.md").read_text()
    assert "OutOfMemoryError: boom" in md and "train.timeout_s=1" in md and "one process drives" in md
    for f in REPORT_FILES:
        assert (tmp_path / f).stat().st_size > 0, f


def test_terminal_table_is_narrow_with_2_rows_or_40(tmp_path):
    write_run(tmp_path, "0_ddp")
    write_run(tmp_path, "1_zero3", strategy="zero3", label="deepspeed zero3 offload (optimizer only)", status="failed",
              error="RuntimeError: " + "a very long message " * 15)
    two = terminal_report(build(load(tmp_path)))
    lines = two.splitlines()
    assert "all: model tiny" in lines[0] and "global batch 4" in lines[0]  # shared columns said once
    table = lines[1:4]
    assert table[0].split()[:3] == ["#", "run", "tok/s"] and max(map(len, lines)) <= TERMINAL_WIDTH, two
    assert "RuntimeError" not in "".join(table) and "[1] failed: RuntimeError" in two  # errors go below, wrapped
    for i in range(2, 40):
        write_run(tmp_path, f"{i}_run", strategy="fsdp", label=f"fsdp2 zero3 variant {i}", model=["tiny", "small"][i % 2],
                  params=[136960, 16e6][i % 2], global_batch=[4, 8][i % 3 == 0], tokens_per_s=1234567.0 * i)
    many = terminal_report(build(load(tmp_path)))
    lines = many.splitlines()
    top = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "run"])
    assert len(lines[top:top + 41]) == 41 and max(map(len, lines)) <= TERMINAL_WIDTH, many
    assert "2.47M" in many and "345 MiB" in many
    # who wins, before the table: 39 is faster but runs global batch 8 where most run 4, so not like for like
    assert lines[1].startswith("fastest:") and "fsdp2 zero3 variant 38: 46.9M tokens/s" in lines[1], many
    assert "MFU" not in many and "TFLOP/s" not in many  # the rest is in the md, csv and html


def test_human_units():
    assert hbytes(2191472) == "2.09 MiB" and hbytes(1023) == "0.999 KiB" and hbytes(5 * 2**30) == "5 GiB" and hbytes(None) == ""
    assert hcount(136960) == "137k" and hcount(1.3e9) == "1.3B" and hcount(float("nan")) == ""
    assert htime(0.0085) == "8.5 ms" and htime(2.5) == "2.5 s"


# ---- noise, repeats and hosts (issue 10) ------------------------------------------------------
STEPS = [0.0085, 0.0084, 0.0086, 0.0085, 0.0087, 0.0083, 0.0085, 0.0086, 0.0084, 0.0088]
HOST = {"cpu": "Test CPU", "avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False, "native_bf16": True,
        "cores": 2, "gpu": None}


def measured(steps: list[float], before: float | None = 0.06, after: float | None = 0.058, **fields) -> dict:
    """The fields the loop adds (noise.RunProbe.finish) for these step times."""
    from parallelkit.measure.noise import noise_fields

    return {"step_times_s": steps, "timed_steps": len(steps), "step_time_s": sorted(steps)[len(steps) // 2],
            "tokens_per_s": 256 / sorted(steps)[len(steps) // 2], "host": HOST, "repeat": None,
            **noise_fields(steps, before, after), **fields}


def test_older_summaries_without_noise_fields_still_load(tmp_path):
    write_run(tmp_path, "0_ddp")  # the fields of a summary written before issue 10
    write_run(tmp_path, "1_single", strategy="single", label="single", world_size=1, dp=1, processes=1, **measured(STEPS))
    r = rows(tmp_path)
    old, new = r["0_ddp"], r["1_single"]
    assert pd.isna(old["spread"]) and pd.isna(old["tokens_per_s_lo"]) and old["n"] == 1 and old["note"] == ""
    assert new["n"] == 1 and new["spread"] == pytest.approx(new["step_time_hi_s"] / new["step_time_s"], rel=0.02)
    assert new["tokens_per_s_lo"] < new["tokens_per_s"] < new["tokens_per_s_hi"] and new["note"] == ""
    assert new["spread_of"] == "p10-p90 of 10 timed steps" and not new["noisy"]
    assert old["host"] == new["host"] and old["like_for_like"]  # same CPU: the older one borrows its flags
    text = terminal_report(build(load(tmp_path)))
    assert "spread" in text and "noisy" not in text and "n=" not in text


def test_a_noisy_row_is_flagged_with_its_reason(tmp_path):
    write_run(tmp_path, "0_ddp", **measured(STEPS))
    write_run(tmp_path, "1_fsdp", strategy="fsdp", label="fsdp2 zero3", **measured(STEPS[:7] + [0.026, 0.025, 0.027]))
    write_run(tmp_path, "2_zero2", strategy="zero2", label="deepspeed zero2", **measured(STEPS, after=0.02))
    r = rows(tmp_path)
    assert [r[k]["noisy"] for k in ("0_ddp", "1_fsdp", "2_zero2")] == [False, True, True]
    assert "noisy: machine busy: step times varied 3." in r["1_fsdp"]["note"]
    assert "noisy: machine busy: matmul rate 67% below its calibration" in r["2_zero2"]["note"]
    text = terminal_report(build(load(tmp_path)))
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "run"])
    assert "noisy" not in lines[top + 1] and "noisy" in lines[top + 2] and "noisy" in lines[top + 3], text
    assert "] noisy: machine busy: step times varied 3." in text and max(map(len, lines)) <= TERMINAL_WIDTH, text
    write_report(tmp_path, echo=False)
    for f in ("comparison.md", "comparison.html"):
        page = (tmp_path / f).read_text()
        assert page.count(" noisy") >= 2 and "machine busy: step times varied 3." in page and "p10-p90" in page, f


def test_rows_from_different_hosts_are_marked(tmp_path):
    avx2_only = {**HOST, "cpu": "Other CPU", "avx512f": False, "avx512_bf16": False, "native_bf16": False}
    write_run(tmp_path, "0_ddp", **measured(STEPS))
    write_run(tmp_path, "1_single", strategy="single", label="single", world_size=1, dp=1, processes=1, **measured(STEPS))
    write_run(tmp_path, "2_fsdp", strategy="fsdp", label="fsdp2 zero3", machine={"cpu": "Other CPU", "cores": 2},
              **measured(STEPS, host=avx2_only))
    r = rows(tmp_path)
    assert [r[k]["like_for_like"] for k in ("0_ddp", "1_single", "2_fsdp")] == [True, True, False]
    assert "ran on Other CPU, 2 cores, avx2: this report mixes 2 hosts" in r["2_fsdp"]["note"]
    assert "ran on Test CPU, 2 cores, avx2 avx512f avx512_bf16" in r["0_ddp"]["note"]
    write_report(tmp_path, echo=False)
    md = (tmp_path / "comparison.md").read_text()
    assert "Machine: 2 different hosts: Test CPU" in md and "Other CPU, 2 cores, avx2" in md


def test_repeats_become_one_row_with_the_median_range_and_n(tmp_path):
    for job, (strategy, rep, step) in enumerate([("ddp", 0, 0.010), ("single", 0, 0.020), ("ddp", 1, 0.012),
                                                 ("single", 1, 0.021), ("ddp", 2, 0.011)]):
        label = {"single": "single", "ddp": "ddp"}[strategy]
        write_run(tmp_path, f"{job}_{strategy}", strategy=strategy, label=label, world_size=2 if strategy == "ddp" else 1,
                  **measured([step] * 10, repeat=rep, step_time_s=step, tokens_per_s=256 / step,
                             predicted_step_time_s=step * (1.5 if rep == 0 else 1.0)))
    write_run(tmp_path, "5_single", strategy="single", label="single", world_size=1, status="timeout",
              error="run exceeded train.timeout_s=9 s and was stopped", repeat=2)
    r = build(load(tmp_path)).set_index("strategy")
    assert list(r.index) == ["ddp", "single"]
    ddp, single = r.loc["ddp"], r.loc["single"]
    assert ddp["n"] == 3 and ddp["step_time_s"] == pytest.approx(0.011) and ddp["run"] == "0_ddp, 2_ddp, 4_ddp"
    assert ddp["tokens_per_s_lo"] == pytest.approx(256 / 0.012) and ddp["tokens_per_s_hi"] == pytest.approx(256 / 0.010)
    assert ddp["spread"] == pytest.approx(1.2) and ddp["spread_of"] == "min-max of 3 repeats" and not ddp["noisy"]
    # beside the median step, the median of the repeats' projections (0.015, 0.012, 0.011), not the first one's
    assert ddp["predicted_step_time_s"] == pytest.approx(0.012) and ddp["step_time_err"] == pytest.approx(1 / 11)
    assert single["n"] == 2 and single["status"] == "ok" and "1 of 3 repeats not ok: repeat 2: timeout" in single["note"]
    text = terminal_report(build(load(tmp_path)))
    assert text.startswith("2 run(s)") and "n=3" in text and "n=2" in text


def test_repeats_vary_slowest_through_an_experiment_and_command_line():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from parallelkit.config.sweep import interleave_repeats

    argv = ["-m", "experiment=compare_all", "model=tiny", "strategy=ddp,single,fsdp", "repeats=2"]
    new = interleave_repeats(argv)
    assert new[:3] == ["-m", "+repeat=0,1", "strategy=ddp,single,fsdp"] and new[-1] == "hydra.sweeper.params=null"
    overrides = OverridesParser.create().parse_overrides([a for a in new[1:] if not a.startswith("hydra.")])
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    assert [(j[0], j[1]) for j in jobs] == [(f"+repeat={r}", f"strategy={s}") for r in (0, 1) for s in ("ddp", "single", "fsdp")]
    assert interleave_repeats(["-m", "strategy=ddp,single"]) == ["-m", "strategy=ddp,single"]  # repeats=1: unchanged
    assert interleave_repeats(["-m", "experiment=zero_stages", "repeats=2"])[1:3] == [
        "+repeat=0,1", "strategy=ddp,zero0,zero1,zero2,zero3,zero2_offload,zero3_offload"]
    with pytest.raises(SystemExit) as e:
        interleave_repeats(["-m", "strategy=ddp,single", "repeats=0"])
    assert e.value.code == 2


def test_report_cli_on_an_empty_folder_says_so(tmp_path):
    p = run_cli(tmp_path, str(tmp_path), module="parallelkit.report", timeout=120)
    assert p.returncode == 1 and "no summary.json below" in p.stderr


def test_every_experiment_composes_to_a_sweep_of_existing_configs():
    from hydra import compose, initialize_config_dir

    experiments = sorted(p.stem for p in (ROOT / "parallelkit" / "conf" / "experiment").glob("*.yaml"))
    assert {"compare_all", "zero_stages", "memory_vs_model", "dp_scaling"} <= set(experiments)
    with initialize_config_dir(str(ROOT / "parallelkit" / "conf"), version_base="1.3"):
        for name in experiments:
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            params = cfg.hydra.sweeper.params
            assert params, name
            for group in ("strategy", "model"):
                for v in str(params.get(group, "")).split(","):
                    if v and not v.startswith("glob("):
                        assert (ROOT / "parallelkit" / "conf" / group / f"{v}.yaml").exists(), (name, group, v)
            assert (ROOT / "experiments" / "README.md").read_text().count(f"experiment={name}") >= 1, name


# ---- real sweeps through the CLI ------------------------------------------------------------
class Tables(HTMLParser):
    """Tables (rows of cell texts) and inline images of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None


def check_report_files(root: Path, n_rows: int) -> tuple[list[dict], list[list[str]]]:
    for f in REPORT_FILES:
        assert (root / f).is_file(), f
    for png in root.glob("*.png"):
        assert png.read_bytes()[:8] == PNG, png
        with Image.open(png) as im:
            im.verify()
    with open(root / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == n_rows
    page = Tables()
    page.feed((root / "comparison.html").read_text())
    assert len(page.tables[0]) == n_rows + 1  # header + one row per job (then predicted vs measured, comm by kind)
    header = page.tables[0][0]
    assert {"label", "world/dp/tp/pp", "tokens/s", "MFU", "peak mem/rank (max)", "max loss dev", "status"} <= set(header)
    assert len(page.images) >= 3
    for src in page.images:  # inline, so the page opens from disk anywhere
        assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    body = [dict(zip(header, r)) for r in page.tables[0][1:]]
    md = (root / "comparison.md").read_text()
    assert md.split("## ")[0].count("\n| ") == n_rows + 1 and "](memory.png)" in md
    return table, body


def sweep(tmp_path: Path, *overrides: str, predict: bool = False):
    out = tmp_path / "sweep"
    p = run_cli(out, "-m", *FAST, *overrides, f"hydra.sweep.dir={out}", predict=predict)
    assert "report: " in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p


@pytest.mark.slow  # over a minute on 2 busy cores; CI runs it (plain `pytest` selects every marker)
def test_sweep_of_three_strategies_reports_one_row_per_job(tmp_path):
    # through a canned experiment, its strategies narrowed on the command line; its corpus narrowed to this package's
    # sources (600 kB: the standard library's 13 MB take most of a minute to tokenize on a cold cache)
    out, p = sweep(tmp_path, "experiment=compare_all", "model=tiny", "strategy=ddp,single,fsdp",
                   f"data.path={ROOT / 'parallelkit'}", "train.untimed_steps=3", "train.breakdown=true",
                   predict=True)
    table, body = check_report_files(out, 3)
    assert [r["strategy"] for r in table] == ["ddp", "single", "fsdp"]
    assert all(r["status"] == "ok" for r in table), table
    assert [r["max loss dev"] for r in body][1] == "ref"
    assert all(float(r["loss_dev"]) < 1e-5 for r in table)  # fp32 parity with the single run
    assert "3 run(s)" in p.stdout and "fsdp2 zero3" in p.stdout and "tok/s" in p.stdout
    report = p.stdout[p.stdout.index("3 run(s)"):p.stdout.index("report: ")].splitlines()  # then where it is
    assert report[1].startswith("fastest:") and max(map(len, report)) <= TERMINAL_WIDTH, p.stdout  # answers first
    head = next(i for i, line in enumerate(report) if line.startswith("# "))  # winners, why-lines, then the table
    assert "vs ref" in report[head] and report[head - 1].startswith(("why: ", " ")) and head >= 4
    assert "fastest:" in (out / "comparison.md").read_text()
    for job in ("0_ddp", "1_single", "2_fsdp"):  # tensorboard --logdir <sweep>: one run per job, step by step
        board = board_scalars(out / job)
        assert len(board["train/loss"]) == 6 and len(board["speed/tokens_per_s"]) == 6, (job, board.keys())
    check_step_breakdown(out, p.stdout)


def check_step_breakdown(out: Path, stdout: str) -> None:
    """Where each step goes: every rank's profiled untimed step cut into parts that add up to its wall time, the
    collectives each backend runs found in the profile by kind, the projection by the same parts, and the report's
    why-lines and stacked bars."""
    from parallelkit.measure.breakdown import parts_ms

    summaries = {job: json.loads((out / job / "summary.json").read_text()) for job in ("0_ddp", "1_single", "2_fsdp")}
    for job, s in summaries.items():
        assert len(s["step_breakdown"]) == s["world_size"], job
        for b in s["step_breakdown"]:
            parts = b["parts_s"]
            assert b["step"] == 1 and min(parts.values()) >= 0, (job, b)  # untimed: 3 untimed steps, 2 the probe
            assert sum(parts.values()) == pytest.approx(b["wall_s"], rel=1e-6)
            assert b["wall_s"] == pytest.approx(b["profiled_wall_s"], rel=0.05)  # the profile covers the step
            assert all(parts[k] > 0 for k in ("forward", "backward", "optimizer")), (job, parts)
        assert sum(parts_ms(s).values()) == pytest.approx(s["step_time_s"] * 1e3)
        proj = s["prediction"]["projection"]
        assert proj["step_s"] == pytest.approx(sum(v or 0 for v in proj["parts_s"].values()))
        assert s["step_why"].startswith("step ")
    kinds = {job: {k for b in s["step_breakdown"] for k in b["comm_s_by_kind"]} for job, s in summaries.items()}
    assert "all_reduce" in kinds["0_ddp"] and {"all_gather", "reduce_scatter"} <= kinds["2_fsdp"], kinds
    assert kinds["1_single"] == set()
    why = json.loads((out / "comparison.json").read_text())["why"]
    pairs = {frozenset((w["run"], w["against"])) for w in why}  # a pair once, whichever way round
    assert pairs >= {frozenset(("ddp", "single")), frozenset(("fsdp2 zero3", "single"))}, why
    assert all(" ms per step" in w["line"] for w in why)
    assert "why: " in stdout and (out / "step_parts.png").stat().st_size > 0
    # the largest GPT preset each setup is predicted to fit: fsdp shards what ddp replicates
    from parallelkit.advisor.predict import FIT_LADDER

    fit = {job: FIT_LADDER.index(s["predicted_largest_model"]["model"]) for job, s in summaries.items()}
    assert fit["2_fsdp"] >= fit["0_ddp"] and "largest model:" in stdout, fit
    assert "Where the step goes" in (out / "comparison.md").read_text()


def test_sweep_with_failing_jobs_still_reports_every_row(tmp_path):
    # world_size=0: a config error before any worker; timeout 1 s: workers killed mid-start-up
    out, p = sweep(tmp_path, "strategy=ddp", "world_size=0,2", "train.timeout_s=1,600")
    table, body = check_report_files(out, 4)
    status = [r["status"] for r in table]
    assert status == ["failed", "failed", "timeout", "ok"], table
    assert "config error: world_size=0" in table[0]["error"] and "train.timeout_s=1" in table[2]["error"]
    assert [r["status"] for r in body] == status and body[2]["notes"]
    # no note on the ok job but what a busy machine may say of its timing
    assert [n for n in table[3]["note"].split("; ") if n and not n.startswith("noisy: machine busy")] == [], table[3]
    assert "world_size=0" in (out / "comparison.md").read_text() and "world_size=0" in p.stdout


def test_a_resumed_run_is_compared_with_the_reference_at_its_own_steps(tmp_path):
    """A run resumed at step 3 records losses from step 3 (``first_step``): its deviation is against the reference's
    steps 3.., not 0.. (the same trajectory: 0, where comparing from index 0 gave 0.9)."""
    write_run(tmp_path, "0_single", strategy="single", label="single")
    write_run(tmp_path, "1_resumed", strategy="zero2", label="zero2", losses=LOSSES[3:], final_loss=LOSSES[-1],
              first_step=3)
    r = rows(tmp_path)
    assert r["1_resumed"]["reference"] == "single" and r["1_resumed"]["loss_dev"] == pytest.approx(0.0)
