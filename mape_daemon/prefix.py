"""Which prefix the line's parameters (MAP-E, DS-Lite, IPIP: lines.Line) come from. Pure: no I/O.

Two sources: a prefix delegated to the router by DHCPv6-PD, and the WAN's global addresses
(SLAAC). `wan.prefix_from` picks one, or both ("auto"): a delegation first, since it is the prefix
routed to this router (on some lines the WAN's RA prefix is the access link's, not the
subscriber's). Only an address or prefix some rule maps counts (fail closed), never one of our
own CE /128s. Within a source the choice is deterministic: preferred before deprecated
(renumbering announces the new prefix and deprecates the old), then the longest preferred
lifetime (the most recently announced prefix), then the lowest address numerically.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from functools import lru_cache
from ipaddress import IPv6Address

from .config import Config
from .lines import Line, line_for
from .mapcalc import MappingError
from .state import WanAddress


@dataclass(frozen=True)
class Selection:
    params: Line | None
    source: WanAddress | None = None
    reason: str = ""  # why there are no parameters
    held: bool = False  # the prefix is gone but kept through the flap hold-down
    passed_over: str = ""  # the other source, where it maps to another prefix (said, not used)


@lru_cache(maxsize=16)  # every sync maps the same address or two: a no-op sync computes nothing
def map_address(config: Config, address: str) -> Line:
    return line_for(config, IPv6Address(address))


def is_ce_address(config: Config, address: str) -> bool:
    """True when `address` is exactly the CE address its own prefix maps to: one of ours."""
    try:
        return map_address(config, address).ce_ipv6 == IPv6Address(address)
    except MappingError:
        return False


def preference(w: WanAddress) -> tuple[bool, int, int]:
    return (w.deprecated, -w.preferred_lft, int(IPv6Address(w.address)))


def select(
    config: Config, wan: Collection[WanAddress], ours: Collection[str] = (), delegated: Collection[WanAddress] = ()
) -> Selection:
    sources = {"slaac": (wan,), "pd": (delegated,), "auto": (delegated, wan)}[config.wan.prefix_from]
    found: list[Selection] = []
    problems: list[str] = []
    for candidates in sources:
        chosen = _first_mapped(config, candidates, ours, problems)
        if chosen is not None:
            found.append(chosen)
    if not found:
        return Selection(None, reason="; ".join(dict.fromkeys(problems)) or _nothing(config))
    first, *rest = found
    assert first.params is not None
    for other in rest:  # both sources map, to different prefixes: the first source wins, the other is said
        assert other.params is not None and other.source is not None
        if other.params.end_user_prefix != first.params.end_user_prefix:
            return replace(first, passed_over=f"{other.source.describe()} maps to {other.params.end_user_prefix}")
    return first


def source_text(selection: Selection) -> str | None:
    """Where the mapping's prefix was taken from, and the other source when it maps elsewhere."""
    if selection.source is None:
        return "the held prefix" if selection.held else None
    other = f"; not used: {selection.passed_over}" if selection.passed_over else ""
    return selection.source.describe() + other


def _first_mapped(config: Config, candidates: Collection[WanAddress], ours: Collection[str],
                  problems: list[str]) -> Selection | None:  # fmt: skip
    usable = [w for w in candidates
              if w.address not in ours and not (w.ours_shape and is_ce_address(config, w.address))]  # fmt: skip
    for w in sorted(usable, key=preference):
        try:
            return Selection(map_address(config, w.address), w)
        except MappingError as e:
            problems.append(str(e))
    return None


def _nothing(config: Config) -> str:
    wan = config.wan.interface
    return {"slaac": f"no global IPv6 address on {wan}", "pd": "no delegated prefix (no DHCPv6-PD route)",
            "auto": f"no global IPv6 address on {wan} and no delegated prefix"}[config.wan.prefix_from]  # fmt: skip
