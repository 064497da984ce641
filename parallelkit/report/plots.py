"""The report's PNG plots: memory per rank, throughput, loss curves. matplotlib, Agg backend.

Failed runs keep their place on the x axis with their status written in, so a sweep's
plot shows what did not run as plainly as what did.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from parallelkit.measure.breakdown import label as part_label  # noqa: E402
from parallelkit.measure.breakdown import parts_ms  # noqa: E402
from parallelkit.report.aggregate import aligned_losses  # noqa: E402
from parallelkit.util.units import byte_unit  # noqa: E402

STATE_PARTS = (("params", "#4c72b0"), ("grads", "#dd8452"), ("optimizer", "#55a868"))


def _width(n: int) -> float:
    return min(30.0, max(7.0, 0.55 * n + 3))


def _xaxis(ax, df: pd.DataFrame) -> None:
    ax.set_xticks(range(len(df)))
    ax.set_xticklabels(df["name"], rotation=35, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    for x, (status, ok) in enumerate(zip(df["status"], df["status"] == "ok")):
        if not ok:
            ax.text(x, 0, f" {status}", rotation=90, va="bottom", ha="center", fontsize=8, color="#c44e52")


def _ranks(v) -> list[float]:
    return [float(x) for x in v if x is not None] if isinstance(v, list) else []


def plot_memory(df: pd.DataFrame, records: list[dict], path: Path) -> Path:
    """Top: peak memory of every rank. Bottom: model state of every rank, stacked by kind."""
    fig, (a, b) = plt.subplots(2, 1, figsize=(_width(len(df)), 9))
    peaks = [_ranks(s.get("peak_mem_bytes")) for s in records]
    div, unit = byte_unit(max((max(p) for p in peaks if p), default=1))
    for x, (p, s) in enumerate(zip(peaks, records)):
        w = 0.8 / max(1, len(p))
        stage_of = (s.get("strategy_facts") or {}).get("stage_of_rank") or []
        for r, v in enumerate(p):
            a.bar(x - 0.4 + w * (r + 0.5), v / div, w * 0.9, color=f"C{r % 10}", label=f"rank {r}")
            if len(stage_of) == len(p):  # a pipeline: which stage each rank runs (they hold different layers)
                a.text(x - 0.4 + w * (r + 0.5), v / div, f"s{stage_of[r]}", ha="center", va="bottom", fontsize=7)
    kind = next((s.get("peak_mem_kind") for s in records if s.get("peak_mem_kind")), None)
    a.set_title(f"peak memory per rank ({kind or 'per rank'})")
    a.set_ylabel(unit)
    _dedupe_legend(a)
    _xaxis(a, df)

    states = [s.get("model_state_breakdown") or [] for s in records]
    tops = [sum(d.get(k) or 0 for k, _ in STATE_PARTS) for st in states for d in st]
    div, unit = byte_unit(max(tops, default=1))
    for x, st in enumerate(states):
        w = 0.8 / max(1, len(st))
        for r, d in enumerate(st):
            bottom = 0.0
            for k, color in STATE_PARTS:
                v = (d.get(k) or 0) / div
                b.bar(x - 0.4 + w * (r + 0.5), v, w * 0.9, bottom=bottom, color=color, label=k, edgecolor="white", lw=0.5)
                bottom += v
    b.set_title("model state per rank (one bar per rank)")
    b.set_ylabel(unit)
    _dedupe_legend(b)
    _xaxis(b, df)
    return _save(fig, path)


def plot_throughput(df: pd.DataFrame, path: Path) -> Path:
    fig, (a, b) = plt.subplots(2, 1, figsize=(_width(len(df)), 8))
    hatch = ["//" if ok and not fair else "" for ok, fair in zip(df["status"] == "ok", df["like_for_like"])]
    noisy = [v is not None and v == v and bool(v) for v in df["noisy"]]  # None/NaN: an older summary
    edge = ["#c44e52" if z else "white" for z in noisy]
    tps = df["tokens_per_s"].astype(float).fillna(0)
    lo, hi = df["tokens_per_s_lo"].astype(float), df["tokens_per_s_hi"].astype(float)
    a.bar(range(len(df)), tps, color="#4c72b0", hatch=hatch, edgecolor=edge, lw=1.5)
    has = lo.notna() & hi.notna()
    if has.any():  # the spread: p10-p90 of the steps, or min-max of the repeats
        a.errorbar([i for i, h in enumerate(has) if h], tps[has], yerr=[(tps - lo)[has].clip(lower=0),
                   (hi - tps)[has].clip(lower=0)], fmt="none", ecolor="black", capsize=3, lw=1)
    for x, z in enumerate(noisy):
        if z:
            a.text(x, max(tps.iloc[x], hi.fillna(0).iloc[x]), "noisy", ha="center", va="bottom", fontsize=8, color="#c44e52")
    a.set_title("tokens/s: median; bars: p10-p90 of the steps, or min-max of the repeats\n"
                "hatched: not like for like; red 'noisy': the machine was busy (see the report's notes)", fontsize=10)
    _xaxis(a, df)
    b.bar(range(len(df)), df["mfu"].astype(float).fillna(0) * 100, color="#55a868", hatch=hatch, edgecolor="white")
    b.set_title("MFU per device")
    b.set_ylabel("% of peak")
    _xaxis(b, df)
    return _save(fig, path)


def plot_loss(df: pd.DataFrame, records: list[dict], path: Path) -> Path:
    """Left: every loss curve overlaid. Right: each run minus its reference, step by step."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    byname = {n: s for n, s in zip(df["name"], records)}
    styles = ["-", "--", ":", "-."]
    for i, (name, s) in enumerate(byname.items()):
        losses = [v for v in s.get("losses") or [] if v is not None]
        if not losses:
            continue
        ls = styles[i % len(styles)]  # identical trajectories stay visible
        first = s.get("first_step") or 0  # a resumed run starts at its checkpoint's step
        a.plot(range(first, first + len(losses)), losses, ls, color=f"C{i % 10}", label=name, lw=1.2)
        ref = df["reference"].iloc[i]
        if isinstance(ref, str) and ref != name:
            pairs = aligned_losses(s, byname[ref])
            b.plot([k for k, _, _ in pairs], [x - y for _, x, y in pairs], ls, color=f"C{i % 10}", label=f"{name} - {ref}")
    a.set_title("loss per step")
    a.set_xlabel("step")
    b.set_title("loss minus its reference run, step by step")
    b.set_xlabel("step")
    b.axhline(0, color="black", lw=0.5)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=1 + len(df) // 15)
    return _save(fig, path)


