"""A lean ctnetlink dump for the port reading, which runs every minute on a router that may track
tens of thousands of connections: the kernel sends only the entries whose reply goes to the MAP
IPv4 (CTA_FILTER, Linux 5.8+; older kernels ignore it or refuse it, and we filter here too), and
we decode three fields of each instead of building pyroute2's whole message object (about 0.3 ms
of CPU per entry, measured: a minute's reading of 10,000 flows would cost seconds).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_FILTER = 1, 2, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID = 1, 3, 4
CTA_FILTER_REPLY_FLAGS = 2
FILTER_IP_DST = 1 << 1  # CTA_FILTER_F_CTA_IP_DST
NESTED = 0x8000
HEADER = struct.Struct("=IHHII")
ATTR = struct.Struct("=HH")
ICMP = socket.IPPROTO_ICMP


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = ATTR.pack(4 + len(payload), kind | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def request(ipv4: str, seq: int, filtered: bool = True) -> bytes:
    """A dump of the IPv4 table; `filtered`: only entries whose reply's destination is `ipv4`."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    if filtered:
        ip = _attr(CTA_TUPLE_IP, _attr(CTA_IP_V4_DST, socket.inet_aton(ipv4)), nested=True)
        body += _attr(CTA_TUPLE_REPLY, ip, nested=True)
        body += _attr(CTA_FILTER, _attr(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", FILTER_IP_DST)), nested=True)
    return HEADER.pack(HEADER.size + len(body), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = ATTR.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


def _tuple(buf: bytes, start: int, end: int) -> tuple[bytes, bytes, int, int | None, int | None]:
    """(source, destination, protocol, destination port, ICMP id) of a CTA_TUPLE_* payload."""
    src = dst = b""
    proto, port, icmp_id = 0, None, None
    for kind, s, e in _attrs(buf, start, end):
        if kind == CTA_TUPLE_IP:
            for k, a, b in _attrs(buf, s, e):
                if k == CTA_IP_V4_SRC:
                    src = buf[a:b]
                elif k == CTA_IP_V4_DST:
                    dst = buf[a:b]
        elif kind == CTA_TUPLE_PROTO:
            for k, a, _ in _attrs(buf, s, e):
                if k == CTA_PROTO_NUM:
                    proto = buf[a]
                elif k == CTA_PROTO_DST_PORT:
                    port = int.from_bytes(buf[a : a + 2], "big")
                elif k == CTA_PROTO_ICMP_ID:
                    icmp_id = int.from_bytes(buf[a : a + 2], "big")
    return src, dst, proto, port, icmp_id


def parse(buf: bytes, ipv4: bytes, out: list[tuple[int, int, str]]) -> int | None:
    """Append to `out` the entries of one receive whose reply goes to `ipv4` (4 bytes), as
    (protocol, reply port or ICMP id, original source). Returns 0 at the dump's end, an errno
    when the kernel refused, None when more is to come."""
    at = 0
    while at + HEADER.size <= len(buf):
        length, kind, _, _, _ = HEADER.unpack_from(buf, at)
        if kind == NLMSG_DONE:
            return 0
        if kind == NLMSG_ERROR:
            return -struct.unpack_from("=i", buf, at + HEADER.size)[0]
        orig = reply = None
        for k, s, e in _attrs(buf, at + HEADER.size + 4, at + length):
            if k == CTA_TUPLE_ORIG:
                orig = _tuple(buf, s, e)
            elif k == CTA_TUPLE_REPLY:
                reply = _tuple(buf, s, e)
        if orig and reply and reply[1] == ipv4:
            port = reply[4] if orig[2] == ICMP else reply[3]
            if port is not None:
                out.append((orig[2], port, socket.inet_ntoa(orig[0])))
        at += (length + 3) & ~3
    return None


def dump(ipv4: str) -> list[tuple[int, int, str]]:
    """(protocol number, port or ICMP id of the set, LAN source) of every entry NATed to `ipv4`.
    Raises OSError (the kernel's refusal, or no conntrack)."""
    try:
        return _dump(ipv4, filtered=True)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return _dump(ipv4, filtered=False)  # a kernel before 5.8 that refuses the filter


def _dump(ipv4: str, filtered: bool) -> list[tuple[int, int, str]]:
    want = socket.inet_aton(ipv4)
    out: list[tuple[int, int, str]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.send(request(ipv4, 1, filtered))
        while (status := parse(sock.recv(1 << 16), want, out)) is None:
            pass
    if status:
        raise OSError(status, os.strerror(status))
    return out
