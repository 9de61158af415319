"""A stateful fake kernel for the reconciler's logic (kube-proxy style: state, not call mocks).

It keeps foreign objects beside ours and refuses what the kernel refuses: an address on a missing
link, a second tunnel with the same endpoints, a route in a slot another route holds (exclusive
create), deleting a chain that is still jumped to. The contract tests run against it and against
the real kernel alike, which keeps it honest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from ipaddress import IPv6Network

from mape_daemon.actions import Action, ConntrackCleanup, FirewallChange, NetAction, NftChange, RpFilterChange
from mape_daemon.errors import CannotRunHere, ConflictError, RetryableError
from mape_daemon.state import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    RT_PROTO,
    Address,
    Chain,
    EgressGuard,
    Flow,
    Jump,
    Observed,
    Query,
    Route,
    RoutingRule,
    Tunnel,
    WanAddress,
)


class FakeKernel:
    backend = "fake"

    def __init__(self, links: Iterable[str] = ("wan0", "lan0"), wan: str = "wan0", ip6tnl: bool = True):
        self.links: dict[str, str] = dict.fromkeys(links, "")
        self.wan = wan
        self.ip6tnl = ip6tnl
        self.wan_addrs: list[WanAddress] = []
        self.delegations: list[WanAddress] = []  # a DHCPv6 client's unreachable routes (proto dhcp)
        self.cannot_carry: set[str] = set()  # links down, or up without an IPv4 address (pppd negotiating)
        self.ce_addrs: set[tuple[str, str]] = set()  # /128s with nodad noprefixroute: (ifname, address)
        self.tunnels: dict[str, Tunnel] = {}
        self.addresses: set[Address] = set()  # IPv4 addresses on tunnels
        self.routes: dict[Route, int] = {}  # route -> protocol
        self.rules: dict[RoutingRule, int] = {}
        self.rp_filter: dict[str, int] = {"all": 0}
        self.iptables = FakeChains()
        self.chains, self.builtin = self.iptables.chains, self.iptables.builtin
        self.nft: str | None = None
        self.guards: dict[str, EgressGuard] = {}  # tc egress guards by tunnel
        self.cleanups: list[ConntrackCleanup] = []
        self.conntrack_deleted = 0
        self.writes = 0
        self.fail_on: type | None = None  # make the next action of this class fail (once)
        self.fail_kind: str | None = None  # ... or of this kind ("tunnel", "route", ...), once
        self.read_races = 0  # reads that fail as a dump interrupted by a change would
        self.flows: list[Flow] = []  # conntrack's NATed connections (ports in use)

    def nat_flows(self, ipv4: str) -> list[Flow]:
        return list(self.flows)

    # --- test helpers ------------------------------------------------------------------------
    def slaac(self, address: str, deprecated: bool = False, preferred_lft: int = 3600) -> None:
        self.wan_addrs = [w for w in self.wan_addrs if w.address != address]
        self.wan_addrs.append(WanAddress(address, 64, deprecated, False, False, 0 if deprecated else preferred_lft))

    def delegate(self, prefix: str | None) -> None:
        """The DHCPv6 client's delegation now (None: it lost its lease)."""
        net = IPv6Network(prefix) if prefix else None
        self.delegations = (
            [WanAddress(str(net.network_address), net.prefixlen, False, False, False, origin="pd")] if net else []
        )

    def deprecate_all(self) -> None:
        self.wan_addrs = [
            WanAddress(w.address, w.prefixlen, True, w.tentative, w.ours_shape, 0) for w in self.wan_addrs
        ]

    def drop_slaac(self) -> None:
        self.wan_addrs = []

    def link_down(self, name: str) -> None:
        """What the kernel does when a link goes down: IPv6 addresses go, and with a tunnel
        down, the IPv4 routes through it."""
        if name == self.wan:
            self.wan_addrs, self.ce_addrs = [], {a for a in self.ce_addrs if a[0] != name}
        if name in self.tunnels:
            t = self.tunnels[name]
            self.tunnels[name] = Tunnel(**{**t.__dict__, "up": False})
            self.routes = {r: p for r, p in self.routes.items() if r.dev != name}

    def ppp(self, name: str, can_carry: bool) -> None:
        """pppd's states: present but down (negotiating, between retries) or up with an address.
        The kernel drops the IPv4 routes of a device that goes down."""
        if can_carry:
            self.cannot_carry.discard(name)
        else:
            self.cannot_carry.add(name)
            self.routes = {r: p for r, p in self.routes.items() if r.dev != name}

    def apply_del_tunnel(self, name: str) -> None:
        """Someone deletes the tunnel by hand (with it go its addresses and routes)."""
        self._tunnel(NetAction("del", self.tunnels[name]))

    def snapshot(self) -> tuple:
        tables = [sorted((k, tuple(v)) for k, v in d.items()) for d in (self.chains, self.builtin)]
        return (
            sorted(self.links.items()), sorted(self.wan_addrs + self.delegations, key=str), sorted(self.ce_addrs),
            sorted(self.tunnels.items()), sorted(self.addresses), sorted(self.routes.items()),
            sorted(self.rules.items()), sorted(self.rp_filter.items()), self.nft, sorted(self.guards.items()), *tables,
        )  # fmt: skip

    # --- the port ---------------------------------------------------------------------------
    def session(self):
        return contextlib.nullcontext()

    def bind_canonical(self, canonical: dict[str, str]) -> None:
        pass

    def nft_matches(self, script: str | None, listed: str | None) -> bool:
        return script == listed

    def observe(self, q: Query, backend: str | None = None) -> Observed:
        if self.read_races:  # the kernel changing during a dump (NLM_F_DUMP_INTR)
            self.read_races -= 1
            raise RetryableError("reading the kernel: it changed during the read")
        wan = list(self.wan_addrs)
        wan += [WanAddress(a, 128, False, False, True) for i, a in sorted(self.ce_addrs) if i == q.wan]
        addrs = {Address(i, a, 128) for i, a in self.ce_addrs if (i, a) in q.addresses}
        addrs |= {a for a in self.addresses if a.ifname in q.tunnels and a.ifname in self.tunnels}
        # The nftables backend reads no iptables chains (LinuxKernel.chains is None there).
        chains, jumps = self.iptables.observe() if (backend or self.backend) != "nftables" else (frozenset(), ())
        return Observed(
            links=dict(self.links),
            carriers=frozenset(self.links) - self.cannot_carry,
            wan=tuple(wan),
            delegated=tuple(self.delegations),
            tunnels=dict(self.tunnels),
            addresses=frozenset(addrs),
            routes=frozenset(r for r, p in self.routes.items() if p == RT_PROTO),
            foreign_routes=frozenset(r for r, p in self.routes.items() if p != RT_PROTO and r.table in q.route_tables),
            rules=frozenset(r for r, p in self.rules.items() if p == RT_PROTO),
            foreign_rules=frozenset(r for r, p in self.rules.items() if p != RT_PROTO),
            guards=frozenset(g for n, g in self.guards.items() if n in q.tunnels and n in self.tunnels),
            rp_filter={"all": self.rp_filter["all"]}
            | {i: self.rp_filter.get(i, 1) for i in q.rp_filter if i in self.links},
            chains=chains,
            jumps=jumps,
            nft=self.nft,
        )

    def normalize(self, state):
        return state

    def apply(self, action: Action, backend: str | None = None) -> None:
        self._backend_now = backend or self.backend
        if self.fail_on is not None and isinstance(action, self.fail_on):
            self.fail_on = None
            raise RetryableError(f"injected failure of {action}")
        if self.fail_kind is not None and action.kind == self.fail_kind:
            self.fail_kind = None
            raise RetryableError(f"injected failure of {action}")
        self.writes += 1
        handlers = {"conntrack": self.cleanups.append, "firewall": self._firewall, "nft": self._nft,
                    "rp_filter": self._rp_filter, "tunnel": self._tunnel, "address": self._address,
                    "route": self._route, "routingrule": self._routingrule,
                    "egressguard": self._egressguard}  # fmt: skip
        handlers[action.kind](action)

    def committed_by_child(self, pid: int) -> bool:
        return False

    def _firewall(self, action: FirewallChange) -> None:
        if self._backend_now == "nftables":
            raise RuntimeError(f"the nftables backend has no iptables chains to change: {action}")
        if action.touches_jumps:  # as the real adapter: pruned against the table as it is
            chains, jumps = self.iptables.observe()
            action = action.against((c.name for c in chains if c.table == action.table),
                                    [j for j in jumps if j.table == action.table])  # fmt: skip
            if action is None:
                return
        self.iptables.apply(action)

    def _nft(self, action: NftChange) -> None:
        self.nft = action.script

    def _rp_filter(self, action: RpFilterChange) -> None:
        self._need_link(action.ifname)
        self.rp_filter[action.ifname] = int(action.value)

    def _need_link(self, name: str) -> None:
        if name not in self.links:
            raise RetryableError(f"interface {name} does not exist")

    def _tunnel(self, action: NetAction) -> None:
        obj, op = action.obj, action.op
        assert isinstance(obj, Tunnel)
        if op == "add":
            self._need_link(obj.link)
            if not self.ip6tnl:
                raise CannotRunHere(f"create tunnel {obj.name}: this kernel has no ip6tnl support")
            if obj.name in self.tunnels and self.tunnels[obj.name].settable(obj):
                return  # ours, from an earlier try whose answer was lost (as the real adapter)
            if obj.name in self.links:
                raise ConflictError(f"interface {obj.name} already exists")
            if any((t.local, t.remote) == (obj.local, obj.remote) for t in self.tunnels.values()):
                raise ConflictError(f"an ip6tnl already connects {obj.local} to {obj.remote}")
            self.tunnels[obj.name] = obj
            self.links[obj.name] = "ip6tnl"
        elif op == "set":
            self.tunnels[obj.name] = obj
        elif obj.name in self.tunnels:
            del self.tunnels[obj.name]
            del self.links[obj.name]
            self.addresses = {a for a in self.addresses if a.ifname != obj.name}
            self.routes = {r: p for r, p in self.routes.items() if r.dev != obj.name}
            self.guards.pop(obj.name, None)  # its qdisc and filter go with the device

    def _egressguard(self, action: NetAction) -> None:
        obj = action.obj
        assert isinstance(obj, EgressGuard)
        if action.op == "add":
            self._need_link(obj.ifname)
            self.guards[obj.ifname] = obj
        else:
            self.guards.pop(obj.ifname, None)

    def _address(self, action: NetAction) -> None:
        obj, op = action.obj, action.op
        assert isinstance(obj, Address)
        if op == "add":
            self._need_link(obj.ifname)
            if obj.family == 6:
                self.ce_addrs.add((obj.ifname, obj.address))
            else:
                self.addresses.add(obj)
        else:
            self.ce_addrs.discard((obj.ifname, obj.address))
            self.addresses.discard(obj)

    def _route(self, action: NetAction) -> None:
        obj, op = action.obj, action.op
        assert isinstance(obj, Route)
        if op == "del":
            if self.routes.get(obj) == RT_PROTO:
                del self.routes[obj]
        else:
            if obj.dev:
                self._need_link(obj.dev)
                if obj.dev in self.cannot_carry and obj.dev not in self.tunnels:
                    raise RetryableError(f"add {obj.describe()}: Network is down")  # the kernel's ENETDOWN
            holder = next((r for r in self.routes if r.key == obj.key), None)
            if holder is not None and (holder != obj or self.routes[holder] != RT_PROTO):
                raise ConflictError(f"route slot {obj.key} is taken")  # exclusive create
            self.routes[obj] = RT_PROTO

    def _routingrule(self, action: NetAction) -> None:
        obj, op = action.obj, action.op
        assert isinstance(obj, RoutingRule)
        if op == "add":
            if self.rules.get(obj, RT_PROTO) != RT_PROTO:
                raise ConflictError(f"an identical rule exists: {obj}")
            self.rules[obj] = RT_PROTO
        elif self.rules.get(obj) == RT_PROTO:
            del self.rules[obj]


