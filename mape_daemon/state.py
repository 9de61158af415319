"""The kernel objects mape-daemon owns, as plain values: what `desired` builds, what the kernel
adapters observe (only ours), and what `plan.diff` compares."""

from __future__ import annotations

from dataclasses import dataclass, field

RT_PROTO = 203  # the protocol number on our routes and rules: how we know they are ours
CHAIN_PREFIX = "MAPE-"  # every netfilter chain we own starts with this
TABLES = ("filter", "nat", "mangle")  # the netfilter tables we have chains in
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass(frozen=True, order=True)
class Tunnel:
    """ip6tnl in mode ipip6 (IPv4 in IPv6), encapsulation limit none."""

    name: str
    local: str
    remote: str
    link: str  # the WAN interface the tunnel is bound to
    mtu: int
    hop_limit: int
    mode: str = "ipip6"  # observed otherwise (ip6ip6, any) means someone else's settings
    encap_limit: str = "none"

    def describe(self) -> str:
        return (
            f"tunnel {self.name} mode {self.mode} local {self.local} remote {self.remote} dev {self.link} "
            f"mtu {self.mtu} hoplimit {self.hop_limit} encaplimit {self.encap_limit}"
        )


@dataclass(frozen=True, order=True)
class Address:
    """An address of ours: the CE /128 on the WAN (nodad, noprefixroute) or the MAP IPv4 /32."""

    ifname: str
    address: str
    prefixlen: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    def describe(self) -> str:
        extra = " nodad noprefixroute" if self.family == 6 else ""
        return f"address {self.address}/{self.prefixlen} dev {self.ifname}{extra}"


@dataclass(frozen=True, order=True)
class Route:
    dst: str  # "default" or a CIDR
    dev: str
    table: int = 254
    metric: int = 0
    family: int = 4

    def describe(self) -> str:
        table = "" if self.table == 254 else f" table {self.table}"
        return f"route {self.dst} dev {self.dev}{table} metric {self.metric} proto {RT_PROTO}"


@dataclass(frozen=True, order=True)
class RoutingRule:
    priority: int
    fwmark: int
    mask: int
    table: int
    suppress_prefixlength: int = -1  # -1: not set

    def describe(self) -> str:
        sup = f" suppress_prefixlength {self.suppress_prefixlength}" if self.suppress_prefixlength >= 0 else ""
        table = "main" if self.table == 254 else str(self.table)
        return f"rule {self.priority}: fwmark {self.fwmark:#x}/{self.mask:#x} lookup {table}{sup} proto {RT_PROTO}"


@dataclass(frozen=True, order=True)
class Sysctl:
    key: str  # e.g. net.ipv4.conf.ppp0.rp_filter
    value: str

    def describe(self) -> str:
        return f"sysctl {self.key}={self.value}"


@dataclass(frozen=True, order=True)
class Chain:
    """A chain we own, with its rules in iptables-save form (without `-A NAME`)."""

    table: str
    name: str
    rules: tuple[str, ...]


@dataclass(frozen=True, order=True)
class Jump:
    """The one rule in a built-in chain that sends traffic into one of our chains."""

    table: str
    chain: str
    rule: str  # e.g. "-o ip6tnl1 -j MAPE-SNAT"


@dataclass(frozen=True)
class State:
    tunnel: Tunnel | None = None
    addresses: frozenset[Address] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[RoutingRule] = frozenset()
    sysctls: frozenset[Sysctl] = frozenset()
    chains: frozenset[Chain] = frozenset()
    jumps: tuple[Jump, ...] = field(default=())  # observed ones may repeat; the plan removes extras

    @property
    def ipv4(self) -> str | None:
        """The MAP IPv4 address (on the tunnel), if any."""
        if self.tunnel is None:
            return None
        return next((a.address for a in self.addresses if a.family == 4 and a.ifname == self.tunnel.name), None)

    def is_empty(self) -> bool:
        return not (self.tunnel or self.addresses or self.routes or self.rules or self.chains or self.jumps)


NOTHING = State()


@dataclass(frozen=True)
class WanAddress:
    """A global IPv6 address on the WAN, as the kernel reports it."""

    address: str
    prefixlen: int
    deprecated: bool
    tentative: bool
    ours_shape: bool  # a /128 with nodad and noprefixroute: how we add the CE address


@dataclass(frozen=True)
class Observed:
    state: State  # only what is ours
    wan: tuple[WanAddress, ...]  # the WAN's global IPv6 addresses
    links: frozenset[str]  # interface names that exist
