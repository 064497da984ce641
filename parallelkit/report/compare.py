"""``python -m parallelkit.report DIR``: every summary.json below DIR -> one comparison.

Writes ``comparison.md``, ``comparison.csv``, a self-contained ``comparison.html`` and PNG
plots (see plots.py) into DIR, and prints a narrow table. Runs that cannot be compared
fairly (failed, a different global batch, one process driving every device, another
host) get a footnote; so do noisy runs (a busy machine, see noise.py). The loss deviation
is taken against a ``single`` (else ``ddp``) run of the same model, global batch, seed,
steps, data and optimizer. The repeats of a sweep with ``repeats=N`` are one row: the
median of the repeats, their min-max, and ``n``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

import pandas as pd
import yaml

from parallelkit.report.aggregate import (
    aligned_losses,
    config_key,
    host_labels,
    merge_repeats,
)
from parallelkit.report.tables import (
    TERMINAL_WIDTH,
    display,
    html_page,
    leaders,
    markdown_page,
    time_parts,
    winners,
)
from parallelkit.report.why import why_lines
from parallelkit.util.jsonio import read_json, write_json
from parallelkit.util.units import blank


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _run_config(run_dir: Path) -> dict:
    """The run's resolved config (seed, data, optimizer: what the loss trajectory depends on)."""
    for p in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        try:
            return yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
    return {}


def load(root: Path) -> list[dict]:
    """One record per configuration below root, in job order (0_, 1_, ..., 10_); repeats merged."""
    return merge_repeats(load_runs(root))


def load_runs(root: Path) -> list[dict]:
    """One record per summary.json below root, in job order."""
    root = Path(root)
    records = []
    for p in sorted(root.rglob("summary.json"), key=_natural):
        try:
            s = read_json(p)
        except (OSError, ValueError) as e:
            s = {"status": "failed", "error": f"unreadable summary.json: {e}"}
        cfg = _run_config(p.parent)
        train = cfg.get("train") or {}
        s["run"] = str(p.parent.relative_to(root)) if p.parent != root else p.parent.name
        s["seed"] = s.get("seed", cfg.get("seed"))
        s["config_key"] = config_key(cfg)
        if s.get("repeat") is None and cfg.get("repeat") is not None:  # a summary written before the field
            s["repeat"] = cfg["repeat"]
        # Everything besides the strategy that shapes the loss trajectory.
        s["fingerprint"] = json.dumps([s.get("model"), s.get("seq_len"), s.get("global_batch"), s.get("steps"), s["seed"],
                                       cfg.get("model"), cfg.get("data"), cfg.get("optim"), train.get("grad_clip")],
                                      sort_keys=True, default=str)
        records.append(s)
    return records


def _max(v) -> float | None:
    v = [x for x in v if x is not None] if isinstance(v, list) else []
    return max(v) if v else None


def _one_process(s: dict) -> bool:
    if s.get("one_process") is not None:
        return bool(s["one_process"])
    return s.get("processes") == 1 and (s.get("world_size") or 1) > 1  # a failed run's summary lacks the flag


def _names(records: list[dict]) -> list[str]:
    """Short unique names for plots: the label, plus whatever tells same-label runs apart."""
    names = [str(s.get("label") or s.get("strategy") or s["run"]) for s in records]
    keys = (("strategy", "[{}]"), ("model", "{}"), ("world_size", "w{}"), ("global_batch", "gb{}"), ("precision", "{}"),
            ("seed", "seed{}"))
    for key, fmt in keys:
        for i, s in enumerate(records):
            same = [j for j, n in enumerate(names) if n == names[i]]
            if len(same) > 1 and len({str(records[j].get(key)) for j in same}) > 1:
                for j in same:
                    names[j] = f"{names[j]} {fmt.format(records[j].get(key))}"
    dupes = {n for n in names if names.count(n) > 1}
    return [f"{n} ({s['run']})" if n in dupes else n for n, s in zip(names, records)]


def _reference(s: dict, records: list[dict]) -> dict | None:
    cands = [r for r in records if r.get("status") == "ok" and r.get("reference") is not None
             and r["fingerprint"] == s["fingerprint"] and r.get("losses")]
    cands.sort(key=lambda r: (r.get("precision") != s.get("precision"), r.get("precision") != "fp32", r["reference"]))
    return cands[0] if cands else None


