"""The kernel objects mape-daemon owns, as plain values: what `desired` builds, what the kernel
adapters observe, and what `plan.diff` compares.

Each kind of object says what it is in words (`describe` for `plan`, `title` for the journal),
which noun counts it, and on which device it lives (it vanishes with that device)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

RT_PROTO = 203  # the protocol number on our routes and rules: how we know they are ours
CHAIN_PREFIX = "MAPE-"  # every iptables chain we own starts with this
TABLES = ("filter", "nat", "mangle")  # the iptables tables we have chains in
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
MAIN_TABLE = 254


@dataclass(frozen=True, order=True)
class Tunnel:
    """ip6tnl in mode ipip6 (IPv4 in IPv6)."""

    name: str
    local: str
    remote: str
    link: str  # the WAN interface the tunnel is bound to
    mtu: int
    hop_limit: int
    mode: str = "ipip6"  # observed otherwise (ip6ip6, any) means someone else's settings
    encap_limit: str = "none"
    up: bool = True

    category = "tunnel"  # names its kernel handler and debug stop point (MAPE_DEBUG_STOP_BEFORE)
    noun = "tunnel"  # what `report.summary` counts it as
    device = None  # it is the device

    def title(self) -> str:
        return f"tunnel {self.name}"

    def describe(self) -> str:
        return (
            f"tunnel {self.name} mode {self.mode} local {self.local} remote {self.remote} dev {self.link} "
            f"mtu {self.mtu} hoplimit {self.hop_limit} encaplimit {self.encap_limit}"
        )

    def differences(self, wanted: Tunnel) -> list[str]:
        """What differs from `wanted`, in words ("remote was 2001:db8::1, wanted 2001:380:a120::9")."""
        out = []
        for f in fields(self):
            have, want = getattr(self, f.name), getattr(wanted, f.name)
            if have != want:
                out.append(("down" if want else "up") if f.name == "up" else f"{f.name} was {have}, wanted {want}")
        return out

    def settable(self, wanted: Tunnel) -> bool:
        """True when only what can be changed in place (MTU, up) differs."""
        return replace(self, mtu=wanted.mtu, up=wanted.up) == wanted


@dataclass(frozen=True, order=True)
class Address:
    """An address of ours: the CE /128 on the WAN (nodad, noprefixroute) or the MAP IPv4 /32."""

    ifname: str
    address: str
    prefixlen: int

    category = noun = "address"

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def device(self) -> str:
        return self.ifname

    def title(self) -> str:
        return f"{'CE address' if self.family == 6 else 'MAP IPv4'} {self.address}/{self.prefixlen} on {self.ifname}"

    def describe(self) -> str:
        extra = " nodad noprefixroute" if self.family == 6 else ""
        return f"address {self.address}/{self.prefixlen} dev {self.ifname}{extra}"


@dataclass(frozen=True, order=True)
class Route:
    """An IPv4 route of ours. kind "unreachable" has no device: it fails what reaches it closed."""

    dst: str  # "default" or a CIDR
    dev: str
    table: int = MAIN_TABLE
    metric: int = 0
    family: int = 4
    kind: str = "unicast"

    category = noun = "route"

    @property
    def device(self) -> str:
        return self.dev

    @property
    def key(self) -> tuple[int, int, str, int]:
        """What the kernel keys a route on: one route per key, ours or another program's."""
        return (self.family, self.table, self.dst, self.metric)

    def describe(self) -> str:
        table = "" if self.table == MAIN_TABLE else f" table {self.table}"
        where = "unreachable " if self.kind == "unreachable" else ""
        dev = f" dev {self.dev}" if self.dev else ""
        return f"route {where}{self.dst}{dev}{table} metric {self.metric} proto {RT_PROTO}"

    def describe_foreign(self, proto: int | None = None) -> str:
        """Another program's route, in `ip route` words."""
        table = "main" if self.table == MAIN_TABLE else str(self.table)
        where = "unreachable " if self.kind == "unreachable" else ""
        dev = f" dev {self.dev}" if self.dev else ""
        return f"{where}{self.dst}{dev} table {table} metric {self.metric}" + (
            f" proto {proto}" if proto is not None else ""
        )

    def title(self) -> str:
        table = "" if self.table == MAIN_TABLE else f" in table {self.table}"
        if self.kind == "unreachable":
            return f"unreachable default{table} (PPPoE-only traffic fails closed there)"
        return f"{'default route' if self.dst == 'default' else 'route ' + self.dst} via {self.dev}{table}"


@dataclass(frozen=True, order=True)
class RoutingRule:
    priority: int
    fwmark: int
    mask: int
    table: int
    suppress_prefixlength: int = -1  # -1: not set

    category = "routingrule"
    noun = "rule"
    device = None

    def title(self) -> str:
        target = "main without its default" if self.suppress_prefixlength == 0 else f"table {self.table}"
        return f"rule {self.priority} (fwmark {self.fwmark:#x}/{self.mask:#x} -> {target})"

    def describe(self) -> str:
        sup = f" suppress_prefixlength {self.suppress_prefixlength}" if self.suppress_prefixlength >= 0 else ""
        table = "main" if self.table == MAIN_TABLE else str(self.table)
        return f"rule {self.priority}: fwmark {self.fwmark:#x}/{self.mask:#x} lookup {table}{sup} proto {RT_PROTO}"