def plot_comm(df: pd.DataFrame, path: Path) -> Path | None:
    """Bytes per step, largest rank: point-to-point (pipeline activations and their gradients) and collectives
    stacked; None when no run moved anything point to point (no pipeline in the sweep)."""
    p2p = df["comm_p2p_bytes"].astype(float).fillna(0) if "comm_p2p_bytes" in df else None
    if p2p is None or not (p2p > 0).any():
        return None
    coll = df["comm_collective_bytes"].astype(float).fillna(0)
    div, unit = byte_unit(max((p2p + coll).max(), 1))
    fig, ax = plt.subplots(figsize=(_width(len(df)), 4.5))
    ax.bar(range(len(df)), p2p / div, color="#8172b3", label="point-to-point (send/recv)")
    ax.bar(range(len(df)), coll / div, bottom=p2p / div, color="#937860", label="collectives")
    ax.set_title("communication per step (largest rank, counted on the probe step)")
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)
    _xaxis(ax, df)
    return _save(fig, path)


STEP_COLORS = {"forward": "#4c72b0", "backward": "#55a868", "optimizer": "#dd8452", "pipeline_idle": "#8172b3",
               "other": "#bbbbbb"}
COMM_COLORS = ("#c44e52", "#da8bc3", "#937860", "#ccb974", "#64b5cd", "#8c8c8c")