class BackendView:
    """The same fake kernel seen through another backend (what make_kernel(backend) gives for
    the one the record names)."""

    def __init__(self, base: FakeKernel, backend: str) -> None:
        self._base, self.backend = base, backend

    def __getattr__(self, name: str):
        return getattr(self._base, name)

    def observe(self, q: Query) -> Observed:
        return self._base.observe(q, self.backend)

    def apply(self, action: Action) -> None:
        self._base.apply(action, self.backend)


class FakeChains:
    """The iptables part: our chains and the built-in chains' rules, as iptables-save text."""

    name = "fake"

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str], list[str]] = {}
        self.builtin: dict[tuple[str, str], list[str]] = {}
        self.writes = 0

    def normalize(self, chains, jumps):
        return chains, jumps

    def observe(self) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        chains = frozenset(Chain(t, n, tuple(r)) for (t, n), r in self.chains.items() if n.startswith(CHAIN_PREFIX))
        jumps = tuple(Jump(t, c, r) for (t, c), rules in sorted(self.builtin.items()) for r in rules if "-j MAPE-" in r)
        return chains, jumps

    def apply(self, ch: FirewallChange) -> None:
        self.writes += 1
        t = ch.table
        for j in ch.del_jumps:
            self.builtin[(t, j.chain)].remove(j.rule)
        for name in ch.delete:
            if any(r.endswith(f"-j {name}") for rules in self.builtin.values() for r in rules):
                raise RetryableError(f"chain {name} is still referenced")
            del self.chains[(t, name)]
        for c in ch.replace:
            self.chains[(t, c.name)] = list(c.rules)
        for j in ch.add_jumps:
            self.builtin.setdefault((t, j.chain), []).insert(0, j.rule)

    def iptables(self, *args: str) -> None:
        """The few iptables commands the contract tests use to damage or decorate a table."""
        table, op, chain, *rule = args[1], args[2], args[3], *args[4:]
        key = (table, chain)
        store = self.builtin if chain in BUILTIN_CHAINS else self.chains
        if op == "-N":
            self.chains[key] = []
        elif op == "-A":
            store.setdefault(key, []).append(" ".join(rule))
        elif op == "-F":
            store[key] = []
        else:
            raise ValueError(f"fake iptables does not do {op}")

    def foreign(self) -> list[str]:
        lines = [f"{t} -A {c} {r}" for (t, c), rules in self.builtin.items() for r in rules if "MAPE-" not in r]
        lines += [f"{t} -A {c} {r}" for (t, c), rules in self.chains.items() for r in rules
                  if not c.startswith(CHAIN_PREFIX)]  # fmt: skip
        lines += [f"{t} :{c}" for (t, c) in self.chains if not c.startswith(CHAIN_PREFIX)]
        return sorted(lines)
