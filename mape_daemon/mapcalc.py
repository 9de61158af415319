"""RFC 7597 section 5 address and port mapping: pure, no I/O.

A Basic Mapping Rule plus an end-user IPv6 prefix gives the CE its IPv4 address, its PSID,
its port set and its tunnel source address. Everything here is integer arithmetic on
`ipaddress` objects so that it can be checked against the RFC's examples and laws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network


class MappingError(ValueError):
    """An impossible rule or a prefix the rule cannot map; the message names the problem."""


class IidLayout(StrEnum):
    """How the CE's interface identifier is laid out (the BR accepts only one of them)."""

    RFC7597 = "rfc7597"  # 16 zero bits | IPv4 | PSID (RFC 7597 section 6)
    DRAFT03 = "draft03"  # 8 zero bits | IPv4 | PSID | 8 zero bits (draft-ietf-softwire-map-03)


@dataclass(frozen=True)
class MapRule:
    """A Basic Mapping Rule.

    `psid_len` is None when it follows from the EA bits (the usual case); it is given when the
    EA bits carry no PSID and the PSID is provisioned separately (then `psid` is needed too).
    """

    ipv6_prefix: IPv6Network
    ipv4_prefix: IPv4Network
    ea_len: int
    psid_offset: int = 6
    psid_len: int | None = None
    br: IPv6Address | None = None
    isp: str | None = None
    iid: IidLayout = IidLayout.RFC7597

    def __post_init__(self) -> None:
        r6, r4, o, a = self.ipv6_prefix.prefixlen, self.ipv4_prefix.prefixlen, self.ea_len, self.psid_offset
        if not 0 <= a <= 15:
            raise MappingError(f"PSID offset {a} is outside 0..15")
        if o < 0:
            raise MappingError(f"EA-bits length {o} is negative")
        if r6 + o > 128:
            raise MappingError(f"rule prefix /{r6} plus EA length {o} is longer than 128 bits")
        if r4 + o < 32:
            raise MappingError(
                f"rule IPv4 prefix /{r4} with EA length {o} gives an IPv4 prefix, not an address "
                "(IPv4 prefix delegation is not supported)"
            )
        k = self.k
        if k > 16:
            raise MappingError(f"PSID length {k} is longer than 16 bits")
        if a + k > 16:
            raise MappingError(f"PSID offset {a} + PSID length {k} is more than 16 bits")
        if self.psid_len is not None and self.ea_psid_bits and self.psid_len != self.ea_psid_bits:
            raise MappingError(
                f"PSID length {self.psid_len} contradicts the rule: EA length {o} minus "
                f"IPv4 suffix {32 - r4} bits gives {self.ea_psid_bits}"
            )

    @property
    def ea_psid_bits(self) -> int:
        """PSID bits carried in the EA bits (q = o - p)."""
        return self.ea_len - (32 - self.ipv4_prefix.prefixlen)

    @property
    def k(self) -> int:
        """The PSID length in force."""
        return self.ea_psid_bits or (self.psid_len or 0)

    @property
    def end_user_len(self) -> int:
        return self.ipv6_prefix.prefixlen + self.ea_len


@dataclass(frozen=True)
class MapParams:
    """What a rule and an end-user prefix give the CE."""

    rule: MapRule
    end_user_prefix: IPv6Network
    ipv4: IPv4Address
    psid: int
    psid_len: int
    psid_offset: int
    ce_ipv6: IPv6Address
    iid: IidLayout
    port_ranges: tuple[tuple[int, int], ...]

    method = "map-e"  # what every line's parameters say (lines.Line): the method,
    snat = True  # whether we NAT the LAN to `ipv4` over `port_ranges`
    far_end = "BR"  # what the tunnel's remote end is called

    @property
    def ports(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.port_ranges)

    @property
    def br(self) -> IPv6Address | None:
        return self.rule.br

    @property
    def isp(self) -> str:
        return self.rule.isp or "explicit"

    def short(self) -> str:
        return f"{self.ipv4} psid {self.psid}"

    def describe(self) -> str:
        return f"{self.isp} {self.short()}, {self.ports} ports"


def interface_id(ipv4: IPv4Address, psid: int, layout: IidLayout) -> int:
    """The 64-bit interface identifier of the CE address (RFC 7597 section 6 or draft-03)."""
    iid = (int(ipv4) << 16) | psid  # 16 zero bits | IPv4 | PSID
    return iid << 8 if layout is IidLayout.DRAFT03 else iid


def port_ranges(psid: int, psid_len: int, offset: int) -> tuple[tuple[int, int], ...]:
    """The port set of a PSID as inclusive contiguous ranges, ascending.

    port = A * 2^(16-a) + PSID * 2^m + j, with m = 16 - a - k. A = 0 is excluded when a > 0 (it
    would hold the system ports); with a = 0 the A field is empty and the set is one range.
    """
    m = 16 - offset - psid_len
    first_a = 1 if offset > 0 else 0
    return tuple(
        (lo, lo + (1 << m) - 1) for lo in ((a << (16 - offset)) | (psid << m) for a in range(first_a, 1 << offset))
    )


