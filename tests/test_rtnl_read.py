"""The raw rtnetlink reader against this machine's kernel (a fresh namespace): what `ip` puts in,
the reader gives back, field for field. (ip6tnl parameters are read in the lab VM's contract
tests: this kernel has no ip6tnl.)"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from mape_daemon.errors import RetryableError
from mape_daemon.kernel.netlink import Netlink
from mape_daemon.kernel.rtnl import RTM_GETROUTE, Reader
from mape_daemon.state import Route, RoutingRule
from tests.hostns import fresh_netns

CE = "2400:4050:1234:5600:99:f048:d100:1600"
SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def ns():
    with fresh_netns():
        ip("link", "add", "wan-0.10", "type", "veth", "peer", "name", "isp0")
        ip("link", "add", "br_lan", "type", "bridge")
        for dev in ("wan-0.10", "isp0", "br_lan"):
            ip("link", "set", dev, "up")
        ip("-6", "addr", "add", f"{SLAAC}/64", "dev", "wan-0.10", "nodad", "valid_lft", "7200", "preferred_lft", "3600")
        ip("-6", "addr", "add", f"{CE}/128", "dev", "wan-0.10", "nodad", "noprefixroute")
        ip("-6", "addr", "add", "2400:4050:1234:9a00::1/64", "dev", "wan-0.10", "nodad", "preferred_lft", "0")
        ip("addr", "add", "192.168.1.1/24", "dev", "br_lan")
        ip("route", "add", "default", "dev", "br_lan", "table", "10", "metric", "5", "proto", "203")
        ip("route", "add", "unreachable", "default", "table", "10", "metric", "4294967295", "proto", "203")
        ip("route", "add", "10.9.0.0/16", "dev", "br_lan", "proto", "static", "metric", "20")
        ip("-6", "route", "add", "2001:db8::/32", "dev", "wan-0.10", "proto", "203", "metric", "7")
        ip("rule", "add", "fwmark", "0x3e8/0xffff", "lookup", "10", "priority", "5000", "proto", "203")
        ip("rule", "add", "fwmark", "0x3e8/0xffff", "lookup", "main", "suppress_prefixlength", "0", "priority", "4999",
           "proto", "203")  # fmt: skip
        ip("rule", "add", "fwmark", "0x7", "lookup", "100", "priority", "6000")
        yield


def test_links_and_addresses_read_back_as_ip_shows_them(ns):
    nl = Netlink()
    try:
        links = nl.links()
        shown = {link["ifname"]: link for link in json.loads(ip("-d", "-j", "link", "show"))}
        assert {name: index for name, (index, _) in links.items()} == {n: v["ifindex"] for n, v in shown.items()}
        assert links["br_lan"][1] == "bridge" and links["isp0"][1] == "veth" and links["lo"][1] == ""

        wan = {a.address: a for a in nl.wan_addresses(links["wan-0.10"][0])}
        assert set(wan) == {SLAAC, CE, "2400:4050:1234:9a00::1"}  # global scope only: no fe80::
        assert wan[SLAAC].prefixlen == 64 and wan[SLAAC].preferred_lft == 3600 and not wan[SLAAC].deprecated
        assert wan[CE].ours_shape and wan[CE].prefixlen == 128 and not wan[SLAAC].ours_shape
        assert wan["2400:4050:1234:9a00::1"].deprecated
        assert [a.address for a in nl.addresses("br_lan", links["br_lan"][0], 4)] == ["192.168.1.1"]
    finally:
        nl.close()


def test_routes_and_rules_ours_by_protocol_and_the_others_where_asked(ns):
    nl = Netlink()
    try:
        ours, foreign = nl.routes(frozenset({254, 10}))
        assert set(ours) == {
            Route("default", "br_lan", 10, 5),
            Route("default", "", 10, 4294967295, kind="unreachable"),
            Route("2001:db8::/32", "wan-0.10", 254, 7, family=6),
        }
        assert Route("10.9.0.0/16", "br_lan", 254, 20) in foreign
        assert Route("192.168.1.0/24", "br_lan", 254, 0) in foreign  # the kernel's prefix route
        rules, others = nl.rules()
        assert set(rules) == {RoutingRule(5000, 0x3E8, 0xFFFF, 10), RoutingRule(4999, 0x3E8, 0xFFFF, 254, 0)}
        assert others == [RoutingRule(6000, 0x7, 0xFFFFFFFF, 100)]
    finally:
        nl.close()


def test_a_delegation_is_read_from_the_dhcpv6_clients_unreachable_route_and_nothing_else(ns):
    """What networkd and dhcpcd leave for a delegated /56 or /60: `unreachable <prefix> dev lo
    proto dhcp`. Not a delegation: the same route of another protocol, a /64 (no client blocks
    one), a reachable dhcp route, an IPv4 unreachable route."""
    ip("-6", "route", "add", "unreachable", "2400:4050:1234:5600::/56", "proto", "dhcp", "metric", "1024")
    ip("-6", "route", "add", "unreachable", "240b:10:1234:5670::/60", "proto", "dhcp", "table", "100")
    ip("-6", "route", "add", "unreachable", "2400:4050:aaaa:bb00::/56", "proto", "static")
    ip("-6", "route", "add", "unreachable", "2400:4050:aaaa:cc00::/64", "proto", "dhcp")
    ip("-6", "route", "add", "2400:4050:aaaa:dd00::/56", "dev", "br_lan", "proto", "dhcp")
    ip("route", "add", "unreachable", "10.99.0.0/16", "proto", "dhcp")
    nl = Netlink()
    try:
        got = {(d.address, d.prefixlen, d.origin) for d in nl.delegations()}
        assert got == {("2400:4050:1234:5600::", 56, "pd"), ("240b:10:1234:5670::", 60, "pd")}
    finally:
        nl.close()


def test_a_dump_that_fails_is_an_error_to_retry_not_an_empty_answer(ns):
    r = Reader()
    r.sock.setsockopt(270, 12, 1)  # SOL_NETLINK, NETLINK_GET_STRICT_CHK: a short header is refused
    try:
        with pytest.raises(RetryableError, match="Invalid argument"):
            list(r.dump(RTM_GETROUTE, b"\x00"))
        assert r.routes(socket.AF_INET)  # the socket still works after it
    finally:
        r.close()


def test_routes_of_other_tables_and_protocols_are_filtered_by_the_kernel_not_read():
    """Before: every sync dumped every route of every table in both families; a router with a
    large routing table of another program's (a BGP feed) paid for all of it each time."""
    from mape_daemon.kernel import rtnl

    with fresh_netns():
        subprocess.run(["ip", "link", "add", "a0", "type", "veth", "peer", "name", "a1"], check=True)
        subprocess.run(["ip", "link", "set", "a0", "up"], check=True)
        batch = "".join(f"route add 10.{i // 256}.{i % 256}.0/24 dev a0 table 100 proto bird\n" for i in range(5000))
        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
        subprocess.run(["ip", "route", "add", "198.18.0.0/24", "dev", "a0", "table", "10", "proto", "203"], check=True)
        subprocess.run(
            ["ip", "route", "add", "198.18.1.0/24", "dev", "a0", "table", "10", "proto", "static"], check=True
        )
        subprocess.run(["ip", "route", "add", "198.18.2.0/24", "dev", "a0", "table", "1000", "proto", "static"],
                       check=True)  # fmt: skip
        nl = Netlink()
        read = []
        real = rtnl.Reader.dump

        def counting(self, kind, body, nothing=()):
            payloads = list(real(self, kind, body, nothing))
            if kind == RTM_GETROUTE:
                read.extend(payloads)
            return iter(payloads)

        try:
            rtnl.Reader.dump = counting
            ours, foreign = nl.routes(frozenset({254, 10, 1000, 77}))  # 77: no route, so no table (ENOENT)
        finally:
            rtnl.Reader.dump = real
            nl.close()
        assert [r.dst for r in ours] == ["198.18.0.0/24"]
        assert sorted(r.dst for r in foreign) == ["198.18.1.0/24", "198.18.2.0/24"]  # table 1000: RTA_TABLE
        assert len(read) < 20, len(read)  # the kernel sent what we asked for, not the 5000 routes of table 100
