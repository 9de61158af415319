"""Which WAN address the MAP-E parameters come from. Pure: no I/O.

Only an address some rule maps (fail closed), never one of our own CE /128s. With several
candidates the choice is deterministic: preferred before deprecated (renumbering announces the new
prefix and deprecates the old), then the longest preferred lifetime (the most recently announced
prefix), then the lowest address numerically.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv6Address

from .config import Config
from .mapcalc import MapParams, MappingError, compute
from .state import WanAddress


@dataclass(frozen=True)
class Selection:
    params: MapParams | None
    source: WanAddress | None = None
    reason: str = ""  # why there are no parameters
    held: bool = False  # the prefix is gone but kept through the flap hold-down


@lru_cache(maxsize=16)  # every sync maps the same address or two: a no-op sync computes nothing
def map_address(config: Config, address: str) -> MapParams:
    addr = IPv6Address(address)
    rule = config.isp.rule_table().match(addr, config.isp.isp_filter)
    return compute(rule, addr, psid=config.isp.psid)


def is_ce_address(config: Config, address: str) -> bool:
    """True when `address` is exactly the CE address its own prefix maps to: one of ours."""
    try:
        return map_address(config, address).ce_ipv6 == IPv6Address(address)
    except MappingError:
        return False


def preference(w: WanAddress) -> tuple[bool, int, int]:
    return (w.deprecated, -w.preferred_lft, int(IPv6Address(w.address)))


def select(config: Config, wan: Collection[WanAddress], ours: Collection[str] = ()) -> Selection:
    candidates = [
        w for w in wan if w.address not in ours and not (w.ours_shape and is_ce_address(config, w.address))
    ]  # fmt: skip
    if not candidates:
        return Selection(None, reason=f"no global IPv6 address on {config.wan.interface}")
    problems = []
    for w in sorted(candidates, key=preference):
        try:
            return Selection(map_address(config, w.address), w)
        except MappingError as e:
            problems.append(str(e))
    return Selection(None, reason="; ".join(dict.fromkeys(problems)))
