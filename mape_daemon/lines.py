"""The line's IPv4 service, whichever method carries it. Pure: no I/O.

All three put IPv4 in IPv6 (ip6tnl, mode ipip6) from an address of the line's prefix:
- MAP-E (mapcalc.MapParams): a shared IPv4 and a port set; we NAT the LAN into the set.
- DS-Lite (RFC 6333): the AFTR does the NAT; we route the LAN's IPv4 into the tunnel as it is.
- IPIP: a fixed IPv4 routed to us by the provider; we NAT the LAN to it over every port.
Each kind of parameters answers the same questions (method, snat, ipv4, port_ranges, ce_ipv6,
br, end_user_prefix, describe), so the rest of the daemon asks them instead of testing types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Network

from .mapcalc import MapParams, MappingError, MapRule, compute

HB46PP_NAMES = {"map-e": "map_e", "ds-lite": "dslite", "ipip": "ipip"}  # the spec's names for them
TITLE = {"map-e": "MAP-E", "ds-lite": "DS-Lite", "ipip": "IPIP"}
B4_IPV4 = IPv4Address("192.0.0.2")  # RFC 6333 section 5.7: the B4's own IPv4 address, for its own traffic
ALL_PORTS = ((1, 65535),)


LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)({LABEL}\.)*{LABEL}\.?$")


def check_aftr(text: str) -> str:
    """An AFTR as the config or an HB46PP answer gives it: an IPv6 address or a host name."""
    if ":" in text:
        try:
            IPv6Address(text)
        except ValueError as e:
            raise ValueError(f"{text!r} is not an IPv6 address: {e}") from None
    elif not HOSTNAME.match(text):
        raise ValueError(f"{text!r} is neither an IPv6 address nor a host name")
    return text


class NoParameters(MappingError):
    """The method in force lacks a parameter (no AFTR, no fixed IPv4 yet): the message says which."""


@dataclass(frozen=True)
class DsLite:
    end_user_prefix: IPv6Network
    ce_ipv6: IPv6Address  # the B4 address, the tunnel's local end
    aftr: IPv6Address

    method = "ds-lite"
    far_end = "AFTR"
    snat = False  # the AFTR translates; what enters the tunnel keeps its LAN source
    ipv4 = B4_IPV4
    port_ranges = ()
    psid = psid_len = psid_offset = None
    isp = rule = None

    @property
    def br(self) -> IPv6Address:
        return self.aftr

    @property
    def ports(self) -> int:
        return 0

    def short(self) -> str:
        return f"DS-Lite via AFTR {self.aftr}"

    def describe(self) -> str:
        return f"{self.short()}, B4 {self.ce_ipv6}"


@dataclass(frozen=True)
class FixedIpv4:
    """A fixed IPv4 over IPIP: in MAP-E's terms a set of every port (PSID length 0)."""

    end_user_prefix: IPv6Network
    ce_ipv6: IPv6Address  # the tunnel's local end, which the provider is told
    remote: IPv6Address
    ipv4: IPv4Address

    method = "ipip"
    far_end = "provider end"
    snat = True
    port_ranges = ALL_PORTS
    psid = psid_len = psid_offset = 0
    isp = rule = None

    @property
    def br(self) -> IPv6Address:
        return self.remote

    @property
    def ports(self) -> int:
        return 65535

    def short(self) -> str:
        return f"fixed IPv4 {self.ipv4}"

    def describe(self) -> str:
        return f"{self.short()} over IPIP to {self.remote}"


Line = MapParams | DsLite | FixedIpv4


@dataclass(frozen=True)
class Ipip:
    """One IPIP tunnel an HB46PP answer offers."""

    local: IPv6Address
    remote: IPv6Address
    ipv4: IPv4Interface


@dataclass(frozen=True)
class Provisioned:
    """What an HB46PP answer gives the method chosen from it (`method` in our names)."""

    method: str
    source: str
    rules: tuple[MapRule, ...] = ()  # map-e
    aftr: str | None = None  # ds-lite: a name or an IPv6 address
    ipip: Ipip | None = None  # ipip: the first tunnel offered

    def describe(self) -> str:
        if self.rules:
            return f"MAP-E rules from {self.source} ({len(self.rules)} rule(s), BR {self.rules[0].br})"
        if self.aftr is not None:
            return f"DS-Lite from {self.source} (AFTR {self.aftr})"
        assert self.ipip is not None
        return f"IPIP from {self.source} (fixed IPv4 {self.ipip.ipv4.ip}, provider end {self.ipip.remote})"


def with_interface_id(prefix: IPv6Network, iid: IPv6Address) -> IPv6Address:
    """The address of `prefix`'s first /64 with interface identifier `iid` (its low 64 bits)."""
    return IPv6Address((int(prefix.network_address) >> 64 << 64) | (int(iid) & (1 << 64) - 1))


def line_for(config, address: IPv6Address) -> Line:  # config: config.Config
    """The parameters of the method in force for the prefix of `address` (a WAN address, or a
    delegated prefix's first address). DS-Lite and IPIP take their tunnel address from its /64.
    Raises MappingError (NoParameters where a parameter is missing) naming the problem."""
    method = config.method()
    if method == "map-e":
        return compute(config.isp.match(address), address, psid=config.isp.psid)
    prefix = IPv6Network((address, 64), strict=False)
    if method == "ds-lite":
        return DsLite(prefix, with_interface_id(prefix, config.dslite.interface_id), config.aftr())
    remote, ipv4, iid = config.ipip_tunnel()
    return FixedIpv4(prefix, with_interface_id(prefix, iid), remote, ipv4)
