"""rtnetlink dumps read raw: links, addresses, routes and rules, each message cut with struct for
the few fields we compare. pyroute2 decodes every attribute of every message into Python
objects, which made a sync that changes nothing cost most of a blind re-apply; it still does
every change (netlink.py), where its request building earns its keep.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import RetryableError

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETRULE, RTM_GETTFILTER = 18, 22, 26, 34, 46
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
FIB_RULE_HDR = RTMSG  # family, dst_len, src_len, tos, table, res1, res2, action, flags: the same layout
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFA_ADDRESS, IFA_CACHEINFO, IFA_FLAGS = 1, 6, 8
IFA_F_NODAD, IFA_F_DEPRECATED, IFA_F_TENTATIVE, IFA_F_NOPREFIXROUTE = 0x02, 0x20, 0x40, 0x200
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_TABLE = 1, 4, 6, 15
FRA_PRIORITY, FRA_FWMARK, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 6, 10, 14, 15, 16, 21
MSG_TRUNC = 0x20
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info (priority << 16 | protocol)
TC_H_CLSACT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_OPS, TCA_BPF_FLAGS = 5, 8
SOCK_FILTER = struct.Struct("=HBBI")  # one classic BPF instruction: code, jt, jf, k


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in one datagram."""
    off = 0
    while off + HEADER.size <= len(data):
        length, kind, flags, seq, _pid = HEADER.unpack_from(data, off)
        if length < HEADER.size:
            break
        yield kind, flags, seq, data[off + HEADER.size : off + length]
        off += (length + 3) & ~3


def attrs(data: bytes, off: int = 0) -> dict[int, bytes]:
    """The attributes from `off` on, by type (the nested and byte-order bits masked off)."""
    out = {}
    while off + 4 <= len(data):
        alen, kind = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        out[kind & 0x3FFF] = data[off + 4 : off + alen]
        off += (alen + 3) & ~3
    return out


def u32(value: bytes | None, default: int = 0) -> int:
    return struct.unpack("=I", value[:4])[0] if value is not None and len(value) >= 4 else default


def u8(value: bytes | None, default: int = 0) -> int:
    return value[0] if value else default


def text(value: bytes | None) -> str:
    return (value or b"").split(b"\0", 1)[0].decode(errors="replace")


def address(family: int, value: bytes | None) -> str:
    return socket.inet_ntop(family, value) if value else ""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str  # "" for a device without link info (ethernet, lo)
    flags: int
    mtu: int
    data: dict[int, bytes]  # IFLA_INFO_DATA (the tunnel parameters), for an ip6tnl only


@dataclass(frozen=True)
class AddrMsg:
    family: int
    index: int
    address: str
    prefixlen: int
    scope: int
    flags: int
    preferred: int  # preferred lifetime, seconds; 0xFFFFFFFF: forever or not given


@dataclass(frozen=True)
class RouteMsg:
    family: int
    dst: str  # "" for the default route
    dst_len: int
    table: int
    protocol: int
    type: int
    oif: int
    priority: int


@dataclass(frozen=True)
class RuleMsg:
    priority: int
    fwmark: int
    mask: int
    table: int
    suppress_prefixlength: int  # 0xFFFFFFFF: not set
    protocol: int


@dataclass(frozen=True)
class BpfFilter:
    priority: int
    ops: tuple[tuple[int, int, int, int], ...]  # the classic BPF program
    flags: int  # TCA_BPF_FLAGS (1: direct-action)


class DumpRefused(RetryableError):
    """The kernel answered a dump with an error; `code` is its errno."""

    def __init__(self, code: int):
        super().__init__(f"reading the kernel: {os.strerror(code)}")
        self.code = code


