"""diff(desired, observed) -> the ordered actions that make the kernel match. Pure: no I/O.

Teardown is diff(NOTHING, observed): there is no separate cleanup list. Since `observed` holds
only what is ours, no plan can touch a user's object. Every action says why it is needed.

The order fails closed: traffic is steered into the tunnel (routes, rules) only after SNAT and
the guard are in place, and steering stops first on the way out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from .desired import table_words
from .state import Address, Chain, Jump, Route, RoutingRule, State, Tunnel

NetObject = Tunnel | Address | Route | RoutingRule


@dataclass(frozen=True)
class NetAction:
    op: str  # "add", "del", or "set" (a tunnel's MTU and up state, in place)
    obj: NetObject
    why: str = ""

    def __str__(self) -> str:
        sign = {"add": "+", "del": "-", "set": "~"}[self.op]
        return f"{sign} {self.obj.describe()}"


@dataclass(frozen=True)
class RpFilterChange:
    """Loosen an interface's reverse-path filter (PPPoE replies arrive where main's default does not
    point), or give it back the value it had."""

    ifname: str
    value: str
    why: str = ""

    def __str__(self) -> str:
        return f"~ sysctl net.ipv4.conf.{self.ifname}.rp_filter={self.value}"


@dataclass(frozen=True)
class FirewallChange:
    """Everything that changes in one iptables table, applied as one transaction."""

    table: str
    replace: tuple[Chain, ...] = ()  # chains created or rewritten whole
    delete: tuple[str, ...] = ()  # chains removed
    add_jumps: tuple[Jump, ...] = ()
    del_jumps: tuple[Jump, ...] = ()
    why: tuple[str, ...] = ()  # per replaced chain, in order: "missing", "empty", "3 rules differed"

    def __str__(self) -> str:
        lines = [f"- {self.table} {j.chain} {j.rule}" for j in self.del_jumps]
        lines += [f"- {self.table} chain {name}" for name in self.delete]
        lines += [f"+ {self.table} chain {c.name} ({len(c.rules)} rules)" for c in self.replace]
        lines += [f"+ {self.table} {j.chain} {j.rule}" for j in self.add_jumps]
        return "\n".join(lines)


@dataclass(frozen=True)
class NftChange:
    """Our nftables table replaced whole (or removed, script None), in one transaction."""

    script: str | None
    why: str = ""

    def __str__(self) -> str:
        if self.script is None:
            return "- nftables table ip mape"
        return f"+ {table_words(self.script)}"


@dataclass(frozen=True)
class ConntrackCleanup:
    """Forget connections whose mapping is no longer right, so they neither hold ports nor keep
    sending what the BR drops: those NATed to an old MAP IPv4, those NATed to `ipv4` on a port or
    ICMP id outside `ranges`, and (after a repair) those that left by `unnated_via` without NAT."""

    drop_ipv4: tuple[str, ...] = ()
    ipv4: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    unnated_via: str | None = None
    why: str = ""

    def __str__(self) -> str:
        parts = [f"NATed to {a}" for a in self.drop_ipv4]
        if self.ipv4:
            parts.append(f"NATed to {self.ipv4} outside the port set")
        if self.unnated_via:
            parts.append(f"sent by {self.unnated_via} without NAT")
        return f"- conntrack entries {', '.join(parts)}"

    def to_json(self) -> dict:
        return {"drop_ipv4": list(self.drop_ipv4), "ipv4": self.ipv4, "ranges": [list(r) for r in self.ranges],
                "unnated_via": self.unnated_via, "why": self.why}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> ConntrackCleanup:
        return cls(tuple(d["drop_ipv4"]), d["ipv4"], tuple(tuple(r) for r in d["ranges"]), d["unnated_via"], d["why"])


Action = NetAction | RpFilterChange | FirewallChange | NftChange | ConntrackCleanup


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]

    def __bool__(self) -> bool:
        return bool(self.actions)

    def __str__(self) -> str:
        return "\n".join(str(a) for a in self.actions) if self.actions else "nothing to change"


def _chain_why(have: Chain | None) -> str:
    if have is None:
        return "missing"
    if not have.rules:
        return "empty"
    return "rules differed"


def diff_firewall(desired: State, observed: State) -> list[FirewallChange]:
    changes = []
    tables = {c.table for c in desired.chains | observed.chains} | {j.table for j in desired.jumps + observed.jumps}
    for table in sorted(tables):
        want = {c.name: c for c in desired.chains if c.table == table}
        have = {c.name: c for c in observed.chains if c.table == table}
        want_jumps = {j for j in desired.jumps if j.table == table}
        have_jumps = Counter(j for j in observed.jumps if j.table == table)
        replace = tuple(c for name, c in sorted(want.items()) if have.get(name) != c)
        change = FirewallChange(
            table=table,
            replace=replace,
            delete=tuple(sorted(set(have) - set(want))),
            add_jumps=tuple(sorted(want_jumps - set(have_jumps))),
            # Extra copies of a wanted jump go too: each traversal would run our chain again.
            del_jumps=tuple(sorted(j for j, n in have_jumps.items() for _ in range(n - 1 if j in want_jumps else n))),
            why=tuple(_chain_why(have.get(c.name)) for c in replace),
        )
        if change.replace or change.delete or change.add_jumps or change.del_jumps:
            changes.append(change)
    return changes


def diff(desired: State, observed: State, rp_originals: Mapping[str, str] | None = None) -> Plan:
    """The actions, in an order that fails closed (see the module doc). `rp_originals` holds the
    reverse-path filter values we replaced, to give back when no longer needed."""
    want_t = {t.name: t for t in desired.tunnels}
    have_t = {t.name: t for t in observed.tunnels}
    recreate = {n for n, t in have_t.items() if n in want_t and not t.settable(want_t[n])}
    gone = {n for n in have_t if n not in want_t} | recreate
    # Objects on a tunnel we delete, or one that is down, vanish with it (the kernel drops IPv4
    # routes of a down device); they are neither deleted nor kept by hand.
    dead = gone | {n for n, t in have_t.items() if not t.up}
    have_addrs = {a for a in observed.addresses if a.ifname not in gone}
    have_routes = {r for r in observed.routes if r.dev not in dead}

    actions: list = [NetAction("del", r, "no longer wanted") for r in sorted(observed.rules - desired.rules)]
    actions += [NetAction("del", r, "no longer wanted") for r in sorted(have_routes - desired.routes)]
    actions += [NetAction("del", a, "no longer wanted") for a in sorted(have_addrs - desired.addresses)]
    for name in sorted(gone):
        why = "; ".join(have_t[name].differences(want_t[name])) if name in recreate else "no longer wanted"
        actions.append(NetAction("del", have_t[name], why))

    originals = rp_originals or {}
    actions += [RpFilterChange(i, originals[i], "no longer needed")
                for i in sorted(observed.loose_rp - desired.loose_rp) if i in originals]  # fmt: skip
    actions += [RpFilterChange(i, "2", "strict") for i in sorted(desired.loose_rp - observed.loose_rp)]
    for name, t in sorted(want_t.items()):
        if name not in have_t or name in recreate:
            actions.append(
                NetAction("add", t, "; ".join(have_t[name].differences(t)) if name in recreate else "missing")
            )
        elif have_t[name] != t:
            actions.append(NetAction("set", t, "; ".join(have_t[name].differences(t))))
    actions += [NetAction("add", a, "missing") for a in sorted(desired.addresses - have_addrs)]

    actions += diff_firewall(desired, observed)
    if desired.nft != observed.nft:
        why = "no longer wanted" if desired.nft is None else "missing" if observed.nft is None else "differed"
        actions.append(NftChange(desired.nft, why))

    actions += [NetAction("add", r, "missing") for r in sorted(desired.routes - have_routes)]
    actions += [NetAction("add", r, "missing") for r in sorted(desired.rules - observed.rules)]
    return Plan(tuple(actions))
