"""The one seam to the kernel: the only package that imports pyroute2, iptc, libnftables or
subprocess.

LinuxKernel observes and applies plan actions; the reconciler sees it only through its KernelPort
protocol, which the test fake implements too. A sync runs inside `session()`: one rtnetlink socket
for the whole sync, opened and closed in the thread that runs it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

from pyroute2.netlink.exceptions import NetlinkError

from ..errors import RetryableError
from ..plan import Action, ConntrackCleanup, FirewallChange, NetAction, NftChange, RpFilterChange
from ..state import Address, Chain, Jump, Observed, Query, Route, RoutingRule, State, Tunnel
from . import conntrack
from .netlink import Netlink
from .nftables import NftTable
from .nftevents import current_generation

Netfilter = tuple[frozenset[Chain], tuple[Jump, ...], str | None]


class IptablesChains(Protocol):
    """Our MAPE-* chains in the iptables tables, through one tool or library."""

    name: str
    writes: int
    in_nf_tables: bool  # its chains live in nf_tables: the ruleset generation moves when they change

    def normalize(
        self, chains: frozenset[Chain], jumps: tuple[Jump, ...]
    ) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def observe(self) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def apply(self, change: FirewallChange) -> None: ...


class NoChains:
    """The nftables backend: everything of ours is in our nftables table, no iptables chain."""

    name = "nftables"
    writes = 0
    in_nf_tables = True

    def normalize(self, chains: frozenset[Chain], jumps: tuple[Jump, ...]) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        return chains, jumps

    def observe(self) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        return frozenset(), ()

    def apply(self, change: FirewallChange) -> None:
        raise RuntimeError(f"the nftables backend has no iptables chains to change: {change}")


def make_chains(backend: str, recorded: str | None = None) -> IptablesChains:
    """`auto` keeps the backend our state already lives in (`recorded`: an upgrade never moves
    it behind the user's back; `cleanup` does), else picks one for this host."""
    if backend == "auto":
        from .probe import auto_backend

        backend = recorded or auto_backend()
    if backend == "nftables":
        return NoChains()
    if backend == "iptables-legacy":
        from .netfilter_iptc import IptcChains

        return IptcChains()
    from .netfilter_restore import RestoreChains

    return RestoreChains("iptables-nft")


class LinuxKernel:
    def __init__(self, iptables: IptablesChains, nft: NftTable | None = None):
        self.iptables = iptables
        self.nft = nft or NftTable()
        self._net_writes = 0
        self._nl: Netlink | None = None
        self.conntrack_deleted = 0
        self._netfilter_seen: tuple[tuple[int, int], Netfilter] | None = None

    @property
    def backend(self) -> str:
        return self.iptables.name

    @property
    def writes(self) -> int:
        return self._net_writes + self.iptables.writes + self.nft.writes

    def bind_canonical(self, canonical: dict[str, str]) -> None:
        """Share the learned nft listings with the ownership record (kept across restarts)."""
        self.nft.canonical = canonical

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self._nl = Netlink()
        try:
            yield
        finally:
            self._nl.close()
            self._net_writes += self._nl.writes
            self._nl = None

    @property
    def nl(self) -> Netlink:
        if self._nl is None:
            raise RuntimeError("kernel call outside a session()")
        return self._nl

    def observe(self, query: Query) -> Observed:
        try:
            return self._observe(query)
        except NetlinkError as e:  # a link vanished between two reads, typically: the next sync sees it
            raise RetryableError(f"reading the kernel: {os.strerror(e.code)}") from None

    def _observe(self, q: Query) -> Observed:
        nl = self.nl
        links = nl.links()
        tunnels = nl.tunnels()
        wan = nl.wan_addresses(links[q.wan][0]) if q.wan in links else []
        addresses: set[Address] = set()
        for ifname, address in q.addresses:
            if ifname in links:
                addresses |= {a for a in nl.addresses(ifname, links[ifname][0], 6) if a.address == address}
        for name in q.tunnels:
            if name in tunnels:
                addresses |= set(nl.addresses(name, links[name][0], 4))
        routes, foreign_routes = nl.routes(q.route_tables)
        rules, foreign_rules = nl.rules()
        chains, jumps, nft = self._netfilter()
        return Observed(
            links={name: kind for name, (_, kind) in links.items()},
            wan=tuple(wan),
            tunnels=tunnels,
            addresses=frozenset(addresses),
            routes=frozenset(routes),
            foreign_routes=frozenset(foreign_routes),
            rules=frozenset(rules),
            foreign_rules=frozenset(foreign_rules),
            rp_filter=nl.rp_filter(q.rp_filter),
            chains=chains,
            jumps=jumps,
            nft=nft,
        )

    def _netfilter(self) -> Netfilter:
        """Our chains and our table. nf_tables numbers its ruleset: every commit, by anyone
        (nft, iptables-nft, firewalld, us), moves the generation. While it stands still the last
        reading is still true, so a sync that changes nothing forks no iptables-save and lists
        no table. Legacy iptables chains live outside nf_tables and are read every time."""
        netns = os.stat("/proc/thread-self/ns/net").st_ino  # one LinuxKernel may serve several (tests)
        gen = current_generation()
        key = (netns, gen) if gen is not None else None
        seen = self._netfilter_seen
        if key is not None and seen is not None and seen[0] == key:
            chains, jumps, nft = seen[1]
            if not self.iptables.in_nf_tables:
                chains, jumps = self.iptables.observe()
            return chains, jumps, nft
        chains, jumps = self.iptables.observe()
        reading = (chains, jumps, self.nft.observe())
        self._netfilter_seen = (key, reading) if key is not None else None
        return reading

    def normalize(self, state: State) -> State:
        chains, jumps = self.iptables.normalize(state.chains, state.jumps)
        return State(state.tunnels, state.addresses, state.routes, state.rules, state.loose_rp, chains, jumps,
                     state.nft)  # fmt: skip

    def nft_matches(self, script: str | None, listed: str | None) -> bool:
        return self.nft.expected(script) == listed

    def apply(self, action: Action) -> None:
        if isinstance(action, FirewallChange):
            self.iptables.apply(action)
        elif isinstance(action, NftChange):
            self.nft.replace(action.script)
        elif isinstance(action, ConntrackCleanup):
            self._net_writes += 1
            self.conntrack_deleted += conntrack.cleanup(action.drop_ipv4, action.ipv4, action.ranges,
                                                        action.unnated_via)  # fmt: skip
        elif isinstance(action, RpFilterChange):
            self.nl.set_rp_filter(action.ifname, action.value)
        else:
            _apply_net(self.nl, action)


def _apply_net(nl: Netlink, action: NetAction) -> None:
    obj, op = action.obj, action.op
    if isinstance(obj, Tunnel):
        {"add": nl.add_tunnel, "del": nl.del_tunnel, "set": nl.set_tunnel}[op](obj)
    elif isinstance(obj, Address):
        nl.address(op, obj)
    elif isinstance(obj, Route):
        nl.route(op, obj)
    elif isinstance(obj, RoutingRule):
        nl.rule(op, obj)
