"""diff(desired, observed) -> the ordered actions that make the kernel match. Pure: no I/O.

Teardown is diff(NOTHING, have): there is no separate cleanup list. Since `have` (the part of
what the kernel showed that is ours) holds nothing else, no plan can touch a user's object. Every
action says why it is needed.

The order fails closed: traffic is steered into the tunnel (routes, rules) only after SNAT and
the guard are in place, and steering stops first on the way out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from .actions import FirewallChange, NetAction, NftChange, Plan, RpFilterChange
from .state import Chain, State


def _chain_why(have: Chain | None) -> str:
    if have is None:
        return "missing"
    if not have.rules:
        return "empty"
    return "rules differed"


def diff_firewall(desired: State, have: State) -> list[FirewallChange]:
    changes = []
    tables = {c.table for c in desired.chains | have.chains} | {j.table for j in desired.jumps + have.jumps}
    for table in sorted(tables):
        want = {c.name: c for c in desired.chains if c.table == table}
        there = {c.name: c for c in have.chains if c.table == table}
        want_jumps = {j for j in desired.jumps if j.table == table}
        have_jumps = Counter(j for j in have.jumps if j.table == table)
        replace = tuple(c for name, c in sorted(want.items()) if there.get(name) != c)
        change = FirewallChange(
            table=table,
            replace=replace,
            delete=tuple(sorted(set(there) - set(want))),
            add_jumps=tuple(sorted(want_jumps - set(have_jumps))),
            # Extra copies of a wanted jump go too: each traversal would run our chain again.
            del_jumps=tuple(sorted(j for j, n in have_jumps.items() for _ in range(n - 1 if j in want_jumps else n))),
            why=tuple(_chain_why(there.get(c.name)) for c in replace),
            keep_jumps=tuple(sorted(j for j, n in have_jumps.items() if n > 1 and j in want_jumps)),
        )
        if change.replace or change.delete or change.add_jumps or change.del_jumps:
            changes.append(change)
    return changes


def diff(desired: State, have: State, rp_originals: Mapping[str, str] | None = None) -> Plan:
    """The actions, in an order that fails closed (see the module doc). `rp_originals` holds the
    reverse-path filter values we replaced, to give back when no longer needed."""
    want_t = {t.name: t for t in desired.tunnels}
    have_t = {t.name: t for t in have.tunnels}
    recreate = {n for n, t in have_t.items() if n in want_t and not t.settable(want_t[n])}
    gone = {n for n in have_t if n not in want_t} | recreate
    # Objects on a tunnel we delete, or one that is down, vanish with it (the kernel drops IPv4
    # routes of a down device); they are neither deleted nor kept by hand.
    dead = gone | {n for n, t in have_t.items() if not t.up}
    have_addrs = {a for a in have.addresses if a.ifname not in gone}
    have_routes = {r for r in have.routes if r.dev not in dead}

    actions: list = [NetAction("del", r, "no longer wanted") for r in sorted(have.rules - desired.rules)]
    actions += [NetAction("del", r, "no longer wanted") for r in sorted(have_routes - desired.routes)]
    actions += [NetAction("del", a, "no longer wanted") for a in sorted(have_addrs - desired.addresses)]
    for name in sorted(gone):
        why = "; ".join(have_t[name].differences(want_t[name])) if name in recreate else "no longer wanted"
        actions.append(NetAction("del", have_t[name], why))

    originals = rp_originals or {}
    actions += [RpFilterChange(i, originals[i], "no longer needed")
                for i in sorted(have.loose_rp - desired.loose_rp) if i in originals]  # fmt: skip
    actions += [RpFilterChange(i, "2", "strict") for i in sorted(desired.loose_rp - have.loose_rp)]
    for name, t in sorted(want_t.items()):
        if name not in have_t or name in recreate:
            actions.append(
                NetAction("add", t, "; ".join(have_t[name].differences(t)) if name in recreate else "missing")
            )
        elif have_t[name] != t:
            actions.append(NetAction("set", t, "; ".join(have_t[name].differences(t))))
    actions += [NetAction("add", a, "missing") for a in sorted(desired.addresses - have_addrs)]

    actions += diff_firewall(desired, have)
    if desired.nft != have.nft:
        why = "no longer wanted" if desired.nft is None else "missing" if have.nft is None else "differed"
        actions.append(NftChange(desired.nft, why, desired.nft_words))
    # The egress guard: put in place (replacing: never a moment without one) or removed; it goes
    # with its tunnel, and is back with it.
    have_guards = {g.ifname: g for g in have.guards if g.ifname not in gone}
    want_guards = {g.ifname: g for g in desired.guards}
    actions += [NetAction("del", g, "no longer wanted") for n, g in sorted(have_guards.items()) if n not in want_guards]
    actions += [NetAction("add", g, "differed" if n in have_guards else "missing")
                for n, g in sorted(want_guards.items()) if have_guards.get(n) != g]  # fmt: skip

    actions += [NetAction("add", r, "missing") for r in sorted(desired.routes - have_routes)]
    actions += [NetAction("add", r, "missing") for r in sorted(desired.rules - have.rules)]
    return Plan(tuple(actions))