def _ratio(tokens_per_s, ref: dict | None) -> float | None:
    """tokens/s over the reference run's (the run the loss deviation is measured against)."""
    if ref is None or blank(tokens_per_s) or not ref.get("tokens_per_s"):
        return None
    return tokens_per_s / ref["tokens_per_s"]


def _baseline_batch(s: dict, records: list[dict]) -> int | None:
    """The global batch most finished runs of this model use (ties: the reference strategy's)."""
    group = [r for r in records if (r.get("model"), r.get("seq_len")) == (s.get("model"), s.get("seq_len"))
             and r.get("status") == "ok"]
    counts = pd.Series([r.get("global_batch") for r in group]).value_counts()
    if counts.empty:
        return None
    top = [b for b, c in counts.items() if c == counts.iloc[0]]
    refs = [r.get("global_batch") for r in group if r.get("reference") is not None and r.get("global_batch") in top]
    return refs[0] if refs else next(r.get("global_batch") for r in group if r.get("global_batch") in top)


def build(records: list[dict]) -> pd.DataFrame:
    """The comparison in raw units (bytes, seconds): one row per run, notes for unfair rows."""
    names = _names(records)
    any_ref = any(r.get("status") == "ok" and r.get("reference") is not None for r in records)
    hosts = host_labels(records)
    known = [h for h in hosts if h]
    main_host = max(set(known), key=known.count) if known else None
    rows = []
    for i, s in enumerate(records):
        ok = s.get("status") == "ok"
        notes, dev, ref, fair, r = [], None, None, ok, None
        if not ok:
            notes.append(f"{s.get('status')}: {s.get('error') or 'no error recorded'}")
        notes += s.get("_extra_notes") or []
        if len(set(known)) > 1 and hosts[i]:
            fair = fair and hosts[i] == main_host
            notes.append(f"ran on {hosts[i]}: this report mixes {len(set(known))} hosts, so speeds and MFU "
                         f"across them are not like for like")
        if ok:
            notes += _measure_notes(s)
            base = _baseline_batch(s, records)
            if base is not None and s.get("global_batch") not in (None, base):
                fair = False
                notes.append(f"global batch {s.get('global_batch')}, not {base} as most runs of {s.get('model')}: "
                             f"tokens/s and losses are not like for like")
            if _one_process(s):
                fair = False
                notes.append("one process drives every device (pipeline): its memory and tokens/s are the whole "
                             "pipeline's, not one device's")
            r = _reference(s, records) if s.get("losses") else None
            if r is not None:
                ref = names[records.index(r)]
                pairs = aligned_losses(s, r)
                dev = max(abs(a - b) for _, a, b in pairs) if pairs else None
                if r.get("precision") != s.get("precision"):
                    notes.append(f"loss deviation measured against the {r.get('precision')} reference run")
            elif any_ref:
                notes.append("no reference run (single, else ddp) with the same model, global batch, seed and steps: no loss deviation")
        breakdown = s.get("model_state_breakdown") or []
        state = s.get("model_state_bytes") or []
        top = breakdown[state.index(max(state))] if state and len(breakdown) == len(state) else {}
        rows.append({
            "#": i + 1, "run": s["run"], "name": names[i], "label": s.get("label"), "strategy": s.get("strategy"),
            "model": s.get("model"), "params": s.get("params"),
            "layout": "/".join(str(s.get(k, "?")) for k in ("world_size", "dp", "tp", "pp")),
            "world": s.get("world_size"), "dp": s.get("dp"), "tp": s.get("tp"), "pp": s.get("pp"),
            "one_process": _one_process(s), "precision": s.get("precision"),
            "micro_batch": s.get("micro_batch_size"), "grad_accum": s.get("grad_accum"),
            "global_batch": s.get("global_batch"), "seq_len": s.get("seq_len"), "seed": s.get("seed"),
            "tokens_per_s": s.get("tokens_per_s"), "speed_ratio": _ratio(s.get("tokens_per_s"), r),
            "tokens_per_s_lo": s.get("tokens_per_s_lo"),
            "tokens_per_s_hi": s.get("tokens_per_s_hi"), "step_time_s": s.get("step_time_s"),
            "step_time_lo_s": s.get("step_time_lo_s"), "step_time_hi_s": s.get("step_time_hi_s"),
            "spread": s.get("spread"), "spread_of": s.get("spread_of"), "n": s.get("n", 1),
            "noisy": s.get("noisy"), "noise_reason": s.get("noise_reason"), "peak_drift": s.get("peak_drift"),
            "peak_source": s.get("peak_source"), "host": hosts[i], "tflops": s.get("tflops"),
            "mfu": s.get("mfu"), "peak_mem_bytes": _max(s.get("peak_mem_bytes")),
            "live_peak_mem_bytes": _max(s.get("live_peak_mem_bytes")),
            "model_state_bytes": _max(state), "params_bytes": top.get("params"), "grads_bytes": top.get("grads"),
            "optimizer_bytes": top.get("optimizer"), "comm_bytes_per_step": _max(s.get("comm_bytes_per_step")),
            "largest_model": (s.get("predicted_largest_model") or {}).get("model"),
            "largest_model_params": (s.get("predicted_largest_model") or {}).get("params"),
            "final_loss": s.get("final_loss"), "loss_dev": dev, "reference": ref, **pipeline_columns(s),
            **prediction_columns(s),
            "status": s.get("status"), "error": s.get("error"), "like_for_like": fair, "note": "; ".join(notes),
            "_notes": notes,
        })
    return pd.DataFrame(rows)


