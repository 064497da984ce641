"""The advisor: the pre-flight fit check before workers start, predictions recorded beside measurements."""
from __future__ import annotations

import json

import pytest
from conftest import FAST, ROOT, compose_run, run_cli, summary

from parallelkit.advisor import predict


def test_preflight_refuses_what_cannot_fit_in_one_line(tmp_path):
    """The headline command on a 1.3B model with 2 ranks of this machine: refused before any worker starts, with
    the predicted and available bytes and what would fit; the summary says skipped."""
    out = tmp_path / "oss_1b"
    p = run_cli(out, "strategy=fairscale_oss", "model=gpt_1b", "gpu_memory=12GiB", "projection.framework=false",
                predict=True)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if "pre-flight" in line]
    assert len(lines) == 1 and lines[0].startswith("parallelkit: pre-flight: predicted") and "11.0 GiB available" in lines[0], lines
    assert "preflight=false" in lines[0] and "strategy=" in lines[0]  # names presets that fit
    s = summary(out)
    assert s["status"] == "skipped" and s["error"].startswith("pre-flight:")
    assert not (out / "metrics.jsonl").exists()  # no worker ran


def test_preflight_false_runs_anyway(tmp_path):
    """A limit the tiny model exceeds: refused, then run with preflight=false; the run records its prediction."""
    refused = run_cli(tmp_path / "refused", *FAST, "gpu_memory=1MiB", predict=True)
    assert refused.returncode == 2 and "pre-flight" in refused.stderr
    p = run_cli(tmp_path / "forced", *FAST, "gpu_memory=1MiB", "preflight=false", predict=True)
    assert p.returncode == 0, p.stderr[-2000:]
    s = summary(tmp_path / "forced")
    assert s["status"] == "ok"
    assert s["predicted_peak_mem_bytes"] > s["predicted_model_state_bytes"] > 0
    assert s["prediction"]["process_baseline_bytes"] > 0  # CPU: a worker's own footprint, measured


def test_sweep_shows_a_job_too_big_as_a_row(tmp_path):
    """A sweep with one job predicted not to fit: that job is a skipped row and the sweep goes on."""
    sweep = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("model=")]
    p = run_cli(sweep, "-m", "model=tiny,gpt_1b", *fast, f"hydra.sweep.dir={sweep}", predict=True)
    assert p.returncode == 0, p.stderr[-3000:]
    by_model = {json.loads(f.read_text())["model"]: json.loads(f.read_text()) for f in sweep.glob("*/summary.json")}
    assert by_model["tiny"]["status"] == "ok" and by_model["gpt_1b"]["status"] == "skipped"
    table = (sweep / "comparison.md").read_text()
    assert "skipped" in table and "## Predicted vs measured" in table


def test_predictions_hold_for_the_runs_in_results():
    """Pre-flight never refuses a configuration that ran in results/: no run's peak is over-predicted by more
    than the margin pre-flight allows (predicted <= measured x (1 + MARGIN) <= available x (1 + MARGIN)). The runs
    that recorded the worker footprint they were predicted with (a tune's trials did not: measuring one for each
    backend would take about 40 s)."""
    rep = predict.check_results(ROOT / "results", measure=False)
    rows = [r for r in rep["rows"] if "peak_ratio" in r]
    assert len(rows) >= 20, rep["rows"][:3]
    worst = max(rows, key=lambda r: r["peak_ratio"])
    assert worst["peak_ratio"] <= 1 + predict.MARGIN, worst


@pytest.mark.parametrize("bad,says", [("preflight=maybe", "preflight='maybe': must be true or false"),
                                      ("projection.device=TPU9", "projection.device='TPU9': no fp32 peak known"),
                                      ("projection.efficiency=2", "projection.efficiency=2: must be a number in (0, 1]"),
                                      ("projection.bandwidth_GBps=0", "projection.bandwidth_GBps=0: must be")])
def test_bad_advisor_settings_fail_in_one_line(bad, says):
    from parallelkit.config.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose_run(bad)
    assert says in str(e.value) and "\n" not in str(e.value)
