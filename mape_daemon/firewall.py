"""Our netfilter features, declared once and rendered for the backend in use. Pure: no I/O.

Each feature says when it is wanted, how it reads in iptables (chains of ours and the jumps into
them, in iptables-save form, each chain with its words for the journal) and in nftables (chains
of our table `ip mape`), and what it is called when the journal names what the table holds. On an
iptables backend a feature without an iptables form (the guard, forwards, the inbound policy)
goes into our table beside the chains; on the nftables backend everything is in the table.
Chains of the same name from several features (the SNAT chain and PPPoE's masquerade) become one
chain, in the order of FEATURES. (firewalld's build_policy_*_rules per backend, and kube-proxy's
chain tables, are the models.)

To add a rule kind: write a Feature here, add it to FEATURES, and regenerate nothing: the golden
files (tests/test_render_golden.py) must change only where the new feature is wanted.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

from .config import Config, ForwardConfig
from .lines import Line
from .mapcalc import range_text
from .state import Chain, Jump

NAT_CHAIN = "nat-out"  # the nftables backend's SNAT chain in our table
GUARD_PRIORITY = 300  # after every source NAT (srcnat is 100; firewalld masquerades at 110)
SNAT_CHAIN = "MAPE-SNAT"
SUB_CHAIN = {"tcp": "MAPE-SNAT-TCP", "udp": "MAPE-SNAT-UDP", "icmp": "MAPE-SNAT-ICMP"}


@dataclass(frozen=True)
class Context:
    """What every feature reads."""

    config: Config
    params: Line
    pool: list[tuple[int, int]]  # the SNAT pool: the port set less reserved and forwarded ports
    forwards: list[ForwardConfig]  # forwards inside the port set

    @property
    def tunnel(self) -> str:
        return self.config.tunnel.name

    @property
    def protos(self) -> tuple[str, ...]:
        return self.config.snat.protocols


@dataclass(frozen=True)
class NftChain:
    name: str
    hook: str | None  # e.g. "type nat hook postrouting priority srcnat - 1"; None: a regular chain
    rules: tuple[str, ...]  # for a set or map: its declaration
    kind: str = "chain"  # or "set", "map": the packet path fills them, nft lists them first

    def text(self) -> str:
        head = f"\t\t{self.hook}; policy accept;\n" if self.hook else ""
        return f"\t{self.kind} {self.name} {{\n{head}" + "".join(f"\t\t{r}\n" for r in self.rules) + "\t}\n"


@dataclass(frozen=True)
class Iptables:
    chains: tuple[Chain, ...]
    jumps: tuple[Jump, ...]


class Feature:
    words = ""  # how the journal names it among what our nftables table holds ("" for never)
    nft_only = False  # no iptables form: it goes into our table on every backend

    def wanted(self, ctx: Context) -> bool:
        return True

    def iptables(self, ctx: Context) -> Iptables:
        raise NotImplementedError(type(self).__name__)

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        raise NotImplementedError(type(self).__name__)


def nft_set(items: Collection[str]) -> str:
    return next(iter(items)) if len(items) == 1 else "{ " + ", ".join(items) + " }"


def set_mark(mask: int, mark: int, what: str = "meta mark") -> str:
    """`what` = (`what` & ~mask) | mark: the bits outside our mask are someone else's. (Kernel 6.1
    cannot OR two registers, so a mark is copied only under a match, never computed from another.)"""
    return f"{what} set {what} and {~mask & 0xFFFFFFFF:#x} or {mark:#x}"


def snat_rules(proto: str, ipv4: str, ranges: list[tuple[int, int]], match: str = "") -> tuple[str, ...]:
    """Terminating SNAT rules that spread new connections round-robin over every range (of those
    that pass `match`, which comes before the counting match).

    Rule i takes every (N-i)th connection that reaches it, so each of N consecutive connections
    lands in a different range; the last rule takes all that is left, so nothing leaves unSNATed.
    (N rules that all say --every N skew the spread and let connections through unSNATed.)"""
    n = len(ranges)
    rules = []
    for i, r in enumerate(ranges):
        nth = f"-m statistic --mode nth --every {n - i} --packet 0 " if i < n - 1 else ""
        rules.append(f"-p {proto} {match}{nth}-j SNAT --to-source {ipv4}:{range_text(r)}")
    return tuple(rules)


# Endpoint-independent UDP mapping. A LAN socket's range is a function of its source port's low
# bits, the same for every destination, and the kernel keeps a socket's live mapping when the new
# flow's range holds it (nf_nat_core.c, find_appropriate_src): one external port for every
# destination (RFC 4787 REQ-1), and a free port of that range when it is taken. A range serves at
# most its size of flows towards one server (the kernel drops the next one at confirm): a flow
# whose range already holds that many towards the server's address is spread per connection
# instead (connlimit / nft `ct count`), and so are DNS and QUIC, the UDP with many sockets towards
# one server and no use for a stable mapping.
PER_CONNECTION_UDP = (53, 443)
CROWD = "udp-crowd"  # nftables: flows per (server address, range), counted by conntrack


def port_buckets(n: int) -> tuple[int, list[tuple[int, int]]]:
    """The source-port mask and, for each of n ranges, its interval of `sport & mask`: low bits,
    so every OS's ephemeral range spreads evenly (at least 1024 values, more when n needs)."""
    mask = (1 << max(10, (n - 1).bit_length())) - 1
    size = mask + 1
    return mask, [(i * size // n, (i + 1) * size // n - 1) for i in range(n)]


def u32_sport(mask: int, lo: int, hi: int) -> str:
    """`sport & mask` in [lo, hi], as iptables-save prints the u32 match."""
    return f'-m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&{mask:#x}={lo:#x}:{hi:#x}"'


def eim_rules(ipv4: str, ranges: list[tuple[int, int]]) -> tuple[str, ...]:
    """iptables: UDP but DNS and QUIC by its source port's range while that range has room
    towards the server, then what is left spread per connection."""
    mask, buckets = port_buckets(len(ranges))
    edges = [0, *PER_CONNECTION_UDP, 65536]
    others = ",".join(f"{a + 1}:{b - 1}" for a, b in itertools.pairwise(edges) if b - a > 1)
    eim = tuple(f"-p udp -m multiport --dports {others} {u32_sport(mask, lo, hi)} -m connlimit --connlimit-upto "
                f"{r[1] - r[0] + 1} --connlimit-mask 32 --connlimit-daddr -j SNAT --to-source {ipv4}:{range_text(r)}"
                for (lo, hi), r in zip(buckets, ranges, strict=True))  # fmt: skip
    return (*eim, *snat_rules("udp", ipv4, ranges))


def nft_eim_rules(match: str, ipv4: str, ranges: list[tuple[int, int]]) -> list[str]:
    """One lookup from the source port's bucket to its range's chain (udp_range_chains); a crowded
    range returns here, to the spread."""
    mask, buckets = port_buckets(len(ranges))
    skip = nft_set([str(p) for p in PER_CONNECTION_UDP])
    jumps = ", ".join(f"{lo}-{hi} : jump {UDP_RANGE}{i}" for i, (lo, hi) in enumerate(buckets))
    return [f"{match} udp dport != {skip} udp sport & {mask} vmap {{ {jumps} }}"]


UDP_RANGE = "udp-range-"


def udp_range_chains(ipv4: str, ranges: list[tuple[int, int]]) -> tuple[NftChain, ...]:
    """Per range: take the flow while the range holds fewer flows than its size towards the
    server's address (counted by conntrack in the set CROWD)."""
    return tuple(NftChain(f"{UDP_RANGE}{i}", None, (
        f"meta l4proto udp add @{CROWD} {{ ip daddr . {lo} ct count {hi - lo + 1} }} counter snat ip to "
        f"{ipv4}:{range_text((lo, hi))}",)) for i, (lo, hi) in enumerate(ranges))  # fmt: skip


class Mss(Feature):
    """TCP MSS clamped to the tunnel's path MTU, both ways."""

    def wanted(self, ctx: Context) -> bool:
        return ctx.config.mss.clamp

    def iptables(self, ctx: Context) -> Iptables:
        t, mss = ctx.tunnel, ctx.config.tunnel.mtu - 40
        rules = (f"-o {t} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
                 f"-i {t} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {mss}")  # fmt: skip
        return Iptables((Chain("mangle", "MAPE-MSS", rules, "MSS clamp (MAPE-MSS)"),),
                        (Jump("mangle", "FORWARD", "-j MAPE-MSS"),))  # fmt: skip

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        t, mss = ctx.tunnel, ctx.config.tunnel.mtu - 40
        return (NftChain("mss", "type filter hook forward priority mangle", (
            f'oifname "{t}" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu',
            f'iifname "{t}" tcp flags & (syn | rst) == syn tcp option maxseg size > {mss} '
            f"tcp option maxseg size set {mss}",
        )),)  # fmt: skip


class PppoeMarks(Feature):
    """The fwmark that sends a connection by PPPoE: connections that arrived on ppp0 (answered
    there), the hosts that always use PPPoE, and what we do not SNAT (GRE, ESP, ...), which PPPoE
    carries. LAN packets and the router's own take their connection's mark."""

    def wanted(self, ctx: Context) -> bool:
        return ctx.config.pppoe is not None

    def iptables(self, ctx: Context) -> Iptables:
        ppp, protos = ctx.config.pppoe, ctx.protos
        assert ppp is not None
        mark = f"{ppp.fwmark:#x}/{ppp.mask:#x}"
        restore = f"-j CONNMARK --restore-mark --nfmask {ppp.mask:#x} --ctmask {ppp.mask:#x}"
        pbr: list[str] = []
        if ppp.mark_incoming:
            pbr.append(f"-i {ppp.interface} -j CONNMARK --set-xmark {mark}")
        pbr += [f"-i {lan} {restore}" for lan in ctx.config.lan_interfaces]
        pbr += [f"-s {host} -j MARK --set-xmark {mark}" for host in ppp.hosts]
        pbr.append(f"! -i {ppp.interface} -j MAPE-PBR-OTHER")
        other = (*(f"-p {p} -j RETURN" for p in protos), f"-j MARK --set-xmark {mark}")
        return Iptables(
            (Chain("mangle", "MAPE-PBR", tuple(pbr), "PPPoE marking (MAPE-PBR)"),
             Chain("mangle", "MAPE-PBR-OTHER", other, "PPPoE marking of protocols without ports (MAPE-PBR-OTHER)"),
             Chain("mangle", "MAPE-PBR-OUT", (restore,), "PPPoE mark restore for the router's replies (MAPE-PBR-OUT)")),
            (Jump("mangle", "PREROUTING", "-j MAPE-PBR"), Jump("mangle", "OUTPUT", "-j MAPE-PBR-OUT")),
        )  # fmt: skip

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        ppp = ctx.config.pppoe
        assert ppp is not None
        mine = f"ct mark and {ppp.mask:#x} == {ppp.fwmark:#x} {set_mark(ppp.mask, ppp.fwmark)}"
        pbr = []
        if ppp.mark_incoming:
            pbr.append(f'iifname "{ppp.interface}" {set_mark(ppp.mask, ppp.fwmark, "ct mark")}')
        pbr += [f'iifname "{lan}" {mine}' for lan in ctx.config.lan_interfaces]
        pbr += [f"ip saddr {host} {set_mark(ppp.mask, ppp.fwmark)}" for host in ppp.hosts]
        pbr.append(f'iifname != "{ppp.interface}" meta l4proto != {nft_set(ctx.protos)} counter '
                   f"{set_mark(ppp.mask, ppp.fwmark)}")  # fmt: skip
        return (NftChain("pbr", "type filter hook prerouting priority mangle", tuple(pbr)),
                NftChain("pbr-out", "type route hook output priority mangle", (mine,)))  # fmt: skip


NAT_HOOK = "type nat hook postrouting priority srcnat - 1"


class Snat(Feature):
    """Source NAT of what leaves the tunnel onto the MAP IPv4 and the pool, new connections spread
    over every range (a stateful port pick inside one range, as the kernel does, would use one
    block of the set only).

    nftables: `numgen inc` picks the n-th entry of a map of address . port-range pairs, so N
    connections land in N different ranges. Its priority is one below srcnat: the first NAT
    binding wins, so a user's catch-all masquerade (iptables-nft or nft, at srcnat) cannot take
    our tunnel's traffic. iptables: one chain per protocol of --every N rules (snat_rules)."""

    words = "SNAT"

    def wanted(self, ctx: Context) -> bool:
        return ctx.params.snat  # DS-Lite: the AFTR translates

    def iptables(self, ctx: Context) -> Iptables:
        ipv4 = str(ctx.params.ipv4)
        dispatch = tuple(f"-p {p} -j {SUB_CHAIN[p]}" for p in ctx.protos)
        per_proto = [Chain("nat", SUB_CHAIN[p], eim_rules(ipv4, ctx.pool) if p == "udp" and eim(ctx)
                           else snat_rules(p, ipv4, ctx.pool), f"SNAT for {p}") for p in ctx.protos]  # fmt: skip
        chains = (Chain("nat", SNAT_CHAIN, dispatch, "SNAT dispatch (MAPE-SNAT)"), *per_proto)
        return Iptables(chains, (Jump("nat", "POSTROUTING", f"-o {ctx.tunnel} -j {SNAT_CHAIN}"),))

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        return (*crowd(ctx), NftChain(NAT_CHAIN, NAT_HOOK, nft_snat(ctx, f'oifname "{ctx.tunnel}"')))


def eim(ctx: Context) -> bool:
    return "udp" in ctx.protos and ctx.config.snat.udp_mapping == "endpoint-independent"


def nft_snat(ctx: Context, match: str) -> tuple[str, ...]:
    """nftables SNAT rules for what passes `match`: UDP by its source port (endpoint-independent
    mapping), then the rest spread per connection."""
    ipv4 = str(ctx.params.ipv4)
    rules = nft_eim_rules(match, ipv4, ctx.pool) if eim(ctx) else []
    entries = ", ".join(f"{i} : {ipv4} . {lo}-{hi}" for i, (lo, hi) in enumerate(ctx.pool))
    rules.append(f"{match} meta l4proto {nft_set(ctx.protos)} counter snat ip to numgen inc mod {len(ctx.pool)} "
                 f"map {{ {entries} }}")  # fmt: skip
    return tuple(rules)


def crowd(ctx: Context) -> tuple[NftChain, ...]:
    """The set the endpoint-independent rules count in (an element goes with its last flow)."""
    if not eim(ctx):
        return ()
    return (
        NftChain(CROWD, None, ("type ipv4_addr . inet_service; size 65535; flags dynamic;",), "set"),
        *udp_range_chains(str(ctx.params.ipv4), ctx.pool),
    )


class PppoeMasquerade(Feature):
    """MASQUERADE what leaves by ppp0 (pppoe.masquerade)."""

    def wanted(self, ctx: Context) -> bool:
        return ctx.config.pppoe is not None and ctx.config.pppoe.masquerade

    def iptables(self, ctx: Context) -> Iptables:
        assert ctx.config.pppoe is not None
        return Iptables((Chain("nat", "MAPE-PPP", ("-j MASQUERADE",), "MASQUERADE on PPPoE (MAPE-PPP)"),),
                        (Jump("nat", "POSTROUTING", f"-o {ctx.config.pppoe.interface} -j MAPE-PPP"),))  # fmt: skip

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        assert ctx.config.pppoe is not None
        return (NftChain(NAT_CHAIN, NAT_HOOK, (f'oifname "{ctx.config.pppoe.interface}" masquerade',)),)


class NoPorts(Feature):
    """Protocols without ports (GRE, ESP, ...) cannot cross MAP-E: dropped and counted."""

    def iptables(self, ctx: Context) -> Iptables:
        rules = (*(f"-p {p} -j RETURN" for p in ctx.protos), "-j DROP")
        return Iptables((Chain("filter", "MAPE-FWD", rules, "no-ports filter (MAPE-FWD)"),),
                        (Jump("filter", "FORWARD", f"-o {ctx.tunnel} -j MAPE-FWD"),))  # fmt: skip

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        rule = f'oifname "{ctx.tunnel}" meta l4proto != {nft_set(ctx.protos)} counter drop'
        return (NftChain("fwd-out", "type filter hook forward priority filter", (rule,)),)


class Guard(Feature):
    """After every source NAT, drop what would leave the tunnel with a source other than the MAP
    IPv4, a port or ICMP id outside the set, a protocol we do not SNAT, or from a host that must
    use PPPoE. The BR would drop it anyway; dropped here it never gets a conntrack entry, so a
    flushed or half-replaced nat table cannot leave wrong mappings behind."""

    words = "guard"
    nft_only = True

    def wanted(self, ctx: Context) -> bool:
        return ctx.config.firewall.guard and ctx.params.snat

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        config, protos = ctx.config, ctx.protos
        ports = nft_set([range_text(r) for r in ctx.params.port_ranges])
        lines = []
        if config.pppoe and config.pppoe.hosts:
            lines.append(f"ct original ip saddr {nft_set([str(h) for h in config.pppoe.hosts])} counter drop")
        lines.append(f"ip saddr != {ctx.params.ipv4} counter drop")
        if l4 := [p for p in ("tcp", "udp") if p in protos]:
            lines.append(f"meta l4proto {nft_set(l4)} th sport {ports} accept")
        if "icmp" in protos:
            lines.append(f"icmp type {{ echo-request, echo-reply }} icmp id {ports} accept")
        # Errors the router sends about a flow carry no port or id of their own.
        lines.append("icmp type { destination-unreachable, time-exceeded, parameter-problem } accept")
        lines.append("counter drop")
        hook = f"type filter hook postrouting priority {GUARD_PRIORITY}"
        return (NftChain("guard", hook, (f'oifname "{ctx.tunnel}" jump tunnel-out',)),
                NftChain("tunnel-out", None, tuple(lines)))  # fmt: skip


class Forwards(Feature):
    """IPv4 arriving by the tunnel on a forward's port, sent on to its LAN host (DNAT)."""

    words = "forwards"
    nft_only = True

    def wanted(self, ctx: Context) -> bool:
        return bool(ctx.forwards)

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        dnat = tuple(f'iifname "{ctx.tunnel}" {rule}' for rule in forward_dnat(ctx))
        return (NftChain("dnat-in", "type nat hook prerouting priority dstnat", dnat),)


def forward_dnat(ctx: Context) -> list[str]:
    out = []
    for f in ctx.forwards:
        lo, hi = f.external
        to = str(f.to) if hi > lo else f"{f.to}:{f.to_port or lo}"
        out.append(f"ip daddr {ctx.params.ipv4} {f.protocol} dport {range_text(f.external)} counter dnat to {to}")
    return out


UDP_IN, UDP_PEERS = "udp-in", "udp-peers"
LEARNED = "flags dynamic,timeout; timeout 5m; size 65535;"  # RFC 4787 REQ-5: at least 2 min, 5 recommended


class UdpFiltering(Feature):
    """Who may send to a LAN socket's external port (RFC 4787 section 5). Address-and-port-dependent
    is conntrack alone: only replies. The others learn, from each UDP packet leaving the tunnel,
    external port -> LAN socket (and for address-dependent, the hosts it sent to), for 5 minutes
    after its last packet, and DNAT what arrives on such a port to its socket. A port the kernel
    reuses for a second socket (towards another destination) is the first one's until it expires."""

    words = "UDP filtering"
    nft_only = True

    def wanted(self, ctx: Context) -> bool:
        return ctx.params.snat and "udp" in ctx.protos and ctx.config.snat.udp_filtering != "address-and-port-dependent"

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        adf = ctx.config.snat.udp_filtering == "address-dependent"
        learn = (f'oifname "{ctx.tunnel}" meta l4proto udp ct direction original ct status snat '
                 f"update @{UDP_IN} {{ ct reply proto-dst : ct original ip saddr . ct original proto-src }}"
                 + (f" update @{UDP_PEERS} {{ ct reply proto-dst . ip daddr }}" if adf else ""))  # fmt: skip
        peers = f"udp dport . ip saddr @{UDP_PEERS} " if adf else ""
        dnat = f'iifname "{ctx.tunnel}" ip daddr {ctx.params.ipv4} {peers}counter dnat ip to udp dport map @{UDP_IN}'
        return (NftChain(UDP_IN, None, (f"type inet_service : ipv4_addr . inet_service; {LEARNED}",), "map"),
                *((NftChain(UDP_PEERS, None, (f"type inet_service . ipv4_addr; {LEARNED}",), "set"),) if adf else ()),
                NftChain("udp-learn", f"type filter hook postrouting priority {GUARD_PRIORITY}", (learn,)),
                NftChain("dnat-in", "type nat hook prerouting priority dstnat", (dnat,)))  # fmt: skip


def eif(ctx: Context) -> bool:
    return ctx.params.snat and "udp" in ctx.protos and ctx.config.snat.udp_filtering == "endpoint-independent"


class Hairpin(Feature):
    """A LAN host reaching the MAP IPv4 on a forward's port (or, with endpoint-independent
    filtering, on a LAN socket's external port) reaches that LAN host (RFC 4787 REQ-9), from the
    MAP IPv4 and a port of the set (REQ-9a): so the answer comes back by the router."""

    words = "hairpinning"
    nft_only = True

    def wanted(self, ctx: Context) -> bool:
        return bool(ctx.forwards) or eif(ctx)

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        t, ipv4 = ctx.tunnel, ctx.params.ipv4
        dnat = [f'iifname != "{t}" {rule}' for rule in forward_dnat(ctx)]
        if eif(ctx):
            dnat.append(f'iifname != "{t}" ip daddr {ipv4} counter dnat ip to udp dport map @{UDP_IN}')
        back = f'iifname != "{t}" oifname != "{t}" ct status dnat ct original ip daddr {ipv4}'
        return (*crowd(ctx), NftChain("hairpin-in", "type nat hook prerouting priority dstnat", tuple(dnat)),
                NftChain("hairpin-out", NAT_HOOK, nft_snat(ctx, back)))  # fmt: skip


class InboundClosed(Feature):
    """With inbound.closed nothing new but the forwards reaches the router or the LAN by the
    tunnel (replies and ICMP errors of our flows are established or related). The table is `ip`:
    native IPv6 is never touched."""

    words = "inbound closed"
    nft_only = True

    def wanted(self, ctx: Context) -> bool:
        return ctx.config.inbound.closed

    def nftables(self, ctx: Context) -> tuple[NftChain, ...]:
        t = ctx.tunnel
        # A forward may name the router itself (its LAN address): DNATed, it passes the input hook too.
        rules = (f'iifname "{t}" ct state established,related accept', f'iifname "{t}" ct status dnat accept',
                 f'iifname "{t}" counter drop')  # fmt: skip
        return (NftChain("in-closed", "type filter hook input priority filter", rules),
                NftChain("fwd-in", "type filter hook forward priority filter", rules))  # fmt: skip


# In this order: the nftables chains follow it, and so do the words naming what the table holds.
FEATURES: tuple[Feature, ...] = (Mss(), PppoeMarks(), Snat(), PppoeMasquerade(), NoPorts(), Guard(), Forwards(),
                                 UdpFiltering(), Hairpin(), InboundClosed())  # fmt: skip


@dataclass(frozen=True)
class Netfilter:
    """All of ours in netfilter for one backend: iptables chains and jumps, and our table."""

    chains: tuple[Chain, ...] = ()
    jumps: tuple[Jump, ...] = ()
    nft: str | None = None
    nft_words: tuple[str, ...] = ()


def nft_table(chains: list[NftChain]) -> str:
    """Our table; chains of one name from several features are one chain (first hook wins)."""
    merged: dict[str, NftChain] = {}
    for c in chains:
        have = merged.get(c.name)
        if have is None or c.kind != "chain" or have == c:  # what two features use is declared once
            merged[c.name] = have or c
        else:
            merged[c.name] = NftChain(c.name, have.hook, have.rules + c.rules)
    ordered = sorted(merged.values(), key=lambda c: c.kind == "chain")  # sets and maps before their users
    return "table ip mape {\n" + "".join(c.text() for c in ordered) + "}\n"


def render(ctx: Context, native: bool) -> Netfilter:
    """The features wanted, for the backend in use: `native` is the nftables backend (our table
    only); otherwise iptables chains, and our table for what has no iptables form."""
    chains: list[Chain] = []
    jumps: list[Jump] = []
    nft: list[NftChain] = []
    words: list[str] = []
    for feature in FEATURES:
        if not feature.wanted(ctx):
            continue
        if native or feature.nft_only:
            nft += feature.nftables(ctx)
            if feature.words:
                words.append(feature.words)
        else:
            part = feature.iptables(ctx)
            chains += part.chains
            jumps += part.jumps
    return Netfilter(tuple(chains), tuple(sorted(jumps)), nft_table(nft) if nft else None, tuple(words))
