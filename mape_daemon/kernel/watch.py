"""Netlink events: they only say "something changed"; the reconciler re-reads the kernel.

The socket is read raw, as nftevents does: the one thing looked into is an address event's
flags and lifetimes, and decoding every message with pyroute2 cost more CPU than the rest of an
idle daemon together (an RA every few seconds refreshes every SLAAC address).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from .nftevents import messages
from .rtnl import (
    IFA_ADDRESS,
    IFA_CACHEINFO,
    IFA_F_DEPRECATED,
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    IFA_F_TENTATIVE,
    IFA_FLAGS,
    IFADDRMSG,
    attrs,
    u32,
)

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x1, 0x10, 0x40, 0x80
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE
)
RTM_NEWADDR, RTM_DELADDR = 20, 21
# Flags whose change matters to us; lifetimes are left out on purpose.
ADDR_FLAGS = IFA_F_NODAD | IFA_F_DEPRECATED | IFA_F_TENTATIVE | IFA_F_NOPREFIXROUTE


class AddressRefreshFilter:
    """Every router advertisement refreshes the lifetimes of the SLAAC addresses, and the kernel
    reports each refresh as RTM_NEWADDR. An address whose flags did not change is no news: such
    events are dropped, so an idle router does not sync once per RA. Everything else passes."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, bytes, int], int] = {}

    def is_news(self, kind: int, payload: bytes) -> bool:
        if kind not in (RTM_NEWADDR, RTM_DELADDR) or len(payload) < IFADDRMSG.size:
            return True
        _family, prefixlen, flags, _scope, index = IFADDRMSG.unpack_from(payload)
        attrs_ = attrs(payload, IFADDRMSG.size)
        key = (index, attrs_.get(IFA_ADDRESS, b""), prefixlen)
        if kind == RTM_DELADDR:
            self.seen.pop(key, None)
            return True
        flags = u32(attrs_.get(IFA_FLAGS), flags) & ADDR_FLAGS
        if u32(attrs_.get(IFA_CACHEINFO), 1) == 0:  # preferred lifetime 0
            flags |= IFA_F_DEPRECATED
        news = self.seen.get(key) != flags
        self.seen[key] = flags
        return news


async def watch(
    trigger: Callable[[int], None], bound: Callable[[], None] = lambda: None, rcvbuf: int = 1 << 20
) -> None:
    """Call trigger(message type) for link, address, route and rule events, until cancelled.

    `bound` is called once the socket is subscribed: a sync started after it cannot miss a change.
    A burst larger than the socket's buffer raises OSError(ENOBUFS): events were lost, and the
    caller must sync in full and subscribe again."""
    news = AddressRefreshFilter()
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, GROUPS))
        bound()
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(sock, 1 << 16)
            for kind, payload in messages(data):
                if news.is_news(kind, payload):
                    trigger(kind)
    finally:
        sock.close()