class Reader:
    """One rtnetlink socket (or another netlink family's: ctnetlink's), opened in the calling
    thread's network namespace."""

    def __init__(self, protocol: int = socket.NETLINK_ROUTE) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        # Strict checking: the kernel then filters a route dump by table and protocol itself, so
        # a router with 100,000 routes in another table costs us nothing to read.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def dump(self, kind: int, body: bytes, nothing: tuple[int, ...] = ()) -> Iterator[bytes]:
        """The payloads of one dump. A dump the kernel marks interrupted (the table changed
        while it was read) is not trusted: the sync fails and is retried. An error in `nothing`
        (errno values) means an empty dump."""
        self.seq += 1
        self.sock.send(HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body)
        out, interrupted = [], False
        while True:
            data, _, flags, _ = self.sock.recvmsg(1 << 17)
            if flags & MSG_TRUNC:
                raise RetryableError("reading the kernel: a netlink message did not fit the buffer")
            for mtype, mflags, seq, payload in messages(data):
                if seq != self.seq:
                    continue
                interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                if mtype in (NLMSG_DONE, NLMSG_ERROR):  # a dump's error comes in either, as -errno
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code in nothing:
                        return iter(())
                    if code:
                        raise DumpRefused(code)
                    if interrupted:
                        raise RetryableError("reading the kernel: it changed during the read")
                    return iter(out)
                out.append(payload)

    def links(self) -> list[Link]:
        out = []
        for p in self.dump(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _family, _type, index, flags, _change = IFINFOMSG.unpack_from(p)
            a = attrs(p, IFINFOMSG.size)
            info = attrs(a.get(IFLA_LINKINFO, b""))
            kind = text(info.get(IFLA_INFO_KIND))
            data = attrs(info.get(IFLA_INFO_DATA, b"")) if kind == "ip6tnl" else {}
            out.append(Link(index, text(a.get(IFLA_IFNAME)), kind, flags, u32(a.get(IFLA_MTU)), data))
        return out

    def addresses(self, family: int) -> list[AddrMsg]:
        out = []
        for p in self.dump(RTM_GETADDR, IFADDRMSG.pack(family, 0, 0, 0, 0)):
            fam, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(p)
            a = attrs(p, IFADDRMSG.size)
            flags = u32(a.get(IFA_FLAGS), flags)
            cache = a.get(IFA_CACHEINFO)
            out.append(AddrMsg(fam, index, address(fam, a.get(IFA_ADDRESS)), prefixlen, scope, flags,
                               u32(cache, 0xFFFFFFFF)))  # fmt: skip
        return out

    def routes(self, family: int, table: int = 0, protocol: int = 0) -> list[RouteMsg]:
        """The routes of `family`; only those of `table` and of `protocol` when given (0: all),
        filtered by the kernel."""
        out = []
        body = RTMSG.pack(family, 0, 0, 0, min(table, 252) if table else 0, protocol, 0, 0, 0)  # 252: see RTA_TABLE
        if table:
            body += struct.pack("=HHI", 8, RTA_TABLE, table)
        for p in self.dump(RTM_GETROUTE, body, nothing=(errno.ENOENT,)):  # a table with no route does not exist
            fam, dst_len, _src_len, _tos, table, protocol, _scope, rtype, _flags = RTMSG.unpack_from(p)
            a = attrs(p, RTMSG.size)
            out.append(RouteMsg(fam, address(fam, a.get(RTA_DST)), dst_len, u32(a.get(RTA_TABLE), table), protocol,
                                rtype, u32(a.get(RTA_OIF)), u32(a.get(RTA_PRIORITY))))  # fmt: skip
        return out

    def rules(self, family: int = socket.AF_INET) -> list[RuleMsg]:
        out = []
        for p in self.dump(RTM_GETRULE, FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            table = FIB_RULE_HDR.unpack_from(p)[4]
            a = attrs(p, FIB_RULE_HDR.size)
            out.append(RuleMsg(u32(a.get(FRA_PRIORITY)), u32(a.get(FRA_FWMARK)), u32(a.get(FRA_FWMASK), 0xFFFFFFFF),
                               u32(a.get(FRA_TABLE), table), u32(a.get(FRA_SUPPRESS_PREFIXLEN), 0xFFFFFFFF),
                               u8(a.get(FRA_PROTOCOL))))  # fmt: skip
        return out

    def bpf_filters(self, ifindex: int) -> list[BpfFilter]:
        """The classic BPF filters on a device's clsact egress hook (none without a clsact qdisc)."""
        out = []
        body = TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, TC_H_CLSACT_EGRESS, 0)
        for p in self.dump(RTM_GETTFILTER, body, nothing=(errno.EINVAL, errno.ENOENT, errno.ENODEV)):
            info = TCMSG.unpack_from(p)[4]
            a = attrs(p, TCMSG.size)
            options = attrs(a.get(TCA_OPTIONS, b""))
            if text(a.get(TCA_KIND)) != "bpf" or TCA_BPF_OPS not in options:
                continue  # the chain's own line, or another kind of filter
            raw = options[TCA_BPF_OPS]
            ops = tuple(
                SOCK_FILTER.unpack_from(raw, i) for i in range(0, len(raw) - SOCK_FILTER.size + 1, SOCK_FILTER.size)
            )
            out.append(BpfFilter(info >> 16, ops, u32(options.get(TCA_BPF_FLAGS))))
        return out
