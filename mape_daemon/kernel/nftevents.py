"""nf_tables change events: the kernel announces every ruleset commit (nft, iptables-nft,
firewalld's nftables backend, `nft flush ruleset`) on NETLINK_NETFILTER, group NFNLGRP_NFTABLES:
one message per object changed (table, chain, rule, set, ...; each names its table), closed by an
NFT_MSG_NEWGEN that carries the new ruleset generation and the committing pid. A commit by
another process that touched a table of ours means someone else changed our netfilter state, and
a sync (which re-reads everything) follows; one that touched only other tables (fail2ban,
crowdsec, docker, kube-proxy on a busy host) is no news; our own commits (this process through
libnftables, our iptables-restore children) are none either. Legacy iptables sends nothing; the
periodic sync stays for it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from .rtnl import HEADER, attrs, messages

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID, NFTA_GEN_PROC_PID = 1, 2
NLM_F_REQUEST = 0x1
NEWGEN = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
NFGEN = 4  # nfgenmsg: family, version, res_id (network order)
NFTA_TABLE = 1  # every object message's first attribute names its table (NFTA_TABLE_NAME, NFTA_RULE_TABLE, ...)
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}  # NFPROTO_*


def _u32(payload: bytes, attr: int) -> int | None:
    """A big-endian u32 attribute of an nf_tables GEN message (after its nfgenmsg), if given."""
    value = attrs(payload, NFGEN).get(attr)
    return struct.unpack("!I", value[:4])[0] if value is not None and len(value) >= 4 else None


def generation_of(payload: bytes) -> int | None:
    return _u32(payload, NFTA_GEN_ID)


def current_generation() -> int | None:
    """The ruleset generation now (NFT_MSG_GETGEN), or None where nf_tables is not available."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
            s.settimeout(2)
            body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
            s.send(HEADER.pack(HEADER.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                               NLM_F_REQUEST, 1, 0) + body)  # fmt: skip
            for kind, _flags, _seq, payload in messages(s.recv(8192)):
                if kind == NEWGEN:
                    return generation_of(payload)
    except OSError:
        return None
    return None


def table_of(payload: bytes) -> tuple[str, str] | None:
    """(family, table name) an object message is about, e.g. ("ip", "mape")."""
    name = attrs(payload, NFGEN).get(NFTA_TABLE)
    if not payload or name is None:
        return None
    return FAMILIES.get(payload[0], str(payload[0])), name.split(b"\0", 1)[0].decode(errors="replace")


async def watch(
    trigger: Callable[[int, int | None, frozenset[tuple[str, str]]], None],
    bound: Callable[[], None],
    rcvbuf: int = 1 << 20,
) -> None:
    """Call trigger(generation, pid of the committing process, the tables it touched) for every
    committed nf_tables transaction, until cancelled. An overflow of the socket raises
    OSError(ENOBUFS), as for rtnetlink."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        bound()
        loop = asyncio.get_running_loop()
        touched: set[tuple[str, str]] = set()
        while True:
            data = await loop.sock_recv(sock, 1 << 16)
            for kind, _flags, _seq, payload in messages(data):
                if kind == NEWGEN and (gen := generation_of(payload)) is not None:
                    trigger(gen, _u32(payload, NFTA_GEN_PROC_PID), frozenset(touched))
                    touched.clear()
                elif kind >> 8 == NFNL_SUBSYS_NFTABLES and (table := table_of(payload)) is not None:
                    touched.add(table)
    finally:
        sock.close()
