"""Which WAN address the MAP-E parameters come from. Pure: no I/O.

Preferred addresses before deprecated ones (renumbering announces the new prefix and deprecates
the old), never our own CE /128, and only an address that some rule maps: fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Address

from .config import Config
from .mapcalc import MapError, MapParams, compute
from .state import WanAddress


@dataclass(frozen=True)
class Selection:
    params: MapParams | None
    source: WanAddress | None = None
    reason: str = ""  # why there are no parameters


def map_address(config: Config, address: str) -> MapParams:
    addr = IPv6Address(address)
    rule = config.isp.rule_table().match(addr, config.isp.isp_filter)
    return compute(rule, addr, psid=config.isp.psid)


def is_ce_address(config: Config, address: str) -> bool:
    """True when `address` is exactly the CE address its own prefix maps to: one we added."""
    try:
        return map_address(config, address).ce_ipv6 == IPv6Address(address)
    except MapError:
        return False


def select(config: Config, wan: list[WanAddress]) -> Selection:
    candidates = [w for w in wan if not (w.ours_shape and is_ce_address(config, w.address))]
    if not candidates:
        return Selection(None, reason=f"no global IPv6 address on {config.wan.interface}")
    problems = []
    for w in sorted(candidates, key=lambda w: (w.deprecated, w.address)):
        try:
            return Selection(map_address(config, w.address), w)
        except MapError as e:
            problems.append(str(e))
    return Selection(None, reason="; ".join(dict.fromkeys(problems)))
