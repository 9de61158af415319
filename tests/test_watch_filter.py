"""The address-refresh filter: lifetime refreshes are no news, flag changes and removals are.
Raw messages as the kernel packs them; the last test reads a real kernel's events."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv6Address

from mape_daemon.kernel.watch import (
    IFA_ADDRESS,
    IFA_CACHEINFO,
    IFA_FLAGS,
    RTM_DELADDR,
    RTM_NEWADDR,
    AddressRefreshFilter,
    subscribe,
    watch,
)
from tests.hostns import fresh_netns

RTM_NEWLINK = 16


def attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def addr(address: str, flags: int = 0, preferred: int = 3600) -> bytes:
    return (struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2) + attr(IFA_ADDRESS, IPv6Address(address).packed)
            + attr(IFA_FLAGS, struct.pack("=I", flags))
            + attr(IFA_CACHEINFO, struct.pack("=IIII", preferred, 7200, 0, 0)))  # fmt: skip


def test_refreshes_are_dropped_changes_pass():
    f = AddressRefreshFilter()
    a = "2400:4050:1234:5600::1"
    assert f.is_news(RTM_NEWADDR, addr(a, flags=0x40))  # new, tentative
    assert f.is_news(RTM_NEWADDR, addr(a))  # DAD done
    assert not f.is_news(RTM_NEWADDR, addr(a, preferred=3000))  # an RA refreshed the lifetimes
    assert f.is_news(RTM_NEWADDR, addr(a, preferred=0))  # deprecated by renumbering
    assert not f.is_news(RTM_NEWADDR, addr(a, preferred=0))
    assert f.is_news(RTM_DELADDR, addr(a, preferred=0))
    assert f.is_news(RTM_NEWADDR, addr(a))  # back again
    assert f.is_news(RTM_NEWADDR, addr("2400:4050:1234:5600::2"))  # another address is news


def test_other_events_always_pass():
    f = AddressRefreshFilter()
    assert f.is_news(RTM_NEWLINK, addr("2400::1")) and f.is_news(RTM_NEWLINK, addr("2400::1"))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def wan_netns() -> Iterator[None]:
    """A fresh namespace on this machine's kernel with an up veth `wan0`."""
    with fresh_netns():
        ip("link", "add", "wan0", "type", "veth", "peer", "name", "wan1")
        ip("link", "set", "wan0", "up")
        yield


def drain(sock: socket.socket) -> list[int]:
    """The address message types waiting on a non-blocking netlink socket (routes and links
    come too, and always pass)."""
    kinds = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return [k for k in kinds if k in (RTM_NEWADDR, RTM_DELADDR)]
        kinds.append(struct.unpack_from("=H", data, 4)[0])


def unfiltered() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    sock.bind((0, 0x100))  # RTMGRP_IPV6_IFADDR, no filter
    return sock


def announced(raw: socket.socket) -> list[int]:
    """Wait until the kernel has announced this step's address event (it sends some from a
    workqueue, after `ip` returned); every listener got it in the same broadcast."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if select.select([raw], [], [], 0.5)[0] and (kinds := drain(raw)):
            return kinds
    raise AssertionError("the kernel announced nothing")


MARKER_ROUTE = 24  # RTM_NEWROUTE: the local route that comes with an IPv4 address


def test_a_real_kernel_lifetime_refresh_is_dropped_and_a_removal_is_not():
    with wan_netns():
        seen: list[int] = []
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        task = loop.create_task(watch(seen.append, ready.set))
        runner = threading.Thread(target=lambda: loop.run_until_complete(asyncio.wait([task])), daemon=True)
        runner.start()
        assert ready.wait(10)
        raw = unfiltered()
        markers: list[str] = []

        def step(*args: str, passes: int | None) -> None:
            """Run `ip`, then: the watcher triggers on `passes`, or (None) on nothing at all."""
            seen.clear()
            ip(*args)
            assert announced(raw)
            if passes is None:
                # A marker that passes (an IPv4 address, kept: its removal would be an event too):
                # once its trigger is seen, the event before it has been read and dropped.
                markers.append(f"192.0.2.{len(markers) + 1}/32")
                ip("addr", "add", markers[-1], "dev", "wan0")
                deadline = time.monotonic() + 10
                while MARKER_ROUTE not in seen and time.monotonic() < deadline:  # its local route, after it
                    time.sleep(0.05)
                assert seen.count(RTM_NEWADDR) == 1, seen  # the marker's, and none for the step
            else:
                deadline = time.monotonic() + 10
                while passes not in seen and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert passes in seen

        a = "2400:4050:1234:5600::1/64"
        step("-6", "addr", "add", a, "dev", "wan0", "nodad", "valid_lft", "7200", "preferred_lft", "3600",
             passes=RTM_NEWADDR)  # fmt: skip
        time.sleep(0.05)  # the update stamp counts hundredths of a second
        # What an RA's refresh looks like: announced by the kernel, no trigger.
        step("-6", "addr", "change", a, "dev", "wan0", "nodad", "valid_lft", "7000", "preferred_lft", "3000",
             passes=None)  # fmt: skip
        step(
            "-6",
            "addr",
            "change",
            a,
            "dev",
            "wan0",
            "nodad",
            "valid_lft",
            "7000",
            "preferred_lft",
            "0",
            passes=RTM_NEWADDR,
        )  # fmt: skip  (deprecated: news)
        step("-6", "addr", "del", a, "dev", "wan0", passes=RTM_DELADDR)
        raw.close()
        loop.call_soon_threadsafe(task.cancel)
        runner.join(10)


def test_the_kernel_drops_refreshes_before_they_wake_us_and_passes_the_rest():
    with wan_netns():
        filtered, raw = subscribe(), unfiltered()
        a, lft = "2400:4050:1234:5600::1/64", ("valid_lft", "7200", "preferred_lft", "3600")
        ip("-6", "addr", "add", a, "dev", "wan0", "nodad", *lft)
        assert announced(raw) == [RTM_NEWADDR] and drain(filtered) == [RTM_NEWADDR]  # new: its stamps are equal
        time.sleep(0.05)  # the update stamp counts hundredths of a second
        ip("-6", "addr", "change", a, "dev", "wan0", "nodad", "valid_lft", "7000", "preferred_lft", "3000")
        assert announced(raw) == [RTM_NEWADDR] and drain(filtered) == []  # a refresh: stopped in the kernel
        ip("-6", "addr", "change", a, "dev", "wan0", "nodad", "valid_lft", "7000", "preferred_lft", "0")
        assert announced(raw) == [RTM_NEWADDR] and drain(filtered) == [RTM_NEWADDR]  # deprecated
        ip("-6", "addr", "del", a, "dev", "wan0")
        assert announced(raw) == [RTM_DELADDR] and drain(filtered) == [RTM_DELADDR]
        ip("addr", "add", "192.0.2.1/24", "dev", "wan0")  # IPv4, links and routes: never filtered
        ip("addr", "change", "192.0.2.1/24", "dev", "wan0", "valid_lft", "100", "preferred_lft", "100")
        ip("link", "set", "wan0", "mtu", "1400")
        assert drain(filtered).count(RTM_NEWADDR) == 2
        filtered.close()
        raw.close()
