"""Port forwards against the port set. Pure: no I/O.

A forward can only work on ports of the set: the BR sends the line nothing else. Which forwards
are usable follows the mapping; the others are reported, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import Config, ForwardConfig
from .mapcalc import nearest


def in_set(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> bool:
    """Every port lo..hi in the set (a range across two blocks has the gap between them)."""
    return any(r_lo <= lo and hi <= r_hi for r_lo, r_hi in ranges)


def why_not(f: ForwardConfig, ranges: Sequence[tuple[int, int]]) -> str | None:
    """None when `f` can work on this set; otherwise why not, with the usable ports nearest."""
    lo, hi = f.external
    if in_set(ranges, lo, hi):
        return None
    if not ranges:
        return "this line has no ports of ours (DS-Lite: the AFTR owns them)"
    outside = next(p for p in range(lo, hi + 1) if not in_set(ranges, p, p))
    return f"{f.protocol} {outside} is outside this line's port set; {nearest(ranges, outside).usable()}"


def split(config: Config, ranges: Sequence[tuple[int, int]]) -> tuple[list[ForwardConfig], list[str]]:
    """(the forwards usable on this set, one line for each of the others)."""
    active, unavailable = [], []
    for f in config.forward:
        reason = why_not(f, ranges)
        if reason is None:
            active.append(f)
        else:
            unavailable.append(f"forward {f.describe()}: {reason}")
    return active, unavailable


def check(config: Config, ranges: Sequence[tuple[int, int]], what: str) -> str | None:
    """The first forward outside the set as one config error line naming its key, or None."""
    for i, f in enumerate(config.forward):
        if (reason := why_not(f, ranges)) is not None:
            return f"forward.{i}.port: {reason} ({what})"
    return None
