"""Report-side reading of the noise fields: spreads, repeats merged into one row, hosts told apart.

A median alone hides how much it moved; a row per repeat hides which numbers belong
together; rows from two machines side by side look comparable and are not. So: every
row carries a low-high range and a spread, the repeats of one configuration become one
row (median of the repeats, their min-max, ``n``), and a report that mixes hosts says so.
Older summaries (no step times, no host facts) load with those fields empty.
"""
from __future__ import annotations

import json
import statistics

from parallelkit.measure.calibrate import FLAGS
from parallelkit.measure.noise import SPREAD_LIMIT, noise_fields


def config_key(cfg: dict) -> str:
    """Identity of a run's configuration apart from its repeat index."""
    return json.dumps({k: v for k, v in cfg.items() if k != "repeat"}, sort_keys=True, default=str)


def with_spread(s: dict) -> dict:
    """One run's record with its range: p10-p90 of its timed steps (older summaries: none)."""
    s = dict(s)
    if s.get("step_time_p90_s") is None and s.get("step_times_s"):  # step times but not the fields
        s.update({k: v for k, v in noise_fields(s["step_times_s"], None, None).items() if k.startswith("step_time")})
    p10, p90, tps = s.get("step_time_p10_s"), s.get("step_time_p90_s"), s.get("tokens_per_step")
    s["n"] = 1
    s.setdefault("noisy", None)
    if s.get("status") == "ok" and p10 and p90:
        s.update(step_time_lo_s=p10, step_time_hi_s=p90, spread=s.get("step_time_spread"),
                 spread_of=f"p10-p90 of {len(s.get('step_times_s') or []) or s.get('timed_steps')} timed steps")
        if tps:
            s.update(tokens_per_s_lo=tps / p90, tokens_per_s_hi=tps / p10)
    return s


def merge_repeats(records: list[dict]) -> list[dict]:
    """Records of one configuration run with repeats=N become one, at the first one's place."""
    groups: dict[str, list[dict]] = {}
    order: list[str | dict] = []
    for s in records:
        if s.get("repeat") is None:
            order.append(with_spread(s))
            continue
        key = json.dumps([s.get(k) for k in ("config_key", "strategy", "label", "model", "world_size", "dp", "tp", "pp",
                                             "precision", "global_batch", "seq_len", "steps")], default=str)
        if key not in groups:
            order.append(key)
        groups.setdefault(key, []).append(s)
    return [x if isinstance(x, dict) else _merge(groups[x]) for x in order]


def _merge(group: list[dict]) -> dict:
    if len(group) == 1:
        return with_spread(group[0])
    ok = [s for s in group if s.get("status") == "ok"]
    m = dict(ok[0] if ok else group[0])
    m.update(run=", ".join(s["run"] for s in group), repeats=[s.get("repeat") for s in group], n=len(ok) or len(group),
             _extra_notes=[f"{len(group) - len(ok)} of {len(group)} repeats not ok: " + "; ".join(
                 f"repeat {s.get('repeat')}: {s.get('status')}: {s.get('error')}" for s in group if s not in ok)]
             if len(ok) < len(group) else [])
    if not ok:
        return m
    for k in ("tokens_per_s", "step_time_s", "tflops", "mfu", "predicted_step_time_s"):  # each repeat projected
        vals = [s[k] for s in ok if s.get(k) is not None]  # its own step, with rates measured beside it
        m[k] = statistics.median(vals) if vals else None
    steps = [s["step_time_s"] for s in ok if s.get("step_time_s")]
    tps = [s["tokens_per_s"] for s in ok if s.get("tokens_per_s")]
    reasons = [f"repeat {s.get('repeat')}: {s['noise_reason']}" for s in ok if s.get("noisy")]
    if len(steps) > 1:
        spread = max(steps) / min(steps)
        m.update(step_time_lo_s=min(steps), step_time_hi_s=max(steps), spread=spread,
                 spread_of=f"min-max of {len(steps)} repeats")
        if spread > SPREAD_LIMIT:
            reasons.insert(0, f"machine busy: repeats varied {spread:.2f}x (slowest/fastest, limit {SPREAD_LIMIT}x)")
    if tps:
        m.update(tokens_per_s_lo=min(tps), tokens_per_s_hi=max(tps))
    drifts = [s["peak_drift"] for s in ok if s.get("peak_drift") is not None]
    m.update(noisy=bool(reasons), noise_reason="; ".join(reasons) or None,
             peak_drift=max(drifts, key=abs) if drifts else None,
             peak_raised_from=next((s["peak_raised_from"] for s in ok if s.get("peak_raised_from")), None),
             mfu_error=next((s["mfu_error"] for s in ok if s.get("mfu_error")), None))
    return m


def _host_parts(s: dict) -> tuple:
    h, m = s.get("host") or {}, s.get("machine") or {}
    dev = s.get("device")
    gpu = h.get("gpu") or (dev if dev not in (None, "cpu") else None)
    flags = tuple(f for f in FLAGS if h.get(f)) if h else None
    return gpu, h.get("cpu") or m.get("cpu"), h.get("cores") or m.get("cores"), flags


def host_labels(records: list[dict]) -> list[str | None]:
    """A label per record naming its hardware; older summaries (no flags) borrow a same-CPU record's."""
    parts = [_host_parts(s) for s in records]
    known: dict[tuple, set] = {}
    for gpu, cpu, cores, flags in parts:
        if flags is not None:
            known.setdefault((gpu, cpu, cores), set()).add(flags)
    labels = []
    for gpu, cpu, cores, flags in parts:
        if cpu is None and gpu is None:
            labels.append(None)
            continue
        if flags is None and len(known.get((gpu, cpu, cores), ())) == 1:
            flags = next(iter(known[(gpu, cpu, cores)]))
        text = f"{cpu}, {cores} cores" + (f", {' '.join(flags) or 'no avx2'}" if flags is not None else "")
        labels.append(f"{gpu} (host CPU {text})" if gpu else text)
    return labels


def aligned_losses(s: dict, r: dict) -> list[tuple[int, float, float]]:
    """(step, this run's loss, the reference's loss) for every step both recorded: a run's ``losses`` start at its
    ``first_step`` (a resumed run: the checkpoint's step; summaries before the field: 0)."""
    a0, b0 = s.get("first_step") or 0, r.get("first_step") or 0
    a, b = s.get("losses") or [], r.get("losses") or []
    return [(a0 + i, x, b[a0 + i - b0]) for i, x in enumerate(a)
            if 0 <= a0 + i - b0 < len(b) and x is not None and b[a0 + i - b0] is not None]
