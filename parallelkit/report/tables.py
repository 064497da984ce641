"""The report's tables: human units, the columns, footnotes, markdown and self-contained HTML."""
from __future__ import annotations

import base64
import html
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from parallelkit.measure.breakdown import parts_ms, profiled_ratio, skew_ms
from parallelkit.measure.noise import DRIFT_LIMIT, SPREAD_LIMIT
from parallelkit.util.units import blank, hbytes, hcount, htime


def _num(fmt: str):
    return lambda v: "" if blank(v) else fmt.format(v)


def _dev(v) -> str:
    return "" if blank(v) else ("0" if v == 0 else f"{v:.1e}")


# (column, header in files, header in the terminal (None: files only), formatter). The terminal keeps what
# answers "which is fastest, smallest, and does it train the same": the rest is in the md, csv and html.
COLUMNS = [
    ("#", "#", "#", str), ("label", "label", "run", str), ("model", "model", None, str),
    ("params", "params", None, hcount), ("layout", "world/dp/tp/pp", None, str),
    ("precision", "precision", None, str), ("global_batch", "global batch", None, _num("{:.0f}")),
    ("tokens_per_s", "tokens/s", "tok/s", hcount), ("speed_ratio", "tokens/s vs ref", "vs ref", _num("{:.2f}x")),
    ("tok_range", "tokens/s range", None, str),
    ("step_time_s", "step time", "step", htime), ("spread_text", "spread", "spread", str), ("n", "runs", "n", "n={:.0f}".format),
    ("tflops", "TFLOP/s", None, _num("{:.3g}")), ("mfu", "MFU", None, _num("{:.1%}")),
    ("peak_mem_bytes", "peak mem/rank (max)", "mem/rank", hbytes),
    ("model_state_bytes", "model state/rank (max)", None, hbytes),
    ("comm_bytes_per_step", "comm/step (max rank)", "comm/step", hbytes),
    ("schedule_text", "pipeline schedule", None, str), ("bubble_text", "bubble: est. (idle by stage)", None, str),
    ("stage_mem_text", "peak mem by stage", None, str), ("comm_split_text", "comm p2p / collectives", None, str),
    ("peak_mem_err", "peak mem: pred. err", None, lambda v: _pct(v)),
    ("comm_err", "comm: pred. err", None, lambda v: _pct(v)),
    ("final_loss", "final loss", None, _num("{:.4f}")), ("loss_dev", "max loss dev", "loss dev", _dev),
    ("status", "status", "status", str), ("notes", "notes", "notes", str),
]
TERMINAL_WIDTH = 120  # the terminal report's widest line
CONSTANT_IN_TERMINAL = ("model", "params", "layout", "precision", "global_batch", "status", "n")
HIDDEN_WHEN_ALL = {"n": "n=1"}  # said by nobody when every row has it (one run per configuration)
HIDDEN_WHEN_EMPTY = ("schedule_text", "bubble_text", "stage_mem_text", "comm_split_text", "peak_mem_err", "comm_err")  # shown once a pipeline runs
PIPELINE_NOTE = ("Pipelines: schedule and micro-batches per step (m; v: model chunks per rank); bubble: the "
                 "fill-drain estimate (p-1)/(m+p-1) (interleaved: (p-1)/(v m+p-1)) and, in brackets, each stage's "
                 "measured idle share on the probe step (time outside its forward and backward); peak memory by "
                 "stage: the largest rank of each stage (the first holds the embedding, the last the head); comm: "
                 "point-to-point bytes (activations and their gradients) / collectives, per step, largest rank.")
SPREAD_NOTE = (f"Median over the timed steps (of one run; with n > 1, the median of the repeats' medians). "
               f"Range and spread: p10-p90 of the step times and p90/median for one run; min-max and slowest/fastest "
               f"of the repeats where n > 1. A row is noisy when its spread is over {SPREAD_LIMIT}x or its matmul "
               f"peak after the run moved over {DRIFT_LIMIT:.0%} from the calibration (see the notes).")


def _range(lo, hi, fmt) -> str:
    return "" if blank(lo) or blank(hi) else f"{fmt(lo)}-{fmt(hi)}"


def _spread(spread, noisy) -> str:
    text = "" if blank(spread) else f"{spread:.2f}x"
    return f"{text} noisy".strip() if not blank(noisy) and bool(noisy) else text


def _list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else []


def _schedule(schedule, m, v) -> str:
    if blank(schedule):
        return ""
    return f"{schedule} m={m:.0f}" + (f" v={v:.0f}" if not blank(v) and v > 1 else "") if not blank(m) else str(schedule)