def pipeline_columns(s: dict) -> dict:
    """A pipeline's schedule, micro-batches, bubble (estimate and, where measured, each stage's idle share) and
    peak memory per stage (max over its data-parallel ranks; needs ``stage_of_rank``); every run's traffic split
    into point-to-point (pipeline activations) and collectives, max over ranks."""
    f = s.get("strategy_facts") or {}
    out = {"schedule": f.get("schedule"), "micro_batches": f.get("micro_batches"),
           "stages_per_rank": f.get("stages_per_rank"), "bubble_estimate": f.get("bubble_estimate"),
           "stage_idle_share": f.get("stage_idle_share"), "peak_mem_by_stage": None}
    peaks, stage_of = s.get("peak_mem_bytes") or [], f.get("stage_of_rank")
    if stage_of and len(stage_of) == len(peaks):
        by: dict[int, float] = {}
        for st, v in zip(stage_of, peaks):
            if v is not None:
                by[st] = max(by.get(st, 0), v)
        out["peak_mem_by_stage"] = [by[k] for k in sorted(by)] or None
    kinds = [k for k in s.get("comm_by_kind") or [] if isinstance(k, dict)]
    p2p = [(k.get("send_recv") or {}).get("bytes") or 0 for k in kinds]
    coll = [sum((v or {}).get("bytes") or 0 for kind, v in k.items() if kind != "send_recv") for k in kinds]
    out.update(comm_p2p_bytes=max(p2p) if kinds else None, comm_collective_bytes=max(coll) if kinds else None)
    return out


def _err(predicted, measured) -> float | None:
    """(predicted - measured) / measured: + over-predicts, - under-predicts."""
    return None if predicted is None or not measured else (predicted - measured) / measured


def prediction_columns(s: dict) -> dict:
    """What predict.py said before the run beside what the run measured (busiest rank), with the error; the
    communication by kind, measured (calls and bytes, the rank that sent most) and predicted (bytes)."""
    ok = s.get("status") == "ok"
    out = {"predicted_peak_mem_bytes": s.get("predicted_peak_mem_bytes"),
           "predicted_model_state_bytes": s.get("predicted_model_state_bytes"),
           "predicted_comm_bytes_per_step": s.get("predicted_comm_bytes_per_step"),
           "predicted_step_time_s": s.get("predicted_step_time_s"),
           "process_baseline_bytes": (s.get("prediction") or {}).get("process_baseline_bytes")}
    pairs = (("peak_mem", "peak_mem_bytes"), ("model_state", "model_state_bytes"),
             ("comm", "comm_bytes_per_step"), ("step_time", "step_time_s"))
    for short, field in pairs:
        measured = _max(s.get(field)) if isinstance(s.get(field), list) else s.get(field)
        out[f"{short}_err"] = _err(s.get(f"predicted_{field}"), measured) if ok else None
    kinds = [k for k in s.get("comm_by_kind") or [] if isinstance(k, dict)]
    top = max(kinds, key=lambda k: sum((v or {}).get("bytes") or 0 for v in k.values()), default={})
    pred = s.get("predicted_comm_by_kind") or {}
    out["comm_kinds"] = {k: {"calls": (top.get(k) or {}).get("calls"), "bytes": (top.get(k) or {}).get("bytes"),
                             "predicted": pred.get(k)} for k in sorted(set(top) | set(pred))} if ok else {}
    return out