def plot_step_parts(df: pd.DataFrame, records: list[dict], path: Path) -> Path | None:
    """One stacked bar per run: where its median step goes (measure/breakdown.py), exposed communication by kind;
    a black tick at the projected step time. None when no run has a breakdown."""
    parts = [parts_ms(s) for s in records]
    if not any(parts):
        return None
    kinds = sorted({k for p in parts if p for k in p if k.startswith("exposed ")})
    order = ["forward", "backward", "optimizer", *kinds, "pipeline_idle", "other"]
    colors = {**STEP_COLORS, **{k: COMM_COLORS[i % len(COMM_COLORS)] for i, k in enumerate(kinds)}}
    fig, ax = plt.subplots(figsize=(_width(len(df)) + 3, 4.8))
    bottom = [0.0] * len(df)
    for part in order:
        h = [(p or {}).get(part, 0.0) for p in parts]
        if any(h):
            ax.bar(range(len(df)), h, bottom=bottom, color=colors[part], label=part_label(part))
            bottom = [b + x for b, x in zip(bottom, h)]
    for i, s in enumerate(records):
        proj = ((s.get("prediction") or {}).get("projection") or {}).get("step_s")
        if proj and parts[i]:
            ax.plot([i - 0.4, i + 0.4], [proj * 1e3] * 2, color="black", lw=2,
                    label="projected step" if i == next(j for j, p in enumerate(parts) if p) else None)
    ax.set_title("where the step goes (a profiled untimed step, on the timed median's scale)", fontsize=10)
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    _xaxis(ax, df)
    return _save(fig, path)


def plot_by(df: pd.DataFrame, x: str, ys: list[tuple[str, str]], path: Path, logx: bool = False) -> Path | None:
    """One line per label across the values of x (model size, world size); None when x does not vary."""
    ok = df[(df["status"] == "ok") & df[x].notna()]
    other = "model" if x == "world" else "world"  # a line holds everything else fixed
    lines = [(label if ok[other].nunique() == 1 else f"{label} {o}", g.sort_values(x))
             for (label, o), g in ok.groupby(["label", other], sort=False) if g[x].nunique() > 1]
    if not lines:
        return None
    fig, axes = plt.subplots(1, len(ys), figsize=(6.5 * len(ys), 4.5), squeeze=False)
    for ax, (col, title) in zip(axes[0], ys):
        is_bytes = col.endswith("bytes")
        div, unit = byte_unit(ok[col].astype(float).max()) if is_bytes else (1, "")
        for i, (label, g) in enumerate(lines):
            ax.plot(g[x], g[col].astype(float) / div, "o" + ["-", "--", ":", "-."][i % 4], label=label, color=f"C{i % 10}")
        ax.set_title(title)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(unit)
        if logx:  # model sizes span orders of magnitude, and so does their memory
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.set_xticks(sorted(ok[x].unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _dedupe_legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    if seen:
        ax.legend(seen.values(), seen.keys(), fontsize=7)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(df: pd.DataFrame, records: list[dict], root: Path) -> list[Path]:
    """memory.png, throughput.png, loss.png in root; memory_vs_model.png, scaling.png and long_context.png where
    the sweep varies the model, the world size or the sequence length."""
    root = Path(root)
    out = [plot_memory(df, records, root / "memory.png"), plot_throughput(df, root / "throughput.png"),
           plot_loss(df, records, root / "loss.png"), plot_comm(df, root / "comm.png"),
           plot_step_parts(df, records, root / "step_parts.png"),
           plot_by(df, "params", [("peak_mem_bytes", "peak memory per rank (max)"),
                                  ("model_state_bytes", "model state per rank (max)")], root / "memory_vs_model.png", logx=True),
           plot_by(df, "world", [("tokens_per_s", "tokens/s"), ("peak_mem_bytes", "peak memory per rank (max)")],
                   root / "scaling.png"),
           plot_by(df, "seq_len", [("peak_mem_bytes", "peak RSS per rank (max), measured"),
                                   ("live_peak_mem_bytes", "live tensors' peak per rank (max), measured"),
                                   ("predicted_peak_mem_bytes", "peak memory per rank, predicted"),
                                   ("tokens_per_s", "tokens/s")], root / "long_context.png", logx=True)
           if "predicted_peak_mem_bytes" in df and df["predicted_peak_mem_bytes"].notna().any() else None]
    for stale in ("memory_vs_model.png", "scaling.png", "comm.png", "long_context.png", "step_parts.png"):  # from an earlier report of a different sweep
        if root / stale not in out:
            (root / stale).unlink(missing_ok=True)
    return [p for p in out if p is not None]
