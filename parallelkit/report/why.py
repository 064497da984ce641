"""Why one run's step takes longer than another's: the measured parts of each step (``parts_ms``: summary
``step_breakdown`` on the scale of the timed median, measure/breakdown.py), differenced. The differences add up
to the difference between the two runs' median step times."""
from __future__ import annotations

from parallelkit.measure.breakdown import COMPUTE, label, parts_ms


def why(a: dict, b: dict, name_a: str, name_b: str) -> str | None:
    """One line: what makes ``a``'s step longer or shorter than ``b``'s, the largest differences first."""
    pa, pb = parts_ms(a), parts_ms(b)
    if pa is None or pb is None:
        return None
    diff = {k: pa.get(k, 0.0) - pb.get(k, 0.0) for k in {*pa, *pb}}
    total = a["step_time_s"] * 1e3 - b["step_time_s"] * 1e3
    floor = max(0.05 * abs(total), 0.02 * b["step_time_s"] * 1e3)
    big = sorted((k for k in diff if abs(diff[k]) >= floor and k not in COMPUTE), key=lambda k: -abs(diff[k]))[:3]
    said = [f"{diff[k]:+.1f} ms {label(k)}" for k in big]
    ca, cb = sum(pa.get(k, 0) for k in COMPUTE), sum(pb.get(k, 0) for k in COMPUTE)
    dc = ca - cb
    compute = (f"compute equal ({dc:+.1f} ms)" if abs(dc) < max(floor, 0.05 * cb)
               else f"{dc:+.1f} ms compute (forward {diff.get('forward', 0):+.1f}, backward {diff.get('backward', 0):+.1f})")
    rel = f" ({total / (b['step_time_s'] * 1e3):+.0%})" if b["step_time_s"] else ""
    return f"{name_a} vs {name_b}: {total:+.1f} ms per step{rel}: " + ", ".join(said + [compute])


def why_lines(records: list[dict], names: list[str], fastest: str | None, reference: str | None) -> list[dict]:
    """For each run with a breakdown: against the fastest run and against the reference (each where it is not
    that run itself). [{run, against, line}]."""
    by_name = dict(zip(names, records))
    out, said = [], set()
    for name, s in by_name.items():
        if s.get("status") != "ok":
            continue
        for other in dict.fromkeys(x for x in (fastest, reference) if x and x != name and x in by_name):
            if (other, name) in said:  # the fastest against the reference: the mirror of a line already there
                continue
            if line := why(s, by_name[other], name, other):
                out.append({"run": name, "against": other, "line": line})
                said.add((name, other))
    return out
