"""Netlink events: they only say "something changed"; the reconciler re-reads the kernel.

The socket is read raw, as nftevents does: the one thing looked into is an address event's
flags and lifetimes, and decoding every message with pyroute2 cost more CPU than the rest of an
idle daemon together (an RA every few seconds refreshes every SLAAC address).
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
from collections.abc import Callable

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
    messages,
    u32,
)

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE = 0x1, 0x10, 0x40, 0x80
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE
)
RTM_NEWADDR, RTM_DELADDR = 20, 21
SO_ATTACH_FILTER = 26
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


def _be(fmt: str, *values: int) -> int:
    """`values` packed in host order, as classic BPF loads them (big-endian): netlink headers and
    attributes are in host order."""
    return int.from_bytes(struct.pack("=" + fmt, *values), "big")


def refresh_filter() -> bytes:
    """A socket filter (classic BPF) that drops, in the kernel, what an RA's lifetime refresh
    sends: an IPv6 RTM_NEWADDR of an address neither new (creation and update stamps differ),
    tentative nor deprecated. It waking the daemon once per RA was the rest of an idle daemon's
    CPU. Anything laid out otherwise (a peer address, a route priority) passes. Seen only by the
    next full sync: a flag-only change of an existing preferred address, or an old prefix made
    preferred again while the new one stays preferred too."""
    ld_b, ld_h, ld_w, tax, jeq_k, jeq_x, jset, ret = 0x30, 0x28, 0x20, 0x07, 0x15, 0x1D, 0x45, 0x06
    PASS = -1  # a jump label
    code = [  # (op, jump if true, jump if false, k); a jump is to the next insn, or to PASS
        (ld_b, 0, 0, 16), (jeq_k, 0, PASS, socket.AF_INET6),  # ifa_family
        (ld_h, 0, 0, 4), (jeq_k, 0, PASS, _be("H", RTM_NEWADDR)),  # nlmsg_type
        (ld_b, 0, 0, 18), (jset, PASS, 0, IFA_F_TENTATIVE | IFA_F_DEPRECATED),  # ifa_flags
        (ld_w, 0, 0, 24), (jeq_k, 0, PASS, _be("HH", 20, IFA_ADDRESS)),  # the address attribute,
        (ld_w, 0, 0, 44), (jeq_k, 0, PASS, _be("HH", 20, IFA_CACHEINFO)),  # then the cache info:
        (ld_w, 0, 0, 48), (jeq_k, PASS, 0, 0),  # preferred lifetime 0 (deprecated)
        (ld_w, 0, 0, 60), (tax, 0, 0, 0), (ld_w, 0, 0, 56), (jeq_x, PASS, 0, 0),  # tstamp == cstamp: new
        (ret, 0, 0, 0),  # drop: a refresh
        (ret, 0, 0, 0xFFFF),  # PASS
    ]  # fmt: skip
    last = len(code) - 1
    out = b""
    for i, (op, jt, jf, k) in enumerate(code):
        jt, jf = (last - i - 1 if j == PASS else j for j in (jt, jf))
        out += struct.pack("=HBBI", op, jt, jf, k)
    return out


def subscribe(rcvbuf: int = 1 << 20) -> socket.socket:
    """A non-blocking rtnetlink socket on our groups, RA refreshes filtered out in the kernel."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    try:
        program = ctypes.create_string_buffer(refresh_filter())
        fprog = struct.pack("@HL", len(program.raw) // 8, ctypes.addressof(program))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, GROUPS))
    except BaseException:
        sock.close()
        raise
    return sock


async def watch(
    trigger: Callable[[int], None], bound: Callable[[], None] = lambda: None, rcvbuf: int = 1 << 20
) -> None:
    """Call trigger(message type) for link, address, route and rule events, until cancelled.

    `bound` is called once the socket is subscribed: a sync started after it cannot miss a change.
    A burst larger than the socket's buffer raises OSError(ENOBUFS): events were lost, and the
    caller must sync in full and subscribe again."""
    news = AddressRefreshFilter()
    sock = subscribe(rcvbuf)
    try:
        bound()
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(sock, 1 << 16)
            for kind, _flags, _seq, payload in messages(data):
                if news.is_news(kind, payload):
                    trigger(kind)
    finally:
        sock.close()
