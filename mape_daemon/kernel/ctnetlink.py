"""A lean ctnetlink dump for the port reading, which runs every minute on a router that may track
tens of thousands of connections: the kernel sends only the entries whose reply goes to the MAP
IPv4 (CTA_FILTER, Linux 5.8+; older kernels ignore it or refuse it, and we filter here too), and
we decode three fields of each instead of building pyroute2's whole message object (about 0.3 ms
of CPU per entry, measured: a minute's reading of 10,000 flows would cost seconds).
"""

from __future__ import annotations

import errno
import socket
import struct

from .rtnl import DumpRefused, Reader, attrs, u8

NETLINK_NETFILTER = 12
CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_FILTER = 1, 2, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID = 1, 3, 4
CTA_FILTER_REPLY_FLAGS = 2
FILTER_IP_DST = 1 << 1  # CTA_FILTER_F_CTA_IP_DST
NESTED = 0x8000
NFGENMSG = 4  # family, version, resource id: before the attributes
ICMP = socket.IPPROTO_ICMP


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def request(ipv4: str, filtered: bool = True) -> bytes:
    """The body of a dump of the IPv4 table; `filtered`: only entries whose reply's destination
    is `ipv4`."""
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)
    if filtered:
        ip = _attr(CTA_TUPLE_IP, _attr(CTA_IP_V4_DST, socket.inet_aton(ipv4)), nested=True)
        body += _attr(CTA_TUPLE_REPLY, ip, nested=True)
        body += _attr(CTA_FILTER, _attr(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", FILTER_IP_DST)), nested=True)
    return body


def entry(payload: bytes, ipv4: bytes) -> tuple[int, int, str] | None:
    """(protocol, reply port or ICMP id, original source) of one entry whose reply goes to
    `ipv4` (4 bytes); None for another's."""
    top = attrs(payload, NFGENMSG)
    orig, reply = attrs(top.get(CTA_TUPLE_ORIG, b"")), attrs(top.get(CTA_TUPLE_REPLY, b""))
    if attrs(reply.get(CTA_TUPLE_IP, b"")).get(CTA_IP_V4_DST) != ipv4:
        return None
    proto = u8(attrs(orig.get(CTA_TUPLE_PROTO, b"")).get(CTA_PROTO_NUM))
    port = attrs(reply.get(CTA_TUPLE_PROTO, b"")).get(CTA_PROTO_ICMP_ID if proto == ICMP else CTA_PROTO_DST_PORT)
    source = attrs(orig.get(CTA_TUPLE_IP, b"")).get(CTA_IP_V4_SRC)
    if port is None or source is None:
        return None
    return proto, int.from_bytes(port[:2], "big"), socket.inet_ntoa(source)


def dump(ipv4: str, filtered: bool = True) -> list[tuple[int, int, str]]:
    """(protocol number, port or ICMP id of the set, LAN source) of every entry NATed to `ipv4`.
    Raises RetryableError (the kernel's refusal) or OSError (no conntrack)."""
    want = socket.inet_aton(ipv4)
    reader = Reader(NETLINK_NETFILTER)
    try:
        try:
            payloads = reader.dump(CT_GET, request(ipv4, filtered))
        except DumpRefused as e:
            if not filtered or e.code not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            payloads = reader.dump(CT_GET, request(ipv4, False))  # a kernel before 5.8 refuses the filter
    finally:
        reader.close()
    return [e for p in payloads if (e := entry(p, want)) is not None]
