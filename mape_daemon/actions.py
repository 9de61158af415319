"""The vocabulary of change: every action a sync can ask of the kernel, as a value. Pure: no I/O.

Each action says what it does (its `plan` line, `str()`), what it means in the journal
(`journal`), what it counts as in a new mapping's one line (`tally`), and what it does to the
ownership record before and after it is applied (`note_intent`, `note_done`: objects that carry
no marker of ours are written down before they exist). The kernel adapter applies an action by
its `kind` through one table of handlers (kernel/__init__.py). Adding a kind of owned object means
a value type in `state`, its action here (or a NetAction of it), its kernel handler, and tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .record import Record
from .state import Address, Chain, EgressGuard, Jump, Route, RoutingRule, Tunnel

NetObject = Tunnel | Address | Route | RoutingRule | EgressGuard
NFT_TABLE = "ip mape"  # our nftables table (family and name), as the journal and `plan` name it
WHY_WORDS = {"missing": "it was missing", "empty": "the chain was empty", "rules differed": "its rules differed",
             "differed": "it differed", "strict": "it was strict"}  # fmt: skip


def why_words(why: str) -> str:
    return WHY_WORDS.get(why, why)


@dataclass(frozen=True)
class Words:
    """How one sync's journal lines are phrased: `restored` is "updated" for a reload; objects on a
    tunnel this sync recreates come back with it, so the tunnel's line speaks for them."""

    restored: str = "restored"
    recreated: frozenset[str] = frozenset()
    conntrack_deleted: int = 0

    @classmethod
    def of(cls, actions: Iterable[Action], restored: str = "restored", conntrack_deleted: int = 0) -> Words:
        recreated = frozenset(a.obj.name for a in actions if isinstance(a, NetAction) and a.kind == "tunnel"
                              and a.op == "add")  # fmt: skip
        return cls(restored, recreated, conntrack_deleted)


class ActionBase:
    """What every action can say and do; the defaults are "nothing"."""

    kind = ""  # the kernel handler that applies it; also the debug stop point's name
    repairs_nat = False  # it puts back our NAT or the guard: connections made meanwhile are suspect

    def journal(self, w: Words) -> list[str]:
        return []

    def tally(self) -> list[tuple[str, int]]:
        """(noun, count) of what it sets up, for the line of a new mapping."""
        return []

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        """Write down what we are about to create, before creating it."""

    def note_done(self, rec: Record) -> None:
        """Forget what we removed, once it is gone."""


@dataclass(frozen=True)
class NetAction(ActionBase):
    op: str  # "add" (for an egress guard: put in place, replacing), "del", or "set" (a tunnel's MTU, up state)
    obj: NetObject
    why: str = ""

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.obj.category

    def __str__(self) -> str:
        sign = {"add": "+", "del": "-", "set": "~"}[self.op]
        return f"{sign} {self.obj.describe()}"

    def journal(self, w: Words) -> list[str]:
        obj, title = self.obj, self.obj.title()
        if self.op == "del":
            if isinstance(obj, Tunnel) and obj.name in w.recreated:
                return []  # the add says it
            return [f"{title} removed: {why_words(self.why)}"]
        if self.op == "set":
            return [f"{title} brought up: it was down" if self.why == "down" else f"{title} changed: {self.why}"]
        if isinstance(obj, Tunnel):
            return [f"{title} recreated with its addresses and routes: {why_words(self.why)}"]
        if obj.device in w.recreated:
            return []  # they come back with the tunnel: its line says so
        return [f"{title} {'updated' if self.why == 'differed' else w.restored}: {why_words(self.why)}"]

    def tally(self) -> list[tuple[str, int]]:
        return [] if self.op == "del" else [(self.obj.noun, 1)]

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        obj = self.obj
        if self.op != "add":
            return
        if isinstance(obj, Tunnel) and obj.name not in rec.tunnels:
            rec.tunnels.append(obj.name)
        elif isinstance(obj, Address) and obj.family == 6 and (obj.ifname, obj.address) not in rec.addresses:
            rec.addresses.append((obj.ifname, obj.address))

    def note_done(self, rec: Record) -> None:
        obj = self.obj
        if self.op != "del":
            return
        if isinstance(obj, Tunnel):
            rec.tunnels = [n for n in rec.tunnels if n != obj.name]
        elif isinstance(obj, Address):
            rec.addresses = [a for a in rec.addresses if a != (obj.ifname, obj.address)]


