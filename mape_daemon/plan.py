"""diff(desired, observed) -> the ordered actions that make the kernel match. Pure: no I/O.

Teardown is diff(NOTHING, observed): there is no separate cleanup list. Since `observed` holds
only what is ours, no plan can touch a user's object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .state import Address, Chain, Jump, Route, RoutingRule, State, Sysctl, Tunnel

NetObject = Tunnel | Address | Route | RoutingRule | Sysctl


@dataclass(frozen=True)
class NetAction:
    op: str  # "add", "del", "replace" (routes), "set-mtu" (tunnels), "set" (sysctls)
    obj: NetObject

    def __str__(self) -> str:
        sign = {"add": "+", "del": "-", "replace": "+", "set": "~", "set-mtu": "~"}[self.op]
        return f"{sign} {self.obj.describe()}"


@dataclass(frozen=True)
class FirewallChange:
    """Everything that changes in one netfilter table, applied as one transaction."""

    table: str
    replace: tuple[Chain, ...] = ()  # chains created or rewritten whole
    delete: tuple[str, ...] = ()  # chains removed
    add_jumps: tuple[Jump, ...] = ()
    del_jumps: tuple[Jump, ...] = ()

    def __str__(self) -> str:
        lines = [f"- {self.table} {j.chain} {j.rule}" for j in self.del_jumps]
        lines += [f"- {self.table} chain {name}" for name in self.delete]
        lines += [f"+ {self.table} chain {c.name} ({len(c.rules)} rules)" for c in self.replace]
        lines += [f"+ {self.table} {j.chain} {j.rule}" for j in self.add_jumps]
        return "\n".join(lines)


@dataclass(frozen=True)
class ConntrackFlush:
    """Forget connections NATed to a MAP IPv4 address we no longer have, so they free no ports."""

    ipv4: str

    def __str__(self) -> str:
        return f"- conntrack entries NATed to {self.ipv4}"


Action = NetAction | FirewallChange | ConntrackFlush


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]

    def __bool__(self) -> bool:
        return bool(self.actions)

    def __str__(self) -> str:
        return "\n".join(str(a) for a in self.actions) if self.actions else "nothing to change"

    def summary(self) -> str:
        counts = Counter(type(a).__name__ for a in self.actions)
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no change"


def _tunnel_must_be_recreated(old: Tunnel, new: Tunnel) -> bool:
    """Any difference but the MTU (which is set in place) means delete and create again."""
    return old.__class__(**{**old.__dict__, "mtu": new.mtu}) != new


def diff_firewall(desired: State, observed: State) -> list[FirewallChange]:
    changes = []
    tables = sorted(
        {c.table for c in desired.chains | observed.chains} | {j.table for j in desired.jumps + observed.jumps}
    )
    for table in sorted(tables):
        want = {c.name: c for c in desired.chains if c.table == table}
        have = {c.name: c for c in observed.chains if c.table == table}
        want_jumps = {j for j in desired.jumps if j.table == table}
        have_jumps = Counter(j for j in observed.jumps if j.table == table)
        change = FirewallChange(
            table=table,
            replace=tuple(c for name, c in sorted(want.items()) if have.get(name) != c),
            delete=tuple(sorted(set(have) - set(want))),
            add_jumps=tuple(sorted(want_jumps - set(have_jumps))),
            # Extra copies of a wanted jump go too: each traversal would run our chain again.
            del_jumps=tuple(sorted(j for j, n in have_jumps.items() for _ in range(n - 1 if j in want_jumps else n))),
        )
        if change.replace or change.delete or change.add_jumps or change.del_jumps:
            changes.append(change)
    return changes


def diff(desired: State, observed: State) -> Plan:
    """Deletions first (rules, routes, addresses, then the tunnel), then creations in dependency
    order (sysctls, tunnel, addresses, routes, rules), then the firewall, then conntrack."""
    actions: list[Action] = []
    old_t, new_t = observed.tunnel, desired.tunnel
    recreate = bool(old_t and new_t and _tunnel_must_be_recreated(old_t, new_t))
    gone_dev = old_t.name if old_t and (recreate or new_t is None) else None
    # Objects on a tunnel we delete vanish with it; they are neither deleted nor kept by hand.
    have_addrs = {a for a in observed.addresses if a.ifname != gone_dev}
    have_routes = {r for r in observed.routes if r.dev != gone_dev}

    actions += [NetAction("del", r) for r in sorted(observed.rules - desired.rules)]
    actions += [NetAction("del", r) for r in sorted(have_routes - desired.routes)]
    actions += [NetAction("del", a) for a in sorted(have_addrs - desired.addresses)]
    if gone_dev and old_t:
        actions.append(NetAction("del", old_t))

    actions += [NetAction("set", s) for s in sorted(desired.sysctls - observed.sysctls)]
    if new_t and (old_t is None or recreate):
        actions.append(NetAction("add", new_t))
    elif new_t and old_t and old_t.mtu != new_t.mtu:
        actions.append(NetAction("set-mtu", new_t))
    actions += [NetAction("add", a) for a in sorted(desired.addresses - have_addrs)]
    actions += [NetAction("replace", r) for r in sorted(desired.routes - have_routes)]
    actions += [NetAction("add", r) for r in sorted(desired.rules - observed.rules)]

    actions += diff_firewall(desired, observed)
    if observed.ipv4 and observed.ipv4 != desired.ipv4:
        actions.append(ConntrackFlush(observed.ipv4))
    return Plan(tuple(actions))
