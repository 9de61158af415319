"""The bundled Basic Mapping Rule tables of the Japanese MAP-E services, and rule matching.

No ISP publishes its rules and NTT NGN sends no DHCPv6 option 94, so the tables ship with the
daemon (package data `data/map-rules.json`, provenance in its `about` text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from ipaddress import IPv4Network, IPv6Address, IPv6Network

from .mapcalc import IidLayout, MappingError, MapRule

ISP_NAMES = {
    "ocn": "OCN Virtual Connect",
    "v6plus": "v6plus (JPNE)",
    "biglobe": "BIGLOBE IPv6 Option",
    "nuro": "NURO (unverified)",
}
UNVERIFIED = frozenset({"nuro"})
# OCN lines numbered from this block are not provisioned for OCN Virtual Connect.
OCN_NON_VC = IPv6Network("2409::/16")


class NoRuleError(MappingError):
    """No bundled rule covers the prefix: fail closed, never guess."""


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[MapRule, ...]
    about: str = ""

    def __post_init__(self) -> None:
        # Index by prefix length, then by network number, for a longest-prefix match in a few
        # dictionary look-ups (the calc benchmark maps 10,000 prefixes in one process).
        index: dict[int, dict[int, list[MapRule]]] = {}
        for r in self.rules:
            index.setdefault(r.ipv6_prefix.prefixlen, {}).setdefault(int(r.ipv6_prefix.network_address), []).append(r)
        object.__setattr__(self, "_index", sorted(index.items(), reverse=True))

    def match(self, prefix: IPv6Network | IPv6Address, isp: str | None = None) -> MapRule:
        """The longest rule IPv6 prefix containing `prefix` (of ISP `isp` if given)."""
        net = IPv6Network(prefix) if isinstance(prefix, IPv6Address) else prefix
        addr = int(net.network_address)
        for length, by_net in self._index:  # type: ignore[attr-defined]
            if length > net.prefixlen:
                continue
            key = addr >> (128 - length) << (128 - length)
            for rule in by_net.get(key, ()):
                if isp is None or rule.isp == isp:
                    return rule
        raise NoRuleError(no_rule_message(prefix, isp))


def no_rule_message(prefix: IPv6Network | IPv6Address, isp: str | None) -> str:
    which = f"{ISP_NAMES.get(isp, isp)} rule" if isp else "bundled MAP-E rule"
    msg = f"{prefix} matches no {which}"
    if prefix in OCN_NON_VC if isinstance(prefix, IPv6Address) else prefix.subnet_of(OCN_NON_VC):
        msg += " (OCN lines numbered from 2409::/16 are not served by OCN Virtual Connect)"
    else:
        msg += "; give the rule explicitly (--rule or [isp] rule in the config)"
    return msg


def rule_from_dict(d: dict, layout: IidLayout = IidLayout.DRAFT03) -> MapRule:
    return MapRule(
        ipv6_prefix=IPv6Network(d["ipv6_prefix"]),
        ipv4_prefix=IPv4Network(d["ipv4_prefix"]),
        ea_len=int(d["ea_len"]),
        psid_offset=int(d["psid_offset"]),
        psid_len=int(d["psid_len"]),
        br=IPv6Address(d["br"]),
        isp=d["isp"],
        iid=layout,
    )


@cache
def bundled() -> RuleTable:
    """The rule table shipped with the package (all of its ISPs use the draft-03 layout)."""
    raw = json.loads(resources.files(__package__).joinpath("data/map-rules.json").read_text())
    return RuleTable(tuple(rule_from_dict(d) for d in raw["rules"]), raw.get("about", ""))
