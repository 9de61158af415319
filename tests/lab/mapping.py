"""The lab's own MAP-E arithmetic, written apart from mape_daemon.mapcalc on purpose.

The BR must not share a bug with the daemon it tests, so this works on bit strings, the way
RFC 7597's figures draw them, and covers only what the lab needs (full IPv4 address, a > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address


@dataclass(frozen=True)
class LabRule:
    ipv6_prefix: str  # e.g. "2400:4050::/34"
    ipv4_prefix: str  # e.g. "153.240.0.0/16"
    ea_len: int
    offset: int
    br: str

    def bits6(self) -> str:
        addr, length = self.ipv6_prefix.split("/")
        return format(int(IPv6Address(addr)), "0128b")[: int(length)]


# The rules the lab's ISP serves, from the operators' published-by-community tables.
# iptables SNAT rules of an OCN mapping: per block, one for tcp and icmp, two for udp (by source
# port while the range has room, then spread per connection).
OCN_SNAT_RULES = 4 * 63
OCN = LabRule("2400:4050::/34", "153.240.0.0/16", 22, 6, "2001:380:a120::9")
V6PLUS = LabRule("240b:10::/31", "106.72.0.0/15", 25, 4, "2404:9200:225:100::64")


@dataclass(frozen=True)
class LabCE:
    prefix56: str
    ipv4: str
    psid: int
    psid_len: int
    offset: int
    ce_draft03: str
    ce_rfc: str

    def port_ranges(self) -> list[tuple[int, int]]:
        m = 16 - self.offset - self.psid_len
        return [
            (int(format(a, f"0{self.offset}b") + format(self.psid, f"0{self.psid_len}b") + "0" * m, 2),
             int(format(a, f"0{self.offset}b") + format(self.psid, f"0{self.psid_len}b") + "1" * m, 2))
            for a in range(1, 2**self.offset)
        ]  # fmt: skip

    def ports(self) -> set[int]:
        return {p for lo, hi in self.port_ranges() for p in range(lo, hi + 1)}


def map_prefix(rule: LabRule, prefix: str) -> LabCE:
    """CE parameters for the /56 (or longer) `prefix` under `rule`."""
    bits = format(int(IPv6Address(prefix.split("/")[0])), "0128b")
    r6 = len(rule.bits6())
    assert bits[:r6] == rule.bits6(), f"{prefix} is not in {rule.ipv6_prefix}"
    ea = bits[r6 : r6 + rule.ea_len]
    v4addr, v4len = rule.ipv4_prefix.split("/")
    p = 32 - int(v4len)
    v4bits = format(int(IPv4Address(v4addr)), "032b")[: int(v4len)] + ea[:p]
    psid_bits = ea[p:]
    ipv4 = str(IPv4Address(int(v4bits, 2)))
    prefix_bits = bits[: r6 + rule.ea_len].ljust(64, "0")
    iid_rfc = "0" * 16 + v4bits + psid_bits.rjust(16, "0")
    iid_draft = "0" * 8 + v4bits + psid_bits.rjust(16, "0") + "0" * 8
    n = r6 + rule.ea_len
    return LabCE(
        prefix56=f"{IPv6Address(int(bits[:n].ljust(128, '0'), 2))}/{n}",
        ipv4=ipv4,
        psid=int(psid_bits, 2),
        psid_len=len(psid_bits),
        offset=rule.offset,
        ce_draft03=str(IPv6Address(int(prefix_bits + iid_draft, 2))),
        ce_rfc=str(IPv6Address(int(prefix_bits + iid_rfc, 2))),
    )