def _bubble(est, idle) -> str:
    text = "" if blank(est) else f"{est:.0%}"
    shares = _list(idle)
    return f"{text} ({' / '.join(f'{x:.0%}' for x in shares)})".strip() if shares else text


def _comm_split(p2p, coll) -> str:
    return "" if blank(p2p) else f"{hbytes(p2p)} / {hbytes(coll)}"


def pipeline_texts(df: pd.DataFrame) -> dict[str, list[str]]:
    """The pipeline columns as text: empty for rows that are not pipelines (p2p: rows without point-to-point traffic)."""
    col = lambda name: df[name] if name in df else [None] * len(df)  # noqa: E731 - older frames lack them
    p2p = any(not blank(v) and v > 0 for v in col("comm_p2p_bytes"))  # the split is shown once a pipeline sends
    return {"schedule_text": [_schedule(s, m, v) for s, m, v in zip(col("schedule"), col("micro_batches"),
                                                                       col("stages_per_rank"))],
            "bubble_text": [_bubble(e, i) for e, i in zip(col("bubble_estimate"), col("stage_idle_share"))],
            "stage_mem_text": [" / ".join(hbytes(x) for x in _list(v)) for v in col("peak_mem_by_stage")],
            "comm_split_text": [_comm_split(p, c) if p2p else "" for p, c in zip(col("comm_p2p_bytes"),
                                                                                   col("comm_collective_bytes"))]}


