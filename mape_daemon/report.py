"""What a sync did, in words a person reads in the journal at 3 a.m. Pure: no I/O.

A repair gives one line per thing put back, saying what and why ("tunnel ip6tnl1 recreated: it
was missing", "SNAT for tcp restored (63 rules): the chain was empty"); a new mapping gives one
line that says where it moved and why ("moved to 153.242.175.55 psid 47 (prefix ... announced,
... deprecated)"). Each line carries its event (MAPE_EVENT): start, prefix-change, repair, reload,
teardown. A sync that changed nothing says nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from .desired import SUB_CHAIN, table_words
from .plan import Action, ConntrackCleanup, FirewallChange, NetAction, NftChange, RpFilterChange
from .reconciler import SyncResult
from .state import Address, Route, RoutingRule, Tunnel

CHAIN_WORDS = {name: f"SNAT for {proto}" for proto, name in SUB_CHAIN.items()} | {
    "MAPE-SNAT": "SNAT dispatch (MAPE-SNAT)",
    "MAPE-FWD": "no-ports filter (MAPE-FWD)",
    "MAPE-MSS": "MSS clamp (MAPE-MSS)",
    "MAPE-PBR": "PPPoE marking (MAPE-PBR)",
    "MAPE-PBR-OTHER": "PPPoE marking of protocols without ports (MAPE-PBR-OTHER)",
    "MAPE-PBR-OUT": "PPPoE mark restore for the router's replies (MAPE-PBR-OUT)",
    "MAPE-PPP": "MASQUERADE on PPPoE (MAPE-PPP)",
}
WHY_WORDS = {"missing": "it was missing", "empty": "the chain was empty", "rules differed": "its rules differed",
             "differed": "it differed", "strict": "it was strict"}  # fmt: skip


@dataclass(frozen=True)
class Line:
    event: str
    text: str


def _why(why: str) -> str:
    return WHY_WORDS.get(why, why)


def name_of(obj) -> str:
    if isinstance(obj, Tunnel):
        return f"tunnel {obj.name}"
    if isinstance(obj, Address):
        return f"{'CE address' if obj.family == 6 else 'MAP IPv4'} {obj.address}/{obj.prefixlen} on {obj.ifname}"
    if isinstance(obj, Route):
        table = "" if obj.table == 254 else f" in table {obj.table}"
        if obj.kind == "unreachable":
            return f"unreachable default{table} (PPPoE-only traffic fails closed there)"
        return f"{'default route' if obj.dst == 'default' else 'route ' + obj.dst} via {obj.dev}{table}"
    if isinstance(obj, RoutingRule):
        target = "main without its default" if obj.suppress_prefixlength == 0 else f"table {obj.table}"
        return f"rule {obj.priority} (fwmark {obj.fwmark:#x}/{obj.mask:#x} -> {target})"
    raise TypeError(obj)


def _target(rule: str) -> str:
    return rule.rsplit("-j ", 1)[-1]


def repair_lines(actions: tuple[Action, ...], deleted: int, restored: str = "restored") -> list[str]:
    """One line per thing put back (or changed by a reload: `restored` is then "updated") or taken
    away, with why."""
    recreated = {a.obj.name for a in actions if isinstance(a, NetAction) and isinstance(a.obj, Tunnel)
                 and a.op == "add"}  # fmt: skip
    out = []
    for a in actions:
        if isinstance(a, NetAction):
            obj = a.obj
            if isinstance(obj, Tunnel) and a.op == "del" and obj.name in recreated:
                continue  # the add says it
            on_new_tunnel = (isinstance(obj, Address) and obj.ifname in recreated) or (
                isinstance(obj, Route) and obj.dev in recreated
            )
            if a.op == "add" and on_new_tunnel:
                continue  # they come back with the tunnel: its line says so
            if a.op == "del":
                out.append(f"{name_of(obj)} removed: {_why(a.why)}")
            elif a.op == "set":
                out.append(f"{name_of(obj)} brought up: it was down" if a.why == "down"
                           else f"{name_of(obj)} changed: {a.why}")  # fmt: skip
            elif isinstance(obj, Tunnel):
                out.append(f"{name_of(obj)} recreated with its addresses and routes: {_why(a.why)}")
            else:
                out.append(f"{name_of(obj)} {restored}: {_why(a.why)}")
        elif isinstance(a, FirewallChange):
            for chain, why in zip(a.replace, a.why, strict=True):
                words = CHAIN_WORDS.get(chain.name, f"chain {chain.name}")
                verb = "updated" if why == "rules differed" else restored
                out.append(f"{words} {verb} ({len(chain.rules)} rules): {_why(why)}")
            out += [f"jump to {_target(j.rule)} in {a.table} {j.chain} {restored}: it was missing" for j in a.add_jumps]
            out += [f"chain {name} removed from {a.table}: no longer wanted" for name in a.delete]
            extra = [j for j in a.del_jumps if _target(j.rule) not in a.delete]
            if extra:
                out.append(f"{len(extra)} extra jump(s) to {_target(extra[0].rule)} removed from {a.table} "
                           f"{extra[0].chain}: each would run our chain again")  # fmt: skip
        elif isinstance(a, NftChange):
            verb = "updated" if a.why == "differed" else restored
            out.append("table ip mape removed: no longer wanted" if a.script is None
                       else f"{table_words(a.script)} {verb}: {_why(a.why)}")  # fmt: skip
        elif isinstance(a, RpFilterChange):
            out.append(f"rp_filter of {a.ifname} set to 2 (loose): it was strict, and PPPoE replies arrive where "
                       "main's default route does not point" if a.value == "2"
                       else f"rp_filter of {a.ifname} given back its {a.value}: no longer needed")  # fmt: skip
        elif isinstance(a, ConntrackCleanup) and deleted:
            out.append(f"conntrack: {deleted} stale connection(s) deleted: {a.why}")
    return out


def summary(actions: tuple[Action, ...]) -> str:
    """A count of what a new mapping set up, for its one line."""
    kinds: Counter[str] = Counter()
    for a in actions:
        if isinstance(a, NetAction) and a.op != "del":
            kinds[type(a.obj).__name__] += 1
        elif isinstance(a, FirewallChange):
            kinds["chain"] += len(a.replace)
        elif isinstance(a, NftChange) and a.script:
            kinds["nftables table"] += 1
    words = {"Tunnel": "tunnel", "Address": "address", "Route": "route", "RoutingRule": "rule", "chain": "chain"}
    return ", ".join(f"{n} {words.get(k, k)}{'es' if k == 'Address' and n > 1 else 's' if n > 1 else ''}"
                     for k, n in kinds.items())  # fmt: skip


def prefix_state(prefix: str, result: SyncResult) -> str:
    """What became of a prefix on the WAN: announced, deprecated or gone."""
    net = IPv6Network(prefix)
    on_wan = [w for w in result.wan if IPv6Address(w.address) in net and not w.ours_shape]
    if not on_wan:
        return "gone"
    return "deprecated" if all(w.deprecated for w in on_wan) else "still announced"


def describe(result: SyncResult, cause: str) -> list[Line]:
    """The lines for one sync; none when nothing changed."""
    actions = result.plan.actions
    if not actions:
        return []
    p, prev = result.params, result.previous
    deleted = result.conntrack_deleted
    if p is None:
        what = f"was {prev.ipv4} psid {prev.psid}" if prev else "nothing mapped"
        return [Line("teardown", f"MAP-E off: {result.selection.reason} ({what}); removed {len(actions)} object(s)")]
    mapped = f"{p.rule.isp or 'explicit rule'} {p.ipv4} psid {p.psid}, {p.ports} ports"
    if prev is None:
        src = result.selection.source.address if result.selection.source else str(p.end_user_prefix)
        event = "start" if cause == "start" else "prefix-change"
        return [Line(event, f"mapped: {mapped} (prefix {p.end_user_prefix} from {src}); set up {summary(actions)}")]
    if (prev.ipv4, prev.psid) != (str(p.ipv4), p.psid) or prev.prefix != str(p.end_user_prefix):
        old = f"{prev.prefix} {prefix_state(prev.prefix, result)}" if prev.prefix != str(p.end_user_prefix) else ""
        text = (f"moved to {p.ipv4} psid {p.psid} (prefix {p.end_user_prefix} announced"
                f"{', ' + old if old else ''}; was {prev.ipv4} psid {prev.psid})")  # fmt: skip
        lines = [Line("prefix-change", text)]
        if deleted:
            lines.append(Line("prefix-change", f"conntrack: {deleted} connection(s) of the old mapping deleted"))
        return lines
    if cause == "reload":
        return [Line("reload", text) for text in repair_lines(actions, deleted, "updated")]
    return [Line("repair", text) for text in repair_lines(actions, deleted)]
