"""Config + MAP-E parameters -> the kernel state we want. Pure: no I/O.

No parameters (no usable WAN prefix) means nothing of ours at all.
"""

from __future__ import annotations

from collections.abc import Collection

from . import forwards
from .config import Config
from .mapcalc import MapParams, without
from .state import NOTHING, Address, Chain, Jump, Route, RoutingRule, State, Tunnel

SNAT_CHAIN = "MAPE-SNAT"
SUB_CHAIN = {"tcp": "MAPE-SNAT-TCP", "udp": "MAPE-SNAT-UDP", "icmp": "MAPE-SNAT-ICMP"}
# PPPoE-only traffic finds this when ppp0 is absent: it fails closed instead of leaving by MAP-E.
UNREACHABLE_METRIC = 2**32 - 1
NAT_CHAIN = "nat-out"  # the nftables backend's SNAT chain in our table
GUARD_PRIORITY = 300  # after every source NAT (srcnat is 100; firewalld masquerades at 110)


class EmptyPool(ValueError):
    """Every port of the set is reserved: nothing could be SNATed."""


def pool_ranges(params: MapParams, reserved: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """The port set as contiguous ranges, with reserved ports (port forwards) cut out."""
    return without(params.port_ranges, reserved)


def reserved(config: Config) -> tuple[tuple[int, int], ...]:
    """Ports kept out of the SNAT pool: snat.reserved_ports and every forward's external ports."""
    return config.snat.reserved_ranges() + config.forwarded_ranges()


def check_pool(config: Config, params: MapParams) -> None:
    if not pool_ranges(params, reserved(config)):
        raise EmptyPool(
            f"snat.reserved_ports {list(config.snat.reserved_ports)} and the [[forward]] ports cover every port of "
            f"PSID {params.psid} ({params.ports} ports): nothing could be SNATed, so MAP-E stays off"
        )


def snat_rules(proto: str, ipv4: str, ranges: list[tuple[int, int]]) -> tuple[str, ...]:
    """Terminating SNAT rules that spread new connections round-robin over every range.

    Rule i takes every (N-i)th connection that reaches it, so each of N consecutive connections
    lands in a different range; the last rule takes all that is left, so nothing leaves unSNATed.
    (N rules that all say --every N skew the spread and let connections through unSNATed.)"""
    n = len(ranges)
    rules = []
    for i, (lo, hi) in enumerate(ranges):
        to = f"{ipv4}:{lo}-{hi}" if hi > lo else f"{ipv4}:{lo}"
        nth = f"-m statistic --mode nth --every {n - i} --packet 0 " if i < n - 1 else ""
        rules.append(f"-p {proto} {nth}-j SNAT --to-source {to}")
    return tuple(rules)


def nft_set(items: Collection[str]) -> str:
    return next(iter(items)) if len(items) == 1 else "{ " + ", ".join(items) + " }"


def guard_rules(config: Config, params: MapParams) -> list[str]:
    """After every source NAT, drop what would leave the tunnel with a source other than the MAP
    IPv4, a port or ICMP id outside the set, a protocol we do not SNAT, or from a host that must
    use PPPoE. The BR would drop it anyway; dropped here it never gets a conntrack entry, so a
    flushed or half-replaced nat table cannot leave wrong mappings behind."""
    protos = config.snat.protocols
    ports = nft_set([f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in params.port_ranges])
    lines = []
    if config.pppoe and config.pppoe.hosts:
        lines.append(f"ct original ip saddr {nft_set([str(h) for h in config.pppoe.hosts])} counter drop")
    lines.append(f"ip saddr != {params.ipv4} counter drop")
    if l4 := [p for p in ("tcp", "udp") if p in protos]:
        lines.append(f"meta l4proto {nft_set(l4)} th sport {ports} accept")
    if "icmp" in protos:
        lines.append(f"icmp type {{ echo-request, echo-reply }} icmp id {ports} accept")
    # Errors the router sends about a flow carry no port or id of their own.
    lines.append("icmp type { destination-unreachable, time-exceeded, parameter-problem } accept")
    lines.append("counter drop")
    return lines


def nft_chain(name: str, hook: str | None, rules: list[str]) -> str:
    head = f"\t\t{hook}; policy accept;\n" if hook else ""
    return f"\tchain {name} {{\n{head}" + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n"


def nft_table(chains: list[str]) -> str:
    return "table ip mape {\n" + "".join(chains) + "}\n"


def inbound_chains(config: Config, params: MapParams) -> list[str]:
    """IPv4 arriving by the tunnel: the usable forwards (DNAT), and with inbound.closed nothing
    new but them reaches the router or the LAN (replies and ICMP errors of our flows are
    established or related). The table is `ip`: native IPv6 is never touched."""
    t, chains = config.tunnel.name, []
    active, _ = forwards.split(config, params.port_ranges)
    if active:
        dnat = []
        for f in active:
            lo, hi = f.external
            ports, to = (f"{lo}-{hi}", str(f.to)) if hi > lo else (str(lo), f"{f.to}:{f.to_port or lo}")
            dnat.append(f'iifname "{t}" ip daddr {params.ipv4} {f.protocol} dport {ports} counter dnat to {to}')
        chains.append(nft_chain("dnat-in", "type nat hook prerouting priority dstnat", dnat))
    if config.inbound.closed:
        # A forward may name the router itself (its LAN address): DNATed, it passes the input hook too.
        rules = [f'iifname "{t}" ct state established,related accept', f'iifname "{t}" ct status dnat accept',
                 f'iifname "{t}" counter drop']  # fmt: skip
        chains += [
            nft_chain("in-closed", "type filter hook input priority filter", rules),
            nft_chain("fwd-in", "type filter hook forward priority filter", rules),
        ]
    return chains


TABLE_PARTS = ((f"chain {NAT_CHAIN} ", "SNAT"), ("chain guard ", "guard"), ("chain dnat-in ", "forwards"),
               ("chain in-closed ", "inbound closed"))  # fmt: skip


def table_words(script: str) -> str:
    """What our table holds, in words, for the journal and `plan`."""
    return f"nftables table ip mape ({', '.join(w for mark, w in TABLE_PARTS if mark in script)})"


def guard_chains(config: Config, params: MapParams) -> list[str]:
    hook = f"type filter hook postrouting priority {GUARD_PRIORITY}"
    return [
        nft_chain("guard", hook, [f'oifname "{config.tunnel.name}" jump tunnel-out']),
        nft_chain("tunnel-out", None, guard_rules(config, params)),
    ]


def companion_table(config: Config, params: MapParams) -> str | None:
    """Our nftables table beside the iptables backends' chains: the guard, forwards, the inbound policy."""
    chains = (guard_chains(config, params) if config.firewall.guard else []) + inbound_chains(config, params)
    return nft_table(chains) if chains else None


def set_mark(mask: int, mark: int, what: str = "meta mark") -> str:
    """`what` = (`what` & ~mask) | mark: the bits outside our mask are someone else's. (Kernel 6.1
    cannot OR two registers, so a mark is copied only under a match, never computed from another.)"""
    return f"{what} set {what} and {~mask & 0xFFFFFFFF:#x} or {mark:#x}"


def native_table(config: Config, params: MapParams, ranges: list[tuple[int, int]]) -> str:
    """The nftables backend: all our netfilter state in our own table, replaced in one transaction.

    SNAT spreads new connections over every range of the pool as data: `numgen inc` picks the
    n-th entry of a map of address . port-range pairs, so N connections land in N different
    ranges. Its priority is one below srcnat: the first NAT binding wins, so a user's catch-all
    masquerade (iptables-nft or nft, at srcnat) cannot take our tunnel's traffic."""
    t, protos, ipv4 = config.tunnel, config.snat.protocols, str(params.ipv4)
    entries = ", ".join(f"{i} : {ipv4} . {lo}-{hi}" for i, (lo, hi) in enumerate(ranges))
    nat = [f'oifname "{t.name}" meta l4proto {nft_set(protos)} counter snat ip to numgen inc mod {len(ranges)} '
           f"map {{ {entries} }}"]  # fmt: skip
    chains = []
    # Protocols without ports (GRE, ESP, ...) cannot cross MAP-E: drop and count them.
    forward = [f'oifname "{t.name}" meta l4proto != {nft_set(protos)} counter drop']
    if config.mss.clamp:
        chains.append(nft_chain("mss", "type filter hook forward priority mangle", [
            f'oifname "{t.name}" tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu',
            f'iifname "{t.name}" tcp flags & (syn | rst) == syn tcp option maxseg size > {t.mtu - 40} '
            f"tcp option maxseg size set {t.mtu - 40}",
        ]))  # fmt: skip
    if (ppp := config.pppoe) is not None:
        mine = f"ct mark and {ppp.mask:#x} == {ppp.fwmark:#x} {set_mark(ppp.mask, ppp.fwmark)}"
        pbr = []
        if ppp.mark_incoming:
            pbr.append(f'iifname "{ppp.interface}" {set_mark(ppp.mask, ppp.fwmark, "ct mark")}')
        pbr += [f'iifname "{lan}" {mine}' for lan in config.lan_interfaces]
        pbr += [f"ip saddr {host} {set_mark(ppp.mask, ppp.fwmark)}" for host in ppp.hosts]
        # What we do not SNAT (GRE, ESP, ...) leaves by PPPoE, which carries any protocol.
        pbr.append(f'iifname != "{ppp.interface}" meta l4proto != {nft_set(protos)} counter '
                   f"{set_mark(ppp.mask, ppp.fwmark)}")  # fmt: skip
        chains += [
            nft_chain("pbr", "type filter hook prerouting priority mangle", pbr),
            nft_chain("pbr-out", "type route hook output priority mangle", [mine]),
        ]
        if ppp.masquerade:
            nat.append(f'oifname "{ppp.interface}" masquerade')
    chains += [
        nft_chain(NAT_CHAIN, "type nat hook postrouting priority srcnat - 1", nat),
        nft_chain("fwd-out", "type filter hook forward priority filter", forward),
    ]
    if config.firewall.guard:
        chains += guard_chains(config, params)
    return nft_table(chains + inbound_chains(config, params))


def build(config: Config, params: MapParams | None, links: Collection[str] = (), native: bool = False) -> State:
    """The whole desired state. `links` are the interfaces that exist now (ppp0 may come late);
    `native`: the nftables backend, all our netfilter state in our table, no iptables chains."""
    if params is None:
        return NOTHING
    t, wan = config.tunnel, config.wan.interface
    ipv4 = str(params.ipv4)
    protos = config.snat.protocols
    assert params.br is not None, "a rule without a BR address cannot drive a tunnel"
    tunnel = Tunnel(t.name, str(params.ce_ipv6), str(params.br), wan, t.mtu, t.hop_limit, "ipip6", str(t.encap_limit))
    addresses = {Address(wan, str(params.ce_ipv6), 128), Address(t.name, ipv4, 32)}
    routes: set[Route] = set()
    if config.route.default:
        routes.add(Route("default", t.name, metric=config.route.metric))
    rules: set[RoutingRule] = set()
    loose_rp: set[str] = set()

    ranges = pool_ranges(params, reserved(config))
    chains = [
        Chain("nat", SNAT_CHAIN, tuple(f"-p {p} -j {SUB_CHAIN[p]}" for p in protos)),
        *(Chain("nat", SUB_CHAIN[p], snat_rules(p, ipv4, ranges)) for p in protos),
        # Protocols without ports (GRE, ESP, ...) cannot cross MAP-E: drop and count them.
        Chain("filter", "MAPE-FWD", (*(f"-p {p} -j RETURN" for p in protos), "-j DROP")),
    ]
    jumps = [
        Jump("nat", "POSTROUTING", f"-o {t.name} -j {SNAT_CHAIN}"),
        Jump("filter", "FORWARD", f"-o {t.name} -j MAPE-FWD"),
    ]
    if config.mss.clamp:
        chains.append(
            Chain(
                "mangle",
                "MAPE-MSS",
                (
                    f"-o {t.name} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu",
                    f"-i {t.name} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {t.mtu - 40}",
                ),
            )
        )
        jumps.append(Jump("mangle", "FORWARD", "-j MAPE-MSS"))

    if (ppp := config.pppoe) is not None:
        mark = f"{ppp.fwmark:#x}/{ppp.mask:#x}"
        restore = f"-j CONNMARK --restore-mark --nfmask {ppp.mask:#x} --ctmask {ppp.mask:#x}"
        pbr: list[str] = []
        if ppp.mark_incoming:
            pbr.append(f"-i {ppp.interface} -j CONNMARK --set-xmark {mark}")
        pbr += [f"-i {lan} {restore}" for lan in config.lan_interfaces]
        pbr += [f"-s {host} -j MARK --set-xmark {mark}" for host in ppp.hosts]
        pbr.append(f"! -i {ppp.interface} -j MAPE-PBR-OTHER")
        chains += [
            Chain("mangle", "MAPE-PBR", tuple(pbr)),
            # What we do not SNAT (GRE, ESP, ...) leaves by PPPoE, which carries any protocol.
            Chain("mangle", "MAPE-PBR-OTHER", (*(f"-p {p} -j RETURN" for p in protos), f"-j MARK --set-xmark {mark}")),
            Chain("mangle", "MAPE-PBR-OUT", (restore,)),
        ]
        jumps += [Jump("mangle", "PREROUTING", "-j MAPE-PBR"), Jump("mangle", "OUTPUT", "-j MAPE-PBR-OUT")]
        if ppp.masquerade:
            chains.append(Chain("nat", "MAPE-PPP", ("-j MASQUERADE",)))
            jumps.append(Jump("nat", "POSTROUTING", f"-o {ppp.interface} -j MAPE-PPP"))
        # Marked traffic still reaches other LAN subnets: main's routes but its default come first.
        rules.add(RoutingRule(ppp.rule_priority - 1, ppp.fwmark, ppp.mask, 254, suppress_prefixlength=0))
        rules.add(RoutingRule(ppp.rule_priority, ppp.fwmark, ppp.mask, ppp.table))
        if ppp.interface in links:
            routes.add(Route("default", ppp.interface, ppp.table, 0))
            if ppp.rp_filter == "loose":
                loose_rp.add(ppp.interface)
        routes.add(Route("default", "", ppp.table, UNREACHABLE_METRIC, kind="unreachable"))

    if native:
        chains, jumps = [], []
        nft = native_table(config, params, ranges)
    else:
        nft = companion_table(config, params)
    return State(
        tunnels=frozenset({tunnel}),
        addresses=frozenset(addresses),
        routes=frozenset(routes),
        rules=frozenset(rules),
        loose_rp=frozenset(loose_rp),
        chains=frozenset(chains),
        jumps=tuple(sorted(jumps)),
        nft=nft,
    )
