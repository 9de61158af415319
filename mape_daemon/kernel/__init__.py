"""The one seam to the kernel: the only package that imports pyroute2, iptc or subprocess.

LinuxKernel observes what is ours and applies plan actions; the reconciler sees it only through
its KernelPort protocol, which the test fake implements too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Protocol

from pyroute2.netlink.exceptions import NetlinkError

from ..errors import RetryableError
from ..plan import Action, ConntrackFlush, FirewallChange, NetAction
from ..state import Address, Chain, Jump, Observed, Route, RoutingRule, State, Sysctl, Tunnel
from . import conntrack
from .netlink import Netlink

FirewallState = tuple[frozenset[Chain], tuple[Jump, ...]]


class Firewall(Protocol):
    name: str
    writes: int

    def normalize(
        self, chains: frozenset[Chain], jumps: tuple[Jump, ...]
    ) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def observe(self) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def apply(self, change: FirewallChange) -> None: ...


def make_firewall(backend: str) -> Firewall:
    from .probe import iptables_variant

    if backend == "auto":
        backend = iptables_variant()
    if backend == "iptables-legacy":
        from .netfilter_iptc import IptcFirewall

        return IptcFirewall()
    from .netfilter_restore import RestoreFirewall

    return RestoreFirewall("iptables-nft")


class LinuxKernel:
    def __init__(self, firewall: Firewall):
        self.fw = firewall
        self._net_writes = 0

    @property
    def writes(self) -> int:
        return self._net_writes + self.fw.writes

    def observe(self, tunnel: str, wan: str, is_ce: Callable[[str], bool]) -> Observed:
        try:
            return self._observe(tunnel, wan, is_ce)
        except NetlinkError as e:  # a link vanished between two reads, typically: the next sync sees it
            raise RetryableError(f"reading the kernel: {os.strerror(e.code)}") from None

    def _observe(self, tunnel: str, wan: str, is_ce: Callable[[str], bool]) -> Observed:
        with Netlink() as nl:
            links = nl.links()
            tun = nl.tunnel(tunnel, links)
            wan_addrs = nl.wan_addresses(links[wan]) if wan in links else []
            addresses = {Address(wan, w.address, 128) for w in wan_addrs if w.ours_shape and is_ce(w.address)}
            if tun is not None:
                addresses |= set(nl.tunnel_addresses(tunnel, links[tunnel]))
            routes, rules = nl.routes(links), nl.rules()
        chains, jumps = self.fw.observe()
        state = State(tun, frozenset(addresses), frozenset(routes), frozenset(rules), frozenset(), chains, jumps)
        return Observed(state, tuple(wan_addrs), frozenset(links))

    def sysctls(self, keys: Iterable[str]) -> frozenset[Sysctl]:
        return frozenset(Netlink.sysctls(keys))

    def normalize(self, state: State) -> State:
        chains, jumps = self.fw.normalize(state.chains, state.jumps)
        return State(state.tunnel, state.addresses, state.routes, state.rules, state.sysctls, chains, jumps)

    def apply(self, action: Action) -> None:
        if isinstance(action, FirewallChange):
            self.fw.apply(action)
        elif isinstance(action, ConntrackFlush):
            self._net_writes += 1
            conntrack.flush_nat_to(action.ipv4)
        else:
            with Netlink() as nl:
                _apply_net(nl, action)
                self._net_writes += nl.writes


def _apply_net(nl: Netlink, action: NetAction) -> None:
    obj, op = action.obj, action.op
    if isinstance(obj, Tunnel):
        {"add": nl.add_tunnel, "del": nl.del_tunnel, "set-mtu": nl.set_mtu}[op](obj)
    elif isinstance(obj, Address):
        nl.address(op, obj)
    elif isinstance(obj, Route):
        nl.route(op, obj)
    elif isinstance(obj, RoutingRule):
        nl.rule(op, obj)
    elif isinstance(obj, Sysctl):
        nl.set_sysctl(obj)