def _measure_notes(s: dict) -> list[str]:
    notes = [f"noisy: {s['noise_reason']}"] if s.get("noisy") and s.get("noise_reason") else []
    if s.get("precision_warning"):
        notes.append(s["precision_warning"])
    if s.get("save_peak_mem_bytes") and s.get("peak_mem_bytes"):
        save, peak = _max(s["save_peak_mem_bytes"]), _max(s["peak_mem_bytes"])
        notes.append(f"peak memory is the training steps'; checkpoint saves peaked at {save / 2**20:,.0f} MiB/rank "
                     f"({'above' if save > peak else 'within'} it), measured apart")
    if s.get("mfu_error"):
        notes.append(s["mfu_error"])
    elif s.get("peak_raised_from"):  # a summary written before MFU stopped being clipped at 1
        notes.append(f"MFU: the measured peak ({s['peak_raised_from']:.3g} TFLOP/s) was below the rate this run "
                     f"achieved, so the peak was raised to it: the calibration met a busy moment")
    return notes


def sweep_command(root: Path) -> str | None:
    """The command that made the sweep (markdown), from Hydra's multirun.yaml; None for a plain folder."""
    try:
        h = (yaml.safe_load((Path(root) / "multirun.yaml").read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError):
        return None
    task = " ".join(a for a in (h.get("overrides") or {}).get("task") or [] if not a.startswith("+repeat="))  # sweep.py adds it
    params = ((h.get("sweeper") or {}).get("params")) or {}
    swept = " ".join(f"{k}={v}" for k, v in params.items())
    return f"`python -m parallelkit.run -m {task}`".replace(" `", "`") + (f" (the experiment sweeps {swept})" if swept else "")


def write_report(root: Path, echo: bool = True) -> Path | None:
    """Write every report file into root; return the markdown's path (None: no summaries)."""
    from parallelkit.report.plots import (
        write_plots,  # matplotlib only when a report is written
    )

    root = Path(root)
    records = load(root)
    if not records:
        print(f"parallelkit.report: no summary.json below {root}", file=sys.stderr)
        return None
    df = build(records)
    df.attrs["why"] = why_lines(records, list(df["name"]), *leaders(df))
    df.drop(columns=["_notes", "comm_kinds"], errors="ignore").to_csv(root / "comparison.csv", index=False)
    write_json(root / "comparison.json", {"winners": winners(df), "why": df.attrs["why"],
                                          "step_parts_ms": time_parts(df, records)})
    images = write_plots(df, records, root)
    command = sweep_command(root)
    (root / "comparison.md").write_text(markdown_page(root, df, records, images, command))
    (root / "comparison.html").write_text(html_page(root, df, records, images, command))
    if echo:
        print(terminal_report(df))
        print(f"report: {root / 'comparison.md'} (also .csv, .html, {', '.join(p.name for p in images)})")
    return root / "comparison.md"


def terminal_report(df: pd.DataFrame) -> str:
    """At most TERMINAL_WIDTH columns: who wins first, then the table (columns every row shares said once above
    it), then the notes and errors, wrapped. The md, csv and html have every column."""
    t, notes, common = display(df, terminal=True)
    head = f"{len(df)} run(s)" + (f"; all: {', '.join(common)}" if common else "")
    lines = textwrap.wrap(head, TERMINAL_WIDTH, subsequent_indent="  ")
    for w in winners(df):
        lines += textwrap.wrap(w, TERMINAL_WIDTH, subsequent_indent=" " * 19)
    fastest = leaders(df)[0]
    for w in df.attrs.get("why", []):  # one line a run here (against the fastest); the md, html and json have both
        if w["against"] == fastest or w["run"] == fastest:
            lines += textwrap.wrap(w["line"], TERMINAL_WIDTH, initial_indent="why: ", subsequent_indent="       ")
    lines += [t.to_string(index=False)]
    for i, n in enumerate(notes, 1):
        lines += textwrap.wrap(f"[{i}] {n}", TERMINAL_WIDTH, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra not installed: the CLI report still works
    Callback = object


class SweepReport(Callback):
    """Hydra callback: the comparison report of the whole sweep when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        print()
        try:
            write_report(Path(config.hydra.sweep.dir))
        except Exception as e:  # noqa: BLE001 - the runs are done and kept; say why the report is not
            print(f"parallelkit.report: could not write the report: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a run or sweep folder (searched recursively for summary.json)")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        ap.error(f"{args.dir} is not a folder")
    if write_report(args.dir) is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
