"""Netlink events: they only say "something changed"; the reconciler re-reads the kernel."""

from __future__ import annotations

from collections.abc import Callable

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from .netlink import IFA_F_DEPRECATED, IFA_F_NODAD, IFA_F_NOPREFIXROUTE, IFA_F_TENTATIVE

GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE
)
# Flags whose change matters to us; lifetimes are left out on purpose.
ADDR_FLAGS = IFA_F_NODAD | IFA_F_DEPRECATED | IFA_F_TENTATIVE | IFA_F_NOPREFIXROUTE


class AddressRefreshFilter:
    """Every router advertisement refreshes the lifetimes of the SLAAC addresses, and the kernel
    reports each refresh as RTM_NEWADDR. An address whose flags did not change is no news: such
    events are dropped, so an idle router does not sync once per RA. Everything else passes."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, str, int], int] = {}

    def is_news(self, msg) -> bool:
        event = msg.get("event")
        if event not in ("RTM_NEWADDR", "RTM_DELADDR"):
            return True
        key = (msg["index"], msg.get_attr("IFA_ADDRESS"), msg["prefixlen"])
        if event == "RTM_DELADDR":
            self.seen.pop(key, None)
            return True
        flags = (msg.get_attr("IFA_FLAGS") or msg["flags"]) & ADDR_FLAGS
        cache = msg.get_attr("IFA_CACHEINFO")
        if cache is not None and cache["ifa_preferred"] == 0:
            flags |= IFA_F_DEPRECATED
        news = self.seen.get(key) != flags
        self.seen[key] = flags
        return news


async def watch(
    trigger: Callable[[str], None], bound: Callable[[], None] = lambda: None, rcvbuf: int = 1 << 20
) -> None:
    """Call trigger(event name) for link, address, route and rule events, until cancelled.

    `bound` is called once the socket is subscribed: a sync started after it cannot miss a change.
    A burst larger than the socket's buffer raises NetlinkError(ENOBUFS): events were lost, and
    the caller must sync in full and subscribe again."""
    news = AddressRefreshFilter()
    async with AsyncIPRoute(rcvbuf=rcvbuf) as ipr:
        await ipr.bind(groups=GROUPS)
        bound()
        while True:
            async for msg in ipr.get():
                if news.is_news(msg):
                    trigger(msg.get("event", "netlink"))
