"""Bytes, counts and times as people read them. Written once."""
from __future__ import annotations

GiB = 2**30


def blank(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def hbytes(v) -> str:
    """Bytes in binary units, 3 significant digits: 1536 -> '1.5 KiB'; None or NaN -> ''."""
    if blank(v):
        return ""
    v, units = float(v), ["B", "KiB", "MiB", "GiB", "TiB"]
    while abs(v) >= 1000 and len(units) > 1:
        v, units = v / 1024, units[1:]
    return f"{v:.3g} {units[0]}" if v else "0"


def size(b: float) -> str:
    """Bytes with one decimal in the largest binary unit: 1.5 GiB, 300.0 MiB."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= div:
            return f"{b / div:,.1f} {unit}"
    return f"{b:.0f} B"


def gib(b: float) -> str:
    """GiB with one decimal (MiB below a tenth of one), for one-line messages."""
    return f"{b / GiB:.1f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:.0f} MiB"


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """The binary unit a plot of values up to ``max_bytes`` reads best in: (divisor, name)."""
    for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= div:
            return div, name
    return 1, "B"


def hcount(v) -> str:
    """1.3e9 -> '1.3B'."""
    if blank(v):
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def htime(v) -> str:
    """Seconds as ms below 1 s, else s; 3 significant digits."""
    return "" if blank(v) else (f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s")
