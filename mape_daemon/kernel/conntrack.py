"""Connection tracking through ctnetlink (pyroute2, in this process: no conntrack tool needed).

A connection NATed by us has the MAP IPv4 as its reply direction's destination and the port (or
ICMP id) it was given as the reply's destination port. Cleanups delete entries whose mapping is no
longer right; `nat_flows` reads the ports in use (for `status`, the metrics and the exhaustion
warning).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator

from pyroute2.conntrack import Conntrack
from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import RetryableError
from ..state import Flow
from . import ctnetlink

PROTO_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}


def _reply_port(entry) -> int | None:
    t = entry.tuple_reply
    return t.icmp_id if t.proto == socket.IPPROTO_ICMP else t.dport


def _in(port: int | None, ranges: Iterable[tuple[int, int]]) -> bool:
    return port is not None and any(lo <= port <= hi for lo, hi in ranges)


def _entries(ct: Conntrack) -> Iterator:
    try:
        yield from ct.dump_entries()
    except NetlinkError as e:
        raise RetryableError(f"reading conntrack: {os.strerror(e.code)}") from None


def _old(entry, drop_ipv4: set[str]) -> bool:
    """NATed to (or sent by the router from) an old MAP IPv4, or forwarded in to it (DNAT)."""
    return entry.tuple_reply.daddr in drop_ipv4 or entry.tuple_orig.daddr in drop_ipv4


def stale(entry, drop_ipv4: set[str], ipv4: str | None, ranges, unnated: bool) -> bool:
    """True for an entry whose mapping is wrong by the rules of ConntrackCleanup (the route check
    for un-NATed entries is the caller's)."""
    o, r = entry.tuple_orig, entry.tuple_reply
    if _old(entry, drop_ipv4):
        return True
    if ipv4 is not None and r.daddr == ipv4:
        # NATed to the MAP IPv4 (or sent by the router from it): its port must be in the set.
        return o.proto in PROTO_NAMES and not _in(_reply_port(entry), ranges)
    return unnated and o.saddr == r.daddr and o.daddr == r.saddr  # not NATed at all


def cleanup(drop_ipv4: Iterable[str], ipv4: str | None, ranges, unnated_via: str | None) -> int:
    """Delete the stale entries; returns how many went. `unnated_via` (a tunnel name) adds the
    entries that were not NATed at all and whose destination routes by that tunnel."""
    drop = set(drop_ipv4)
    deleted = 0
    routes: dict[str, bool] = {}
    with Conntrack() as ct, IPRoute() as ipr:
        via = ipr.link_lookup(ifname=unnated_via)[0] if unnated_via and ipr.link_lookup(ifname=unnated_via) else None

        def by_tunnel(dst: str) -> bool:
            if dst not in routes:
                try:
                    found = ipr.route("get", dst=dst)
                    routes[dst] = bool(found) and found[0].get_attr("RTA_OIF") == via
                except NetlinkError:
                    routes[dst] = False
            return routes[dst]

        victims = [e for e in _entries(ct) if stale(e, drop, ipv4, ranges, via is not None)]
        for e in victims:
            if not _old(e, drop) and e.tuple_orig.saddr == e.tuple_reply.daddr and not by_tunnel(e.tuple_orig.daddr):
                continue  # not NATed, but not bound for the tunnel either (LAN to LAN, PPPoE)
            try:
                ct.delete(e)
                deleted += 1
            except NetlinkError as err:
                if err.code != 2:  # ENOENT: it expired meanwhile
                    raise RetryableError(f"deleting a conntrack entry: {os.strerror(err.code)}") from None
    return deleted


def nat_flows(ipv4: str) -> list[Flow]:
    """Every tracked connection NATed to `ipv4`: its protocol, the port (ICMP id) of the set it
    holds, and the LAN host it came from. Lean (see ctnetlink): it runs every minute."""
    try:
        entries = ctnetlink.dump(ipv4)
    except OSError as e:
        raise RetryableError(f"reading conntrack: {e.strerror or e}") from None
    return [Flow(PROTO_NAMES[proto], port, host) for proto, port, host in entries if proto in PROTO_NAMES]