@dataclass(frozen=True)
class RpFilterChange(ActionBase):
    """Loosen an interface's reverse-path filter (PPPoE replies arrive where main's default does not
    point), or give it back the value it had."""

    ifname: str
    value: str
    why: str = ""
    kind = "rp_filter"

    def __str__(self) -> str:
        return f"~ sysctl net.ipv4.conf.{self.ifname}.rp_filter={self.value}"

    def journal(self, w: Words) -> list[str]:
        if self.value == "2":
            return [f"rp_filter of {self.ifname} set to 2 (loose): it was strict, and PPPoE replies arrive where "
                    "main's default route does not point"]  # fmt: skip
        return [f"rp_filter of {self.ifname} given back its {self.value}: no longer needed"]

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        if self.ifname not in rec.rp_filter:
            rec.rp_filter[self.ifname] = str(rp_filter.get(self.ifname, 1))

    def note_done(self, rec: Record) -> None:
        if self.value != "2":
            rec.rp_filter.pop(self.ifname, None)


def _target(rule: str) -> str:
    return rule.rsplit("-j ", 1)[-1]


@dataclass(frozen=True)
class FirewallChange(ActionBase):
    """Everything that changes in one iptables table, applied as one transaction."""

    table: str
    replace: tuple[Chain, ...] = ()  # chains created or rewritten whole
    delete: tuple[str, ...] = ()  # chains removed
    add_jumps: tuple[Jump, ...] = ()
    del_jumps: tuple[Jump, ...] = ()
    why: tuple[str, ...] = ()  # per replaced chain, in order: "missing", "empty", "3 rules differed"
    keep_jumps: tuple[Jump, ...] = ()  # wanted jumps whose extra copies del_jumps removes: one stays
    kind = "firewall"

    @property
    def touches_jumps(self) -> bool:
        return bool(self.delete or self.add_jumps or self.del_jumps)

    def applied_to(self, chains: Iterable[Chain], jumps: Iterable[Jump]) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        """Our chains and jumps (of every table) as they are once this change is in place: what
        the kernel would list, since our rules are written in iptables-save's own form."""
        gone = set(self.delete) | {c.name for c in self.replace}
        kept = {c for c in chains if c.table != self.table or c.name not in gone}
        left = list(jumps)
        for j in self.del_jumps:
            if j in left:
                left.remove(j)
        return frozenset(kept | set(self.replace)), (*self.add_jumps, *left)

    def against(self, chains: Iterable[str], jumps: Iterable[Jump]) -> FirewallChange | None:
        """This change as it still applies to a table holding `chains` and `jumps` now: a retry
        after a lost answer, or a table someone changed since the plan. No chain is removed twice,
        no jump added twice, a wanted jump keeps one copy. None: nothing is left to do."""
        names, have = set(chains), Counter(jumps)
        wanted = set(self.add_jumps) | set(self.keep_jumps)
        now = replace(
            self,
            delete=tuple(n for n in self.delete if n in names),
            add_jumps=tuple(j for j in self.add_jumps if not have[j]),
            del_jumps=tuple(j for j in sorted(set(self.del_jumps)) for _ in range(have[j] - (j in wanted))),
        )
        return now if now.replace or now.touches_jumps else None

    @property
    def repairs_nat(self) -> bool:  # type: ignore[override]
        return self.table == "nat" and bool(self.replace or self.add_jumps)

    def __str__(self) -> str:
        lines = [f"- {self.table} {j.chain} {j.rule}" for j in self.del_jumps]
        lines += [f"- {self.table} chain {name}" for name in self.delete]
        lines += [f"+ {self.table} chain {c.name} ({len(c.rules)} rules)" for c in self.replace]
        lines += [f"+ {self.table} {j.chain} {j.rule}" for j in self.add_jumps]
        return "\n".join(lines)

    def journal(self, w: Words) -> list[str]:
        out = []
        for chain, why in zip(self.replace, self.why, strict=True):
            verb = "updated" if why == "rules differed" else w.restored
            out.append(f"{chain.words or 'chain ' + chain.name} {verb} ({len(chain.rules)} rules): {why_words(why)}")
        out += [f"jump to {_target(j.rule)} in {self.table} {j.chain} {w.restored}: it was missing"
                for j in self.add_jumps]  # fmt: skip
        out += [f"chain {name} removed from {self.table}: no longer wanted" for name in self.delete]
        extra = [j for j in self.del_jumps if _target(j.rule) not in self.delete]
        if extra:
            out.append(f"{len(extra)} extra jump(s) to {_target(extra[0].rule)} removed from {self.table} "
                       f"{extra[0].chain}: each would run our chain again")  # fmt: skip
        return out

    def tally(self) -> list[tuple[str, int]]:
        return [("chain", len(self.replace))]

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        if self.replace or self.add_jumps:
            rec.backend = backend


