"""The one seam to the kernel: the only package that imports pyroute2, iptc, libnftables or
subprocess. It imports nothing of ours above `state` and `actions`.

LinuxKernel observes and applies actions, each through the handler its `kind` names; the
reconciler sees it only through its KernelPort protocol, which the test fake implements too. A
sync runs inside `session()`: one rtnetlink socket for the whole sync, opened and closed in the
thread that runs it. The backend is where our netfilter state lives: "iptables-nft",
"iptables-legacy" (our MAPE-* chains, plus our nftables table for what iptables cannot say), or
"nftables" (our table only, `chains` None).
"""

from __future__ import annotations

from ._pyroute2 import register_light

register_light()  # before any module of ours imports pyroute2

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from ..actions import Action, ConntrackCleanup, FirewallChange, NetAction, NftChange
from ..errors import RetryableError
from ..state import Address, Chain, Flow, Jump, Observed, Query, State, Tunnel
from . import conntrack, tc
from .netlink import Netlink
from .nftables import NftTable
from .nftevents import current_generation

Netfilter = tuple[frozenset[Chain], tuple[Jump, ...], str | None]


def overflowed(e: Exception) -> bool:
    """An event socket that overflowed (events were lost). pyroute2 reports it as NetlinkError,
    raw sockets as OSError: ENOBUFS."""
    return (e.code if isinstance(e, NetlinkError) else getattr(e, "errno", None)) == errno.ENOBUFS


class IptablesChains(Protocol):
    """Our MAPE-* chains in the iptables tables, through one tool or library."""

    name: str  # the backend: iptables-nft or iptables-legacy
    writes: int
    in_nf_tables: bool  # its chains live in nf_tables: the ruleset generation moves when they change

    def normalize(
        self, chains: frozenset[Chain], jumps: tuple[Jump, ...]
    ) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def observe(self, tables: Iterable[str] = ...) -> tuple[frozenset[Chain], tuple[Jump, ...]]: ...
    def apply(self, change: FirewallChange) -> None: ...
    def committed(self, pid: int) -> bool: ...


def choose_backend(backend: str, recorded: str | None = None) -> str:
    """`auto` keeps the backend our state already lives in (`recorded`: an upgrade never moves
    it behind the user's back; `cleanup` does), else picks one for this host."""
    if backend == "auto":
        from .probe import auto_backend

        return recorded or auto_backend()
    return backend


def make_kernel(backend: str, recorded: str | None = None) -> LinuxKernel:
    """The adapter for `backend` (a config's firewall.backend), importing only what it uses."""
    backend = choose_backend(backend, recorded)
    if backend == "nftables":
        return LinuxKernel(None)
    if backend == "iptables-legacy":
        from .netfilter_iptc import IptcChains

        return LinuxKernel(IptcChains())
    from .netfilter_restore import RestoreChains

    return LinuxKernel(RestoreChains("iptables-nft"))