def psid_of_port(port: int, psid_len: int, offset: int) -> int:
    """The PSID whose port set holds `port` (the inverse of `port_ranges`)."""
    m = 16 - offset - psid_len
    return (port >> m) & ((1 << psid_len) - 1)


@dataclass(frozen=True)
class Nearest:
    """Where a wanted port stands in a port set: the block holding it, or the nearest below and
    above (None where the set has none)."""

    port: int
    holding: tuple[int, int] | None
    below: tuple[int, int] | None
    above: tuple[int, int] | None

    def usable(self) -> str:
        near = [f"{r[0]}-{r[1]} ({where})" for r, where in ((self.below, "below"), (self.above, "above")) if r]
        return f"nearest usable: {' and '.join(near)}"

    def text(self) -> str:
        if self.holding is not None:
            return f"port {self.port}: in the set (block {self.holding[0]}-{self.holding[1]})"
        return f"port {self.port}: not in the set; {self.usable()}"


def range_text(r: tuple[int, int]) -> str:
    """A port range as iptables, nft and miniupnpd write it: "1376-1391", or "25565" alone."""
    lo, hi = r
    return f"{lo}-{hi}" if hi > lo else str(lo)


def without(ranges: Sequence[tuple[int, int]], taken: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ports of `ranges` not in `taken`, as contiguous ranges in the order of `ranges`."""
    out = []
    for lo, hi in ranges:
        start = lo
        for t_lo, t_hi in sorted(taken):
            if t_hi < start or t_lo > hi:
                continue
            if t_lo > start:
                out.append((start, t_lo - 1))
            start = max(start, t_hi + 1)
        if start <= hi:
            out.append((start, hi))
    return out


def nearest(ranges: Sequence[tuple[int, int]], port: int) -> Nearest:
    holding = next((r for r in ranges if r[0] <= port <= r[1]), None)
    if holding is not None:
        return Nearest(port, holding, None, None)
    below = max((r for r in ranges if r[1] < port), default=None)
    above = min((r for r in ranges if r[0] > port), default=None)
    return Nearest(port, None, below, above)


def end_user_prefix(rule: MapRule, prefix: IPv6Network | IPv6Address) -> IPv6Network:
    """The end-user prefix (length r6 + o) that `prefix` lies in; error if it cannot be known."""
    net = IPv6Network(prefix) if isinstance(prefix, IPv6Address) else prefix
    n = rule.end_user_len
    if not net.subnet_of(rule.ipv6_prefix):
        raise MappingError(f"{net} is not inside the rule prefix {rule.ipv6_prefix}")
    if net.prefixlen < n:
        raise MappingError(
            f"{net} is shorter than the end-user prefix length /{n} of rule {rule.ipv6_prefix}: "
            "its EA bits are not all known"
        )
    return net.supernet(new_prefix=n) if net.prefixlen > n else net


def compute(
    rule: MapRule,
    prefix: IPv6Network | IPv6Address,
    *,
    psid: int | None = None,
    layout: IidLayout | None = None,
) -> MapParams:
    """Map an end-user prefix (or any address or longer prefix inside it) by `rule`.

    `psid` is the provisioned PSID, needed only when the EA bits do not carry it.
    `layout` overrides the rule's interface-identifier layout.
    """
    eup = end_user_prefix(rule, prefix)
    r6, r4, o = rule.ipv6_prefix.prefixlen, rule.ipv4_prefix.prefixlen, rule.ea_len
    p, q, k = 32 - r4, rule.ea_psid_bits, rule.k
    ea = (int(eup.network_address) >> (128 - r6 - o)) & ((1 << o) - 1)
    suffix = ea >> q
    if q:
        if psid is not None and psid != ea & ((1 << q) - 1):
            raise MappingError(f"provisioned PSID {psid} contradicts PSID {ea & ((1 << q) - 1)} from the EA bits")
        psid = ea & ((1 << q) - 1)
    elif k:
        if psid is None:
            raise MappingError(
                f"rule {rule.ipv6_prefix} has PSID length {k} but no EA bits for it: a PSID must be provisioned"
            )
        if not 0 <= psid < 1 << k:
            raise MappingError(f"provisioned PSID {psid} does not fit in {k} bits")
    else:
        psid = 0
    ipv4 = IPv4Address(int(rule.ipv4_prefix.network_address) | (suffix & ((1 << p) - 1)))
    layout = layout or rule.iid
    iid = interface_id(ipv4, psid, layout)
    # Bits past the end-user prefix (the subnet ID) are zero: the MAP subnet is the first one.
    ce = IPv6Address(int(eup.network_address) | iid)
    return MapParams(
        rule=rule,
        end_user_prefix=eup,
        ipv4=ipv4,
        psid=psid,
        psid_len=k,
        psid_offset=rule.psid_offset,
        ce_ipv6=ce,
        iid=layout,
        port_ranges=port_ranges(psid, k, rule.psid_offset),
    )


def decode_ce(ce: IPv6Address, layout: IidLayout) -> tuple[IPv4Address, int]:
    """IPv4 address and PSID carried in a CE address's interface identifier."""
    iid = int(ce) & ((1 << 64) - 1)
    if layout is IidLayout.DRAFT03:
        iid >>= 8
    return IPv4Address((iid >> 16) & 0xFFFFFFFF), iid & 0xFFFF
