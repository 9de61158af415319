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

from .actions import Action, Words
from .lines import TITLE
from .result import SyncResult


@dataclass(frozen=True)
class Line:
    event: str
    text: str


def repair_lines(actions: tuple[Action, ...], deleted: int, restored: str = "restored") -> list[str]:
    """One line per thing put back (or changed by a reload: `restored` is then "updated") or taken
    away, with why."""
    words = Words.of(actions, restored, deleted)
    return [line for a in actions for line in a.journal(words)]


def summary(actions: tuple[Action, ...]) -> str:
    """A count of what a new mapping set up, for its one line."""
    kinds: Counter[str] = Counter()
    for a in actions:
        for noun, n in a.tally():
            kinds[noun] += n
    return ", ".join(f"{n} {noun}{('es' if noun.endswith('s') else 's') if n > 1 else ''}"
                     for noun, n in kinds.items())  # fmt: skip


def prefix_state(prefix: str, result: SyncResult) -> str:
    """What became of a prefix on the WAN: announced, deprecated or gone."""
    net = IPv6Network(prefix)
    on_wan = [w for w in result.wan if IPv6Address(w.address) in net and not w.ours_shape]
    if not on_wan:
        return "gone"
    return "deprecated" if all(w.deprecated for w in on_wan) else "still announced"


def describe(result: SyncResult, cause: str) -> list[Line]:
    """The lines for one sync; none when nothing changed."""
    actions = result.plan.actions[: result.applied]  # a failed sync says only what it did
    if not actions:
        return []
    p, prev = result.params, result.previous
    deleted = result.conntrack_deleted
    if p is None:
        what = f"was {prev.text}" if prev else "nothing mapped"
        title = TITLE.get(prev.method if prev else "", "MAP-E")
        return [Line("teardown", f"{title} off: {result.selection.reason} ({what}); removed {len(actions)} object(s)")]
    mapped = p.describe()
    if prev is None:
        sel = result.selection
        src = sel.source.describe() if sel.source else str(p.end_user_prefix)
        event = "start" if cause == "start" else "prefix-change"
        lines = [Line(event, f"mapped: {mapped} (prefix {p.end_user_prefix} from {src}); set up {summary(actions)}")]
        if sel.passed_over:
            lines.append(Line(event, f"not used: {sel.passed_over} (wan.prefix_from = auto takes a delegation first)"))
        return lines
    if prev.text != p.short() or prev.prefix != str(p.end_user_prefix):
        old = f"{prev.prefix} {prefix_state(prev.prefix, result)}" if prev.prefix != str(p.end_user_prefix) else ""
        text = (f"moved to {p.short()} (prefix {p.end_user_prefix} announced"
                f"{', ' + old if old else ''}; was {prev.text})")  # fmt: skip
        lines = [Line("prefix-change", text)]
        if deleted:
            lines.append(Line("prefix-change", f"conntrack: {deleted} connection(s) of the old mapping deleted"))
        return lines
    if cause == "reload":
        return [Line("reload", text) for text in repair_lines(actions, deleted, "updated")]
    return [Line("repair", text) for text in repair_lines(actions, deleted)]