class LinuxKernel:
    def __init__(self, chains: IptablesChains | None, nft: NftTable | None = None):
        self.chains = chains  # None: the nftables backend, everything of ours in our table
        self.nft = nft or NftTable()
        self._net_writes = 0
        self._nl: Netlink | None = None
        self.conntrack_deleted = 0
        self._netfilter_seen: tuple[tuple[int, int], Netfilter] | None = None
        self._handlers: dict[str, Callable[[Any], None]] = {
            "tunnel": self._tunnel,
            "address": lambda a: self.nl.address(a.op, a.obj),
            "route": lambda a: self.nl.route(a.op, a.obj),
            "routingrule": lambda a: self.nl.rule(a.op, a.obj),
            "egressguard": self._egress_guard,
            "rp_filter": lambda a: self.nl.set_rp_filter(a.ifname, a.value),
            "firewall": self._firewall,
            "nft": self._nft,
            "conntrack": self._conntrack,
        }

    @property
    def backend(self) -> str:
        return self.chains.name if self.chains is not None else "nftables"

    @property
    def writes(self) -> int:
        return self._net_writes + (self.chains.writes if self.chains else 0) + self.nft.writes

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
        ipv6, ipv4 = nl.reader.addresses(socket.AF_INET6), nl.reader.addresses(socket.AF_INET)  # one dump each
        wan = nl.wan_addresses(links[q.wan][0], ipv6) if q.wan in links else []
        addresses: set[Address] = set()
        for ifname, address in q.addresses:
            if ifname in links:
                addresses |= {a for a in nl.addresses(ifname, links[ifname][0], 6, ipv6) if a.address == address}
        guards = set()
        for name in q.tunnels:
            if name in tunnels:
                addresses |= set(nl.addresses(name, links[name][0], 4, ipv4))
                if (guard := tc.observe(nl.reader, name, links[name][0])) is not None:
                    guards.add(guard)
        routes, foreign_routes = nl.routes(q.route_tables)
        rules, foreign_rules = nl.rules()
        chains, jumps, nft = self._netfilter()
        return Observed(
            links={name: kind for name, (_, kind) in links.items()},
            carriers=frozenset(nl.carriers(ipv4)),
            wan=tuple(wan),
            delegated=tuple(nl.delegations()),
            tunnels=tunnels,
            addresses=frozenset(addresses),
            routes=frozenset(routes),
            foreign_routes=frozenset(foreign_routes),
            rules=frozenset(rules),
            foreign_rules=frozenset(foreign_rules),
            rp_filter=nl.rp_filter(q.rp_filter),
            guards=frozenset(guards),
            chains=chains,
            jumps=jumps,
            nft=nft,
        )

    def _netfilter(self) -> Netfilter:
        """Our chains and our table. nf_tables numbers its ruleset: every commit, by anyone
        (nft, iptables-nft, firewalld, us), moves the generation. While it stands still the last
        reading is still true, so a sync that changes nothing forks no iptables-save and lists
        no table. Legacy iptables chains live outside nf_tables and are read every time."""
        gen = current_generation()
        key = (self._netns(), gen) if gen is not None else None
        seen, fw = self._netfilter_seen, self.chains
        if key is not None and seen is not None and seen[0] == key:
            chains, jumps, nft = seen[1]
            if fw is not None and not fw.in_nf_tables:
                chains, jumps = fw.observe()
            return chains, jumps, nft
        chains, jumps = fw.observe() if fw is not None else (frozenset(), ())
        reading = (chains, jumps, self.nft.observe())
        self._netfilter_seen = (key, reading) if key is not None else None
        return reading

    @staticmethod
    def _netns() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino  # one LinuxKernel may serve several (tests)

    def normalize(self, state: State) -> State:
        if self.chains is None:
            return state
        chains, jumps = self.chains.normalize(state.chains, state.jumps)
        return replace(state, chains=chains, jumps=jumps)

    def nft_matches(self, script: str | None, listed: str | None) -> bool:
        return self.nft.expected(script) == listed

    def committed_by_child(self, pid: int) -> bool:
        """An nf_tables commit by one of our iptables-restore children."""
        return self.chains is not None and self.chains.committed(pid)

    def apply(self, action: Action) -> None:
        self._handlers[action.kind](action)

    def _tunnel(self, action: NetAction) -> None:
        nl, obj = self.nl, action.obj
        assert isinstance(obj, Tunnel)
        {"add": nl.add_tunnel, "del": nl.del_tunnel, "set": nl.set_tunnel}[action.op](obj)

    def _egress_guard(self, action: NetAction) -> None:
        self._net_writes += 1
        (tc.put if action.op == "add" else tc.remove)(action.obj)  # type: ignore[arg-type]

    def _firewall(self, change: FirewallChange) -> None:
        if self.chains is None:
            raise RuntimeError(f"the nftables backend has no iptables chains to change: {change}")
        if change.touches_jumps:  # iptables-restore would fail on a -D of what is gone, or add a jump twice
            chains, jumps = self._chains_now(change.table)
            pruned = change.against((c.name for c in chains), jumps)
            if pruned is None:
                return
            change = pruned
        self.chains.apply(change)
        if self.chains.in_nf_tables:
            self._own_commit(lambda chains, jumps, nft: (*change.applied_to(chains, jumps), nft))

    def _nft(self, change: NftChange) -> None:
        self.nft.replace(change.script)
        self._own_commit(lambda chains, jumps, nft: (chains, jumps, self.nft.expected(change.script)))

    def _own_commit(self, after: Callable[[frozenset[Chain], tuple[Jump, ...], str | None], Netfilter]) -> None:
        """Keep the reading true across our own commit (one restore or one nft batch is one commit:
        the generation moves by one) instead of reading it all again at the next look: the next
        table's change and the next sync then fork nothing. A commit of anyone else in between
        moves the generation further, and the next look reads the kernel."""
        seen = self._netfilter_seen
        if seen is None:
            return
        (netns, gen), reading = seen
        now = current_generation()
        if now is not None and now == gen + 1 and netns == self._netns():
            self._netfilter_seen = ((netns, now), after(*reading))

    def _chains_now(self, table: str) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        """Our chains and jumps in `table` as they are: the session's reading while the nf_tables
        generation stands still (no fork), else one table read again."""
        assert self.chains is not None
        seen, gen = self._netfilter_seen, current_generation()
        if seen is not None and gen is not None and self.chains.in_nf_tables and seen[0] == (self._netns(), gen):
            chains, jumps, _ = seen[1]
        else:
            chains, jumps = self.chains.observe([table])
        return frozenset(c for c in chains if c.table == table), tuple(j for j in jumps if j.table == table)

    def _conntrack(self, c: ConntrackCleanup) -> None:
        self._net_writes += 1
        self.conntrack_deleted += conntrack.cleanup(c.drop_ipv4, c.ipv4, c.ranges, c.unnated_via)

    # --- reads for `mape-daemon status` (no session: one short socket each) -----------------
    def tunnel(self, name: str) -> Tunnel | None:
        with self.session():
            return self.nl.tunnels().get(name)

    @staticmethod
    def nat_flows(ipv4: str) -> list[Flow]:
        return conntrack.nat_flows(ipv4)

    @staticmethod
    def managers(wan: str, tunnel: str) -> dict[str, Any]:
        from . import managers

        return managers.detect(wan, tunnel)
