"""Netlink events: they only say "something changed"; the reconciler re-reads the kernel."""

from __future__ import annotations

from collections.abc import Callable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE
)


async def watch(trigger: Callable[[str], None], bound: Callable[[], None] = lambda: None) -> None:
    """Call trigger(event name) for every link, address, route and rule event, until cancelled.

    `bound` is called once the socket is subscribed: a sync started after it cannot miss a change."""
    async with AsyncIPRoute() as ipr:
        await ipr.bind(groups=GROUPS)
        bound()
        while True:
            async for msg in ipr.get():
                trigger(msg.get("event", "netlink"))
