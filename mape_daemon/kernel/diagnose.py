"""Read-only probes for `mape-daemon doctor`: sysctls, a link's packet counters, an ICMPv6 echo
from a chosen source address, a TCP connection. Nothing here changes the system."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from pathlib import Path

ECHO_REQUEST6, ECHO_REPLY6 = 128, 129


def sysctl(*path: str) -> str | None:
    """/proc/sys/<path...> (parts, so an interface name with a dot stays one level), or None."""
    try:
        return Path("/proc/sys", *path).read_text().strip()
    except OSError:
        return None


def counters(ifname: str) -> tuple[int, int] | None:
    """(tx, rx) packets of a link, or None when it does not exist."""
    base = Path("/sys/class/net", ifname, "statistics")
    try:
        return int((base / "tx_packets").read_text()), int((base / "rx_packets").read_text())
    except (OSError, ValueError):
        return None


def mtu(ifname: str) -> int | None:
    try:
        return int(Path("/sys/class/net", ifname, "mtu").read_text())
    except (OSError, ValueError):
        return None


def echo6(src: str, dst: str, timeout: float = 2.0) -> float | None:
    """An ICMPv6 echo from `src` to `dst`: the round trip in seconds, or None without an answer."""
    ident = os.getpid() & 0xFFFF
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.bind((src, 0))
            t0 = time.monotonic()
            # The kernel fills in the checksum of an ICMPv6 raw socket's packets.
            s.sendto(struct.pack("!BBHHH", ECHO_REQUEST6, 0, 0, ident, 1) + b"mape-daemon doctor", (dst, 0))
            while (left := t0 + timeout - time.monotonic()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                data, addr = s.recvfrom(2048)
                if (len(data) >= 6 and data[0] == ECHO_REPLY6 and struct.unpack_from("!H", data, 4)[0] == ident
                        and addr[0] == dst):  # fmt: skip
                    return time.monotonic() - t0
    except OSError:
        return None
    return None


def connect(host: str, port: int, timeout: float = 5.0) -> str:
    """A TCP connection to host:port: "" when it was accepted, else what went wrong."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as e:
        return e.strerror or str(e)
