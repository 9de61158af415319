"""How full the port set is, per protocol, and when that becomes an episode worth a journal line.
Pure: the daemon feeds it conntrack's NATed flows every `ports.check_every` seconds.

Port exhaustion is the complaint MAP-E users raise most (1008 ports on OCN, 240 on v6plus,
shared by the whole LAN); a new connection then fails with no word anywhere. An episode starts
when a protocol's ports in use reach `ports.warn_percent` of the set, or one of its blocks is
full (a UDP range serves 16 flows towards one server; TCP and ICMP, spread per connection, fill
blocks evenly), and ends when neither holds: one line each, with the LAN hosts using most.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .state import Flow

PROTOCOLS = ("tcp", "udp", "icmp")
TOP_HOSTS = 3  # LAN hosts named in an episode's line


@dataclass(frozen=True)
class Usage:
    protocol: str
    in_use: int
    of: int
    fullest: tuple[int, int] | None  # the block with most ports in use (the first to run out)
    fullest_in_use: int
    hosts: tuple[tuple[str, int], ...]  # LAN hosts by ports in use, most first

    @property
    def share(self) -> float:
        return self.in_use / self.of if self.of else 0.0

    @property
    def fullest_size(self) -> int:
        return self.fullest[1] - self.fullest[0] + 1 if self.fullest else 0

    def as_dict(self) -> dict:
        """The shape `status --json` has given since issue 13 (`ports_in_use`), and the hosts."""
        fb = None if self.fullest is None else {"range": list(self.fullest), "in_use": self.fullest_in_use,
                                                "size": self.fullest_size}  # fmt: skip
        return {"in_use": self.in_use, "of": self.of, "fullest_block": fb, "hosts": [list(h) for h in self.hosts]}


def usage(flows: list[Flow], ranges: list[tuple[int, int]]) -> dict[str, Usage]:
    """Per protocol: distinct ports in use out of the set, the fullest block, the busiest hosts."""
    total = sum(hi - lo + 1 for lo, hi in ranges)
    out = {}
    for proto in PROTOCOLS:
        mine = [f for f in flows if f.protocol == proto]
        used = {f.port for f in mine}
        per_block = Counter(next((i for i, (lo, hi) in enumerate(ranges) if lo <= p <= hi), -1) for p in used)
        per_block.pop(-1, None)
        fullest = max(sorted(per_block.items()), key=lambda kv: kv[1], default=None)  # ties: the lowest block
        hosts = Counter(host for host, _ in {(f.host, f.port) for f in mine})
        out[proto] = Usage(proto, len(used), total, None if fullest is None else ranges[fullest[0]],
                           0 if fullest is None else fullest[1], tuple(hosts.most_common()))  # fmt: skip
    return out


@dataclass
class Exhaustion:
    """Episodes per protocol: `update` returns the lines to log (start or end), once each."""

    open: dict[str, str] = field(default_factory=dict)  # protocol -> why its episode is open

    @staticmethod
    def why(u: Usage, warn_percent: float) -> str | None:
        reasons = []
        if u.of and 100 * u.share >= warn_percent:
            reasons.append(f"{u.in_use} of {u.of} ports in use ({100 * u.share:.0f}% >= {warn_percent:g}%)")
        if u.fullest is not None and u.fullest_in_use >= u.fullest_size:
            reasons.append(f"block {u.fullest[0]}-{u.fullest[1]} full")
        return "; ".join(reasons) or None

    def update(self, usages: dict[str, Usage], warn_percent: float) -> list[tuple[str, str]]:
        """[(\"start\" | \"end\", text)] for the protocols whose episode began or ended."""
        lines = []
        for proto, u in usages.items():
            why = self.why(u, warn_percent)
            if why and proto not in self.open:
                top = ", ".join(f"{h} ({n})" for h, n in u.hosts[:TOP_HOSTS]) or "none"
                lines.append(("start", f"{proto} ports running out: {why}; most by {top}"))
            elif not why and proto in self.open:
                lines.append(("end", f"{proto} ports no longer running out: {u.in_use} of {u.of} in use"))
            if why:
                self.open[proto] = why
            else:
                self.open.pop(proto, None)
        return lines

    def clear(self) -> list[tuple[str, str]]:
        """MAP-E off (no mapping): open episodes end without a count."""
        lines = [("end", f"{proto} ports no longer running out: no mapping") for proto in sorted(self.open)]
        self.open.clear()
        return lines
