"""Bytes, counts and times as people read them, and sizes as people write them. Written once."""
from __future__ import annotations

import re

from parallelkit.config.errors import ConfigError

GiB = 2**30
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}  # powers of 1000 (or of 1024 with an "i")


def parse_bytes(value, key: str = "gpu_memory") -> int | None:
    """Bytes, or a size string: 80GB (GB = 1e9), 24GiB (GiB = 2^30); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(value), re.I)
    if isinstance(value, bool) or not m or (m[3] and not m[2]) or float(m[1]) <= 0:
        raise ConfigError(f"{key}={value!r}: give bytes or a size such as 80GB (1e9) or 24GiB (2^30)")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** _POWERS[m[2].lower()])


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
