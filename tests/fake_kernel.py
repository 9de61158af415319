"""A stateful fake kernel for the reconciler's logic (kube-proxy style: state, not call mocks).

It keeps foreign objects beside ours, filters them out of observe() the way the real adapters
do, and refuses what the kernel refuses (an address on a missing link, deleting a chain that is
still jumped to). The contract tests run against it and against the real kernel alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mape_daemon.errors import RetryableError
from mape_daemon.plan import Action, ConntrackFlush, FirewallChange, NetAction
from mape_daemon.state import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    RT_PROTO,
    Address,
    Chain,
    Jump,
    Observed,
    Route,
    RoutingRule,
    State,
    Sysctl,
    Tunnel,
    WanAddress,
)


class FakeKernel:
    def __init__(self, links: Iterable[str] = ("wan0", "lan0"), wan: str = "wan0"):
        self.links = set(links)
        self.wan = wan
        self.wan_addrs: list[WanAddress] = []
        self.tunnels: dict[str, Tunnel] = {}
        self.addresses: set[Address] = set()
        self.routes: dict[Route, int] = {}  # route -> protocol
        self.rules: dict[RoutingRule, int] = {}
        self.sysctl: dict[str, str] = {}
        self.fw = FakeFirewall()
        self.chains, self.builtin = self.fw.chains, self.fw.builtin
        self.flushed: list[str] = []
        self.writes = 0

    # --- test helpers ------------------------------------------------------------------------
    def slaac(self, address: str, deprecated: bool = False) -> None:
        self.wan_addrs = [w for w in self.wan_addrs if w.address != address]
        self.wan_addrs.append(WanAddress(address, 64, deprecated, False, False))

    def deprecate_all(self) -> None:
        self.wan_addrs = [WanAddress(w.address, w.prefixlen, True, w.tentative, w.ours_shape) for w in self.wan_addrs]

    def drop_slaac(self) -> None:
        self.wan_addrs = [w for w in self.wan_addrs if w.ours_shape]

    def apply_del_tunnel(self, name: str) -> None:
        """Someone deletes the tunnel by hand (with it go its addresses and routes)."""
        self._net(NetAction("del", self.tunnels[name]))

    def snapshot(self) -> tuple:
        tables = [sorted((k, tuple(v)) for k, v in d.items()) for d in (self.chains, self.builtin)]
        return (
            sorted(self.links), sorted(self.wan_addrs, key=str), sorted(self.tunnels.items()), sorted(self.addresses),
            sorted(self.routes.items()), sorted(self.rules.items()), sorted(self.sysctl.items()), *tables,
        )  # fmt: skip

    # --- the port ---------------------------------------------------------------------------
    def observe(self, tunnel: str, wan: str, is_ce: Callable[[str], bool]) -> Observed:
        tun = self.tunnels.get(tunnel)
        addrs = {a for a in self.addresses if tun and a.ifname == tunnel}
        addrs |= {Address(wan, w.address, 128) for w in self.wan_addrs if w.ours_shape and is_ce(w.address)}
        chains = frozenset(Chain(t, n, tuple(r)) for (t, n), r in self.chains.items() if n.startswith(CHAIN_PREFIX))
        jumps = tuple(Jump(t, c, r) for (t, c), rules in sorted(self.builtin.items()) for r in rules if "-j MAPE-" in r)
        state = State(
            tun,
            frozenset(addrs),
            frozenset(r for r, p in self.routes.items() if p == RT_PROTO),
            frozenset(r for r, p in self.rules.items() if p == RT_PROTO),
            frozenset(),
            chains,
            jumps,
        )
        return Observed(state, tuple(self.wan_addrs), frozenset(self.links))

    def sysctls(self, keys: Iterable[str]) -> frozenset[Sysctl]:
        return frozenset(Sysctl(k, self.sysctl[k]) for k in keys if k in self.sysctl)

    def normalize(self, state: State) -> State:
        return state

    def apply(self, action: Action) -> None:
        self.writes += 1
        if isinstance(action, ConntrackFlush):
            self.flushed.append(action.ipv4)
        elif isinstance(action, FirewallChange):
            self.fw.apply(action)
        else:
            self._net(action)

    def _need_link(self, name: str) -> None:
        if name not in self.links:
            raise RetryableError(f"interface {name} does not exist")

    def _net(self, action: NetAction) -> None:
        obj, op = action.obj, action.op
        if isinstance(obj, Tunnel):
            if op == "add":
                self._need_link(obj.link)
                if obj.name not in self.links:
                    self.tunnels[obj.name] = obj
                    self.links.add(obj.name)
            elif op == "set-mtu":
                self.tunnels[obj.name] = obj
            elif obj.name in self.tunnels:
                del self.tunnels[obj.name]
                self.links.discard(obj.name)
                self.addresses = {a for a in self.addresses if a.ifname != obj.name}
                self.routes = {r: p for r, p in self.routes.items() if r.dev != obj.name}
        elif isinstance(obj, Address):
            if op == "add":
                self._need_link(obj.ifname)
                if obj.family == 6:
                    self.wan_addrs.append(WanAddress(obj.address, 128, False, False, True))
                else:
                    self.addresses.add(obj)
            else:
                self.wan_addrs = [w for w in self.wan_addrs if not (w.ours_shape and w.address == obj.address)]
                self.addresses.discard(obj)
        elif isinstance(obj, Route):
            if op == "del":
                self.routes.pop(obj, None)
            else:
                self._need_link(obj.dev)
                for r in [r for r in self.routes if (r.table, r.dst, r.metric) == (obj.table, obj.dst, obj.metric)]:
                    del self.routes[r]
                self.routes[obj] = RT_PROTO
        elif isinstance(obj, RoutingRule):
            if op == "add":
                self.rules[obj] = RT_PROTO
            else:
                self.rules.pop(obj, None)
        elif isinstance(obj, Sysctl):
            self._need_link(obj.key.split(".")[3])
            self.sysctl[obj.key] = obj.value


class FakeFirewall:
    """The netfilter part: our chains and the built-in chains' rules, as iptables-save text."""

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