def bpf_text(insns) -> str:
    """tc's text for a classic BPF program, `N,code jt jf k,...`: how EgressGuard.program is
    written (egress.py) and read back (kernel/tc.py), so the two compare equal."""
    return f"{len(insns)}," + ",".join(f"{op} {jt} {jf} {k}" for op, jt, jf, k in insns)


@dataclass(frozen=True, order=True)
class EgressGuard:
    """Our classic BPF program on the tunnel's tc egress hook (egress.py): the last word on what
    may leave by MAP-E, out of reach of every firewall manager's flush."""

    ifname: str
    program: str  # tc's text for it: "N,code jt jf k,..."

    category = "egressguard"
    noun = "egress guard"

    @property
    def device(self) -> str:
        return self.ifname

    def title(self) -> str:
        return f"egress guard on {self.ifname} (the MAP IPv4, ports and ICMP ids of the set only)"

    def describe(self) -> str:
        return f"tc egress guard dev {self.ifname} ({self.program.partition(',')[0]} BPF instructions)"


@dataclass(frozen=True, order=True)
class Chain:
    """An iptables chain we own, with its rules in iptables-save form (without `-A NAME`)."""

    table: str
    name: str
    rules: tuple[str, ...]
    words: str = field(default="", compare=False)  # what it is, for the journal (from its firewall feature)


@dataclass(frozen=True, order=True)
class Jump:
    """The one rule in a built-in chain that sends traffic into one of our chains."""

    table: str
    chain: str
    rule: str  # e.g. "-o ip6tnl1 -j MAPE-SNAT"


@dataclass(frozen=True)
class State:
    tunnels: frozenset[Tunnel] = frozenset()
    addresses: frozenset[Address] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[RoutingRule] = frozenset()
    loose_rp: frozenset[str] = frozenset()  # interfaces whose reverse-path filter must not be strict
    guards: frozenset[EgressGuard] = frozenset()
    chains: frozenset[Chain] = frozenset()
    jumps: tuple[Jump, ...] = field(default=())  # observed ones may repeat; the plan removes extras
    nft: str | None = None  # our nftables table `ip mape`, as a script
    nft_words: tuple[str, ...] = field(default=(), compare=False)  # what the table holds, for the journal

    @property
    def tunnel(self) -> Tunnel | None:
        """The one tunnel of a desired state."""
        return next(iter(self.tunnels), None)


NOTHING = State()


@dataclass(frozen=True)
class WanAddress:
    """Where a prefix can come from: a global IPv6 address on the WAN as the kernel reports it
    (`origin` "slaac"), or a prefix delegated to this router by DHCPv6-PD ("pd": `address` is the
    prefix's first address, seen as the DHCPv6 client's unreachable route for the delegation)."""

    address: str
    prefixlen: int
    deprecated: bool
    tentative: bool
    ours_shape: bool  # a /128 with nodad and noprefixroute: how we add the CE address
    preferred_lft: int = 0xFFFFFFFF  # seconds; the most recently announced prefix has the longest
    origin: str = "slaac"

    def describe(self) -> str:
        if self.origin == "pd":
            return f"the delegated prefix {self.address}/{self.prefixlen} (DHCPv6-PD)"
        return f"{self.address} (the WAN's address)"


@dataclass(frozen=True)
class Query:
    """What the reconciler asks the kernel about, beyond what carries our markers."""

    wan: str
    tunnels: frozenset[str]  # the recorded tunnel names and the configured one
    addresses: frozenset[tuple[str, str]]  # recorded CE addresses (ifname, address)
    rp_filter: frozenset[str]  # interfaces whose reverse-path filter matters
    route_tables: frozenset[int]  # tables where another program's route may hold a slot we want


@dataclass(frozen=True)
class Observed:
    links: dict[str, str]  # every interface name -> its kind ("" for a plain device)
    carriers: frozenset[str]  # interfaces that can carry IPv4 now: up, running, with an IPv4 address
    wan: tuple[WanAddress, ...]  # the WAN's global IPv6 addresses
    delegated: tuple[WanAddress, ...]  # prefixes delegated to this router (DHCPv6-PD), origin "pd"
    tunnels: dict[str, Tunnel]  # every ip6tnl (ours or not), by name
    addresses: frozenset[Address]  # recorded CE /128s that are there, and IPv4 addresses on asked tunnels
    routes: frozenset[Route]  # ours (protocol 203), in every table
    foreign_routes: frozenset[Route]  # not ours, in the tables asked about
    rules: frozenset[RoutingRule]  # ours (protocol 203)
    foreign_rules: frozenset[RoutingRule]  # others' fwmark rules
    rp_filter: dict[str, int]  # effective reverse-path filter of the asked interfaces
    guards: frozenset[EgressGuard]  # egress guards on the asked tunnels
    chains: frozenset[Chain]
    jumps: tuple[Jump, ...]
    nft: str | None  # our nftables table as nft lists it


@dataclass(frozen=True)
class Flow:
    """A tracked connection NATed to the MAP IPv4 (conntrack): what holds a port of the set."""

    protocol: str
    port: int  # the external port (ICMP: id) of the set
    host: str  # the LAN address it came from