def display(df: pd.DataFrame, terminal: bool = False) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Formatted table, footnotes, and (terminal only) the columns every row shares, said once."""
    notes: list[str] = []
    marks = []
    for row_notes in df["_notes"]:
        ids = []
        for n in row_notes:
            if terminal and len(n) > 2 * TERMINAL_WIDTH:
                n = n[:2 * TERMINAL_WIDTH - 3] + "..."
            if n not in notes:
                notes.append(n)
            ids.append(str(notes.index(n) + 1))
        marks.append(",".join(ids))
    is_ref = [r == nm for r, nm in zip(df["reference"], df["name"])]
    df = df.assign(notes=marks, loss_dev=["ref" if ref and not blank(d) else d for ref, d in zip(is_ref, df["loss_dev"])],
                   speed_ratio=["ref" if ref and not blank(v) else v for ref, v in zip(is_ref, df["speed_ratio"])],
                   tok_range=[_range(lo, hi, hcount) for lo, hi in zip(df["tokens_per_s_lo"], df["tokens_per_s_hi"])],
                   spread_text=[_spread(v, z) for v, z in zip(df["spread"], df["noisy"])], **pipeline_texts(df))
    if terminal:  # the unique name (label + what tells same-label runs apart), cut to fit
        width = min(30, int(df["name"].str.len().max()))
        df = df.assign(label=[n[:width].ljust(width) for n in df["name"]])
    else:
        df = df.assign(label=df["name"])
    out, common = {}, []
    for col, file_head, term_head, fmt in COLUMNS:
        vals = [v if isinstance(v, str) and v == "ref" else ("" if blank(v) else fmt(v)) for v in df[col]]
        if col in HIDDEN_WHEN_ALL and all(v == HIDDEN_WHEN_ALL[col] for v in vals):
            continue
        given = {v for v in vals if v}  # a run that failed before it knew (e.g. its params) does not count
        if terminal and col in CONSTANT_IN_TERMINAL and len(df) > 1 and len(given) == 1:
            common.append(given.pop() if col == "n" else f"{file_head} {given.pop()}")
            continue
        if terminal and term_head is None:
            continue
        if (terminal and col in ("notes", "spread_text") or col in HIDDEN_WHEN_EMPTY) and not any(vals):
            continue
        head = term_head if terminal else file_head
        out[head.ljust(len(vals[0])) if terminal and col == "label" else head] = vals
    return pd.DataFrame(out), notes, common


def winners(df: pd.DataFrame) -> list[str]:
    """Who wins, first: the fastest, the least memory per rank and the least communication per step among the
    runs that finished and compare like for like, with their ratio to the reference run (single, else ddp); and
    the largest GPT preset each setup is predicted to fit (the estimator's, ``predicted_largest_model``)."""
    ok = df[(df["status"] == "ok") & df["like_for_like"].astype(bool)]
    if len(ok) < 2:
        return []
    ref = next((r for r in ok["reference"] if isinstance(r, str)), None)
    base = ok[ok["name"] == ref].iloc[0] if ref is not None and (ok["name"] == ref).any() else None
    many = ok[ok["world"].fillna(1).astype(float) > 1] if "world" in ok else ok
    lines = []
    for what, col, pick, fmt, pool in (("fastest", "tokens_per_s", "max", lambda v: f"{hcount(v)} tokens/s", ok),
                                       ("least memory/rank", "peak_mem_bytes", "min", hbytes, ok),
                                       ("least comm/step", "comm_bytes_per_step", "min", hbytes, many)):
        vals = pool[col].dropna()
        if vals.empty:
            continue
        row = pool.loc[vals.idxmax() if pick == "max" else vals.idxmin()]
        ratio = "  (the reference)" if row["name"] == ref else ""
        if base is not None and not blank(base[col]) and base[col] > 0 and row["name"] != ref:
            ratio = f"  {row[col] / base[col]:.2f}x {ref}"
        where = " (of the runs on 2 or more ranks)" if pool is many and len(many) < len(ok) else ""
        lines.append(f"{what + ':':<19}{row['name'][:40]}: {fmt(row[col])}{ratio}{where}")
    if "largest_model_params" in ok and not (sizes := ok["largest_model_params"].dropna()).empty:
        top = ok.loc[sizes[sizes == sizes.max()].index]
        names = ", ".join(n[:30] for n in top["name"][:3]) + (f" and {len(top) - 3} more" if len(top) > 3 else "")
        vs = ""
        if base is not None and not blank(base["largest_model_params"]) and ref not in list(top["name"]):
            vs = f"  ({ref}: {base['largest_model']})"
        lines.append(f"{'largest model:':<19}{top.iloc[0]['largest_model']} ({hcount(sizes.max())} params, "
                     f"predicted to fit): {names}{vs}")
    return lines


def leaders(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """(the fastest run that compares like for like, the reference run), by name."""
    ok = df[(df["status"] == "ok") & df["like_for_like"].astype(bool)]
    vals = ok["tokens_per_s"].dropna()
    fastest = ok.loc[vals.idxmax(), "name"] if len(ok) > 1 and not vals.empty else None
    ref = next((r for r in ok["reference"] if isinstance(r, str)), None)
    return fastest, ref


TIME_NOTE = ("Where each run's step goes: measured on one untimed step under torch.profiler, on the rank that "
             "computed longest (the others wait for it in their collectives: 'rank skew' is how much longer it "
             "computed than the quickest rank, in ms of the profiled step), each part's share of that step times "
             "the timed median, so the parts add up to the median step "
             "(measure/breakdown.py; docs/step_time.md). 'profiled/median': the profiled step's time without data "
             "loading and the profiler's estimated cost, over the timed median. Each cell: measured / projected "
             "(advisor/projection.py); 'other' is measured beside the projection's framework time (the backend's own "
             "time, measured on a narrow copy of the run: advisor/framework.py), which also holds the small calls' "
             "waits that the breakdown counts as exposed communication.")


def time_parts(df: pd.DataFrame, records: list[dict]) -> list[dict]:
    """Per run with a breakdown: measured ms by part (timed-median scale) and the projection's, for the json."""
    out = []
    for name, s in zip(df["name"], records):
        if (m := parts_ms(s)) is None:
            continue
        proj = ((s.get("prediction") or {}).get("projection") or {})
        p = {k: (None if v is None else v * 1e3) for k, v in (proj.get("parts_s") or {}).items()}
        for kind, v in (proj.get("exposed_s_by_kind") or {}).items():
            p[f"exposed {kind}"] = v * 1e3
        out.append({"run": name, "step_ms": s["step_time_s"] * 1e3, "profiled_over_median": profiled_ratio(s),
                    "rank_skew_ms": skew_ms(s),
                    "measured_ms": m, "projected_ms": p,
                    "projected_step_ms": None if blank(proj.get("step_s")) else proj["step_s"] * 1e3})
    return out


def time_table(df: pd.DataFrame, records: list[dict]) -> pd.DataFrame | None:
    rows = []
    for r in time_parts(df, records):
        m, p = r["measured_ms"], r["projected_ms"]

        def cell(key: str, keys: tuple = ()) -> str:
            keys = keys or (key,)
            mv = sum(m.get(k, 0.0) for k in keys)
            pv = p.get(key)
            return f"{mv:.1f} / {'-' if pv is None else f'{pv:.1f}'}"

        exposed = [k for k in m if k.startswith("exposed ")]
        kinds = ", ".join(f"{k[8:]} {m[k]:.1f}" for k in sorted(exposed, key=lambda k: -m[k]) if m[k] >= 0.05)
        err = None if r["projected_step_ms"] is None else r["projected_step_ms"] / r["step_ms"] - 1
        rows.append({"run": r["run"], "step (median)": f"{r['step_ms']:.1f} ms",
                     "profiled/median": "" if r["profiled_over_median"] is None else f"{r['profiled_over_median']:.2f}",
                     "forward": cell("forward"), "backward": cell("backward"), "optimizer": cell("optimizer"),
                     "exposed comm": cell("exposed_comm", tuple(exposed)), "exposed by kind": kinds,
                     "pipeline idle": cell("pipeline_idle"), "other": cell("framework", ("other",)),
                     "rank skew": "" if r["rank_skew_ms"] is None else f"{r['rank_skew_ms']:.1f}",
                     "step: projected": "" if err is None else f"{r['projected_step_ms']:.1f} ms ({err:+.0%})"})
    return pd.DataFrame(rows) if rows else None


def _pct(v) -> str:
    return "" if blank(v) else f"{v:+.1%}"


PREDICTION_NOTE = ("Predicted before the run (python -m parallelkit.estimate; predict.py) beside what the run measured "
                   "on its busiest rank; error = (predicted - measured) / measured. Peak memory on CPU is a worker's "
                   "peak RSS: the prediction is the strategy's parts (model state, buffers, activations) plus the "
                   "process's own footprint (interpreter, libraries, process group: 'process' below, measured once per "
                   "backend here); the workers fix glibc's mmap threshold (train.cpu_mmap_threshold) so that freed "
                   "tensors leave RSS, else it also counts what malloc keeps (experiments/mem_phases.py). "
                   "Communication is the payload handed to collectives per step (ZeRO paper volumes and each "
                   "backend's own, see each strategy's comm()); step time is a model: FLOPs at a measured "
                   "efficiency plus an alpha-beta cost of the bytes, no overlap (projection.py).")


def prediction_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Predicted vs measured, one row per run that has a prediction (None: no run has one)."""
    if "predicted_peak_mem_bytes" not in df or df["predicted_peak_mem_bytes"].isna().all():
        return None
    rows = []

    def pair(pred, meas, fmt=hbytes) -> str:
        return f"{'not predicted' if blank(pred) else fmt(pred)} / {fmt(meas)}"

    for _, r in df.iterrows():
        rows.append({"run": r["name"], "status": r["status"],
                     "model state: pred. / meas.": pair(r["predicted_model_state_bytes"], r["model_state_bytes"]),
                     "err": _pct(r["model_state_err"]),
                     "peak mem: pred. / meas.": pair(r["predicted_peak_mem_bytes"], r["peak_mem_bytes"]),
                     "err ": _pct(r["peak_mem_err"]), "live heap peak": hbytes(r.get("live_peak_mem_bytes")),
                     "process": hbytes(r.get("process_baseline_bytes")),
                     "comm/step: pred. / meas.": pair(r["predicted_comm_bytes_per_step"], r["comm_bytes_per_step"]),
                     "err  ": _pct(r["comm_err"]),
                     "step: pred. / meas.": pair(r["predicted_step_time_s"], r["step_time_s"], htime),
                     "err   ": _pct(r["step_time_err"])})
    return pd.DataFrame(rows)


def comm_kind_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Communication per step by collective kind: measured calls x bytes (the rank that sent most) and predicted
    bytes, so the report says why one strategy sends more than another."""
    if "comm_kinds" not in df:
        return None
    rows = []
    for _, r in df.iterrows():
        kinds = r["comm_kinds"] if isinstance(r["comm_kinds"], dict) else {}
        row = {"run": r["name"]}
        for k, v in kinds.items():
            calls = "" if blank(v.get("calls")) else f"{v['calls']:.0f} x "
            row[k] = f"{calls}{hbytes(v.get('bytes')) or '0'} (pred. {hbytes(v.get('predicted')) or '0'})"
        if len(row) > 1:
            rows.append(row)
    return pd.DataFrame(rows).fillna("") if rows else None


def machine_line(records: list[dict], hosts: list[str | None] | None = None) -> str:
    """The machine; when the rows ran on several hosts, every one of them (the notes say which row)."""
    s = next((r for r in records if r.get("machine")), {})
    m, v = s.get("machine") or {}, s.get("versions") or {}
    distinct = list(dict.fromkeys(h for h in hosts or [] if isinstance(h, str) and h))  # NaN: a row with no host
    soft = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    if len(distinct) > 1:
        return f"{len(distinct)} different hosts: " + " | ".join(distinct) + "; " + soft
    cpu = distinct[0] if distinct else "; ".join(filter(None, [m.get("cpu"), m.get("cores") and f"{m['cores']} cores"]))
    parts = [cpu, f"{hbytes(m['memory_bytes'])} RAM" if m.get("memory_bytes") else None, soft]
    return "; ".join(p for p in parts if p)


def _legend(t: pd.DataFrame) -> str:
    """What the columns mean: the spread always, the pipeline columns where the table shows them."""
    shown = {head for col, head, _, _ in COLUMNS if col in HIDDEN_WHEN_EMPTY} & set(t.columns)
    return SPREAD_NOTE + (" " + PIPELINE_NOTE if shown else "")


def _markdown(t: pd.DataFrame) -> str:
    try:
        return t.to_markdown(index=False, disable_numparse=True)
    except ImportError:  # tabulate missing: a fixed-width table still reads fine
        return "```\n" + t.to_string(index=False) + "\n```"


def markdown_page(root: Path, df: pd.DataFrame, records: list[dict], images: list[Path], command: str | None) -> str:
    t, notes, _ = display(df)
    out = [f"# Comparison: {root.name}", "", f"Machine: {machine_line(records, list(df['host']))}  ",
           f"Report written {datetime.now():%Y-%m-%d %H:%M}"]
    if command:
        out += ["", f"Command: {command}"]
    if first := winners(df):
        out += ["", *[f"- {line}" for line in first]]
    if why := df.attrs.get("why"):
        out += ["", *[f"- why: {x['line']}" for x in why]]
    out += ["", _markdown(t), "", _legend(t), ""]
    if notes:
        out += ["Notes:", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] + [""]
    if (p := prediction_table(df)) is not None:
        out += ["## Predicted vs measured", "", _markdown(p), "", PREDICTION_NOTE, ""]
    if (w := time_table(df, records)) is not None:
        out += ["## Where the step goes (ms: measured / projected)", ""]
        out += [f"- {x['line']}" for x in df.attrs.get("why", [])] + ([""] if df.attrs.get("why") else [])
        out += [_markdown(w), "", TIME_NOTE, ""]
    if (k := comm_kind_table(df)) is not None:
        out += ["## Communication by kind (per step, the rank that sent most: calls x bytes, and the prediction)", "",
                _markdown(k), ""]
    out += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(out) + "\n"


def html_page(root: Path, df: pd.DataFrame, records: list[dict], images: list[Path], command: str | None) -> str:
    """One file, nothing external: the plots are inline PNGs, so it opens from disk anywhere."""
    t, notes, _ = display(df)
    imgs = "\n".join(f'<h2>{html.escape(p.stem)}</h2>\n<img alt="{html.escape(p.stem)}" '
                     f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    foot = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    cmd = "<br>command: " + re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(command)) if command else ""
    machine = html.escape(machine_line(records, list(df["host"])))
    extra = ""
    if (p := prediction_table(df)) is not None:
        extra += f"<h2>Predicted vs measured</h2>\n{p.to_html(index=False, escape=True, border=0)}\n" \
                 f"<p class=\"meta\">{html.escape(PREDICTION_NOTE)}</p>\n"
    if (w := time_table(df, records)) is not None:
        lines = "".join(f"<li>{html.escape(x['line'])}</li>" for x in df.attrs.get("why", []))
        extra += f"<h2>Where the step goes (ms: measured / projected)</h2>\n<ul>{lines}</ul>\n" \
                 f"{w.to_html(index=False, escape=True, border=0)}\n<p class=\"meta\">{html.escape(TIME_NOTE)}</p>\n"
    if (k := comm_kind_table(df)) is not None:
        extra += f"<h2>Communication by kind</h2>\n{k.to_html(index=False, escape=True, border=0)}\n"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>parallelkit comparison: {html.escape(root.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#eee}}
img{{max-width:100%}} .meta{{color:#555}}</style></head>
<body><h1>parallelkit comparison: {html.escape(root.name)}</h1>
<p class="meta">machine: {machine}<br>report written {datetime.now():%Y-%m-%d %H:%M}{cmd}</p>
{t.to_html(index=False, escape=True, border=0)}
<p class="meta">{html.escape(_legend(t))}</p>
<ol class="notes">{foot}</ol>
{extra}
{imgs}
</body></html>
"""
