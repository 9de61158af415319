"""Config + the line's parameters (MAP-E, DS-Lite, IPIP) -> the kernel state we want. Pure: no I/O.

No parameters (no usable WAN prefix) means nothing of ours at all. Every method is the same
tunnel, addresses, routes and rules; what differs is said by the parameters (`snat`, the port
set), and netfilter is the firewall features' business (`firewall`).
"""

from __future__ import annotations

from collections.abc import Collection

from . import egress, firewall, forwards
from .config import Config
from .lines import Line
from .mapcalc import without
from .state import MAIN_TABLE, NOTHING, Address, EgressGuard, Route, RoutingRule, State, Tunnel

# PPPoE-only traffic finds this when ppp0 is absent: it fails closed instead of leaving by MAP-E.
UNREACHABLE_METRIC = 2**32 - 1


class EmptyPool(ValueError):
    """Every port of the set is reserved: nothing could be SNATed."""


def pool_ranges(params: Line, reserved: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """The port set as contiguous ranges, with reserved ports (port forwards) cut out."""
    return without(params.port_ranges, reserved)


def reserved(config: Config) -> tuple[tuple[int, int], ...]:
    """Ports kept out of the SNAT pool: snat.reserved_ports and every forward's external ports."""
    return config.snat.reserved_ranges() + config.forwarded_ranges()


def check_pool(config: Config, params: Line) -> None:
    if params.snat and not pool_ranges(params, reserved(config)):
        raise EmptyPool(
            f"snat.reserved_ports {list(config.snat.reserved_ports)} and the [[forward]] ports cover every port of "
            f"PSID {params.psid} ({params.ports} ports): nothing could be SNATed, so MAP-E stays off"
        )


def netfilter(config: Config, params: Line, native: bool) -> firewall.Netfilter:
    """Our netfilter state for the backend in use (`native`: the nftables backend)."""
    active, _ = forwards.split(config, params.port_ranges)
    ctx = firewall.Context(config, params, pool_ranges(params, reserved(config)), active)
    return firewall.render(ctx, native)


def build(config: Config, params: Line | None, links: Collection[str] = (), native: bool = False) -> State:
    """The whole desired state. `links` are the interfaces that can carry IPv4 now: ppp0 may come
    late, and is down while pppd negotiates (LCP, auth, IPCP) or up without an address; until it
    can carry traffic, table 10 holds only the unreachable default (PPPoE-only traffic fails
    closed) and nothing is routed into it. `native`: the nftables backend, all our netfilter
    state in our table, no iptables chains."""
    if params is None:
        return NOTHING
    t, wan = config.tunnel, config.wan.interface
    assert params.br is not None, "a rule without a BR address cannot drive a tunnel"
    # DS-Lite's B4 address (192.0.0.2) is not NATed by us: it is the router's own source towards the AFTR.
    tunnel = Tunnel(t.name, str(params.ce_ipv6), str(params.br), wan, t.mtu, t.hop_limit, "ipip6", str(t.encap_limit))
    addresses = {Address(wan, str(params.ce_ipv6), 128), Address(t.name, str(params.ipv4), 32)}
    routes: set[Route] = set()
    if config.route.default:
        routes.add(Route("default", t.name, metric=config.route.metric))
    rules: set[RoutingRule] = set()
    loose_rp: set[str] = set()
    if (ppp := config.pppoe) is not None:
        # Marked traffic still reaches other LAN subnets: main's routes but its default come first.
        rules.add(RoutingRule(ppp.rule_priority - 1, ppp.fwmark, ppp.mask, MAIN_TABLE, suppress_prefixlength=0))
        rules.add(RoutingRule(ppp.rule_priority, ppp.fwmark, ppp.mask, ppp.table))
        if ppp.interface in links:
            routes.add(Route("default", ppp.interface, ppp.table, 0))
            if ppp.rp_filter == "loose":
                loose_rp.add(ppp.interface)
        routes.add(Route("default", "", ppp.table, UNREACHABLE_METRIC, kind="unreachable"))
    guards = set()
    if config.firewall.guard and params.snat:  # the nftables guard, and the one no firewall manager reaches
        guards.add(EgressGuard(t.name, egress.bytecode(egress.program(params, config.snat.protocols))))
    nf = netfilter(config, params, native)
    return State(
        tunnels=frozenset({tunnel}),
        addresses=frozenset(addresses),
        routes=frozenset(routes),
        rules=frozenset(rules),
        loose_rp=frozenset(loose_rp),
        guards=frozenset(guards),
        chains=frozenset(nf.chains),
        jumps=nf.jumps,
        nft=nf.nft,
        nft_words=nf.nft_words,
    )