@dataclass(frozen=True)
class NftChange(ActionBase):
    """Our nftables table replaced whole (or removed, script None), in one transaction."""

    script: str | None
    why: str = ""
    words: tuple[str, ...] = field(default=(), compare=False)  # what the table holds (SNAT, guard, ...)
    kind = "nft"
    repairs_nat = True

    def title(self) -> str:
        return f"nftables table {NFT_TABLE} ({', '.join(self.words)})"

    def __str__(self) -> str:
        return f"- nftables table {NFT_TABLE}" if self.script is None else f"+ {self.title()}"

    def journal(self, w: Words) -> list[str]:
        if self.script is None:
            return [f"table {NFT_TABLE} removed: no longer wanted"]
        verb = "updated" if self.why == "differed" else w.restored
        return [f"{self.title()} {verb}: {why_words(self.why)}"]

    def tally(self) -> list[tuple[str, int]]:
        return [("nftables table", 1)] if self.script else []

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        if self.script and backend == "nftables":
            rec.backend = backend


@dataclass(frozen=True)
class ConntrackCleanup(ActionBase):
    """Forget connections whose mapping is no longer right, so they neither hold ports nor keep
    sending what the BR drops: those NATed to (or forwarded in to) an old MAP IPv4, those NATed
    to `ipv4` on a port or ICMP id outside `ranges`, and (after a repair) those that left by
    `unnated_via` without NAT."""

    drop_ipv4: tuple[str, ...] = ()
    ipv4: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    unnated_via: str | None = None
    why: str = ""
    kind = "conntrack"

    def __str__(self) -> str:
        parts = [f"NATed to {a}" for a in self.drop_ipv4]
        if self.ipv4:
            parts.append(f"NATed to {self.ipv4} outside the port set")
        if self.unnated_via:
            parts.append(f"sent by {self.unnated_via} without NAT")
        return f"- conntrack entries {', '.join(parts)}"

    def journal(self, w: Words) -> list[str]:
        return (
            [f"conntrack: {w.conntrack_deleted} stale connection(s) deleted: {self.why}"] if w.conntrack_deleted else []
        )

    def note_intent(self, rec: Record, rp_filter: Mapping[str, int], backend: str) -> None:
        if self.to_json() not in rec.pending_conntrack:
            rec.pending_conntrack.append(self.to_json())

    def note_done(self, rec: Record) -> None:
        rec.pending_conntrack = [d for d in rec.pending_conntrack if d != self.to_json()]

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
