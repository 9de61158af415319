"""The egress guard in this machine's kernel: put on a TUN device's tc egress hook (a device
without a link-layer header, as the ip6tnl is), read back over netlink, and shown real packets
sent through it; the TUN's file descriptor tells which left. (The lab VM runs it on the ip6tnl.)"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess

import pytest

from mape_daemon import egress
from mape_daemon.kernel import tc
from mape_daemon.kernel.rtnl import Reader
from mape_daemon.state import EgressGuard
from tests.hostns import fresh_netns
from tests.test_egress_guard import MAPPINGS, echo, ipv4, l4

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
P = MAPPINGS["ocn"]


def tun() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tun0", IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", "tun0", "up"], check=True)
    subprocess.run(["ip", "route", "add", "203.0.113.0/24", "dev", "tun0"], check=True)
    return fd


def passes(fd: int, raw: socket.socket, packet: bytes) -> bool:
    """Send `packet`, then a marker that always passes; did `packet` come out before it?"""
    marker = ipv4(str(P.ipv4), 17, l4(P.port_ranges[0][0]) + b"marker")
    for p in (packet, marker):
        raw.sendto(p, ("203.0.113.10", 0))
    seen = []
    while True:
        if not select.select([fd], [], [], 5)[0]:
            raise AssertionError("the marker did not come out")
        out = os.read(fd, 65535)
        if out.endswith(b"marker"):
            return bool(seen)
        seen.append(out)


@pytest.fixture
def netns():
    with fresh_netns():
        fd = tun()
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            yield fd, raw
        finally:
            raw.close()
            os.close(fd)


def test_the_guard_loads_reads_back_and_drops_in_the_kernel_what_the_program_says(netns):
    fd, raw = netns
    guard = EgressGuard("tun0", egress.bytecode(egress.program(P, ("tcp", "udp", "icmp"))))
    reader = Reader()
    index = socket.if_nametoindex("tun0")
    try:
        assert tc.observe(reader, "tun0", index) is None
        tc.put(guard)
        assert tc.observe(reader, "tun0", index) == guard  # read back as written: a second sync is a no-op
        tc.put(guard)  # again (a retry): still one filter, the same
        assert tc.observe(reader, "tun0", index) == guard

        ours = str(P.ipv4)
        in_set = sorted({p for lo, hi in P.port_ranges for p in range(lo, hi + 1)})
        outside = [p for p in (1, 1024, 1375, 1392, 2399, 2416, 40000, 65535) if p not in in_set]
        for port in [*in_set[::37], in_set[0], in_set[-1]]:
            assert passes(fd, raw, ipv4(ours, 6, l4(port))), port
            assert passes(fd, raw, ipv4(ours, 1, echo(8, port))), port
        for port in outside:
            assert not passes(fd, raw, ipv4(ours, 17, l4(port))), port
            assert not passes(fd, raw, ipv4(ours, 1, echo(8, port))), port
        assert not passes(fd, raw, ipv4("192.168.1.10", 6, l4(in_set[0])))  # un-NATed (a flushed SNAT)
        assert passes(fd, raw, ipv4(ours, 1, echo(3, 0)))  # an ICMP error
        assert passes(fd, raw, ipv4(ours, 17, b"fragment", frag=185))  # a later fragment
        assert not passes(fd, raw, ipv4(ours, 47, l4(in_set[0])))  # GRE
        assert passes(fd, raw, ipv4(ours, 6, l4(in_set[3]), options=b"\x01\x01\x01\x00"))  # IPv4 options

        tc.remove(guard)
        assert tc.observe(reader, "tun0", index) is None
        assert passes(fd, raw, ipv4("192.168.1.10", 6, l4(in_set[0])))  # it was the guard that dropped it
        tc.remove(guard)  # removing what is gone is no error
    finally:
        reader.close()
