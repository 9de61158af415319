"""The tunnel's egress guard (a classic BPF program on tc egress): its verdict for every port of
the 16-bit space against the port set mapcalc gives, for several rules; the interpreter here
runs the same instructions the kernel runs, and tests/test_egress_guard_host.py loads them into
this machine's kernel and sends real packets through them."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from mape_daemon import egress, maprules
from mape_daemon.mapcalc import IidLayout, MapRule, compute

OK, SHOT = egress.TC_ACT_OK, egress.TC_ACT_SHOT


def params(address: str, rule: MapRule | None = None, psid: int | None = None):
    a = IPv6Address(address)
    return compute(rule or maprules.bundled().match(a), a, psid=psid)


MAPPINGS = {
    "ocn": params("2400:4050:1234:5600::1"),  # a = 6, k = 6: 63 blocks of 16
    "v6plus": params("240b:10:2a40:5600::1"),  # a = 4, k = 8: 15 blocks of 16
    "offset0": params(
        "2001:db8:12:3400::1",
        MapRule(
            IPv6Network("2001:db8::/32"),
            IPv4Network("192.0.2.0/24"),
            ea_len=12,
            psid_offset=0,
            br=None,
            iid=IidLayout.RFC7597,
        ),
    ),
}


def ipv4(src: str, proto: int, payload: bytes, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0, IPv4Address(src).packed,
                       IPv4Address("203.0.113.10").packed)  # fmt: skip
    return head + options + payload


def l4(sport: int) -> bytes:
    return struct.pack("!HHII", sport, 80, 0, 0)


def echo(kind: int, ident: int) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, ident, 1)


@pytest.mark.parametrize("line", list(MAPPINGS))
def test_every_port_and_echo_id_passes_exactly_when_it_is_in_the_set(line):
    p = MAPPINGS[line]
    prog = egress.program(p, ("tcp", "udp", "icmp"))
    ours = str(p.ipv4)
    in_set = {port for lo, hi in p.port_ranges for port in range(lo, hi + 1)}
    assert len(in_set) == p.ports
    for port in range(65536):
        want = OK if port in in_set else SHOT
        assert egress.run(prog, ipv4(ours, 6, l4(port))) == want, ("tcp", port)
        assert egress.run(prog, ipv4(ours, 17, l4(port))) == want, ("udp", port)
        assert egress.run(prog, ipv4(ours, 1, echo(8, port))) == want, ("echo", port)
    port = min(in_set)
    assert egress.run(prog, ipv4(ours, 1, echo(0, port))) == OK  # an echo reply from the router
    assert egress.run(prog, ipv4(ours, 6, l4(port), options=b"\x01\x01\x01\x00")) == OK  # IPv4 options
    assert egress.run(prog, ipv4("192.168.1.10", 6, l4(port))) == SHOT  # un-NATed: a flushed SNAT
    assert egress.run(prog, ipv4(str(IPv4Address(ours) + 1), 17, l4(port))) == SHOT  # another subscriber's address


def test_icmp_errors_and_later_fragments_pass_with_our_source_and_the_rest_is_dropped():
    p = MAPPINGS["ocn"]
    prog = egress.program(p, ("tcp", "udp", "icmp"))
    ours = str(p.ipv4)
    for kind in (3, 11, 12):  # about a flow: they carry no id of their own
        assert egress.run(prog, ipv4(ours, 1, echo(kind, 1))) == OK
        assert egress.run(prog, ipv4("192.168.1.10", 1, echo(kind, 1))) == SHOT
    assert egress.run(prog, ipv4(ours, 1, echo(13, min(p.port_ranges)[0]))) == SHOT  # timestamp: not SNATed
    assert egress.run(prog, ipv4(ours, 17, b"payload!", frag=185)) == OK  # a later fragment has no ports
    assert egress.run(prog, ipv4("192.168.1.10", 17, b"payload!", frag=185)) == SHOT
    assert egress.run(prog, ipv4(ours, 17, l4(1), frag=0x2000)) == SHOT  # the first one has them: checked
    for proto in (47, 50, 132):  # GRE, ESP, SCTP: no ports MAP-E can carry
        assert egress.run(prog, ipv4(ours, proto, l4(min(p.port_ranges)[0]))) == SHOT
    assert egress.run(prog, ipv4(ours, 6, b"\x05")) == SHOT  # truncated: a load past the end would pass it


def test_protocols_not_snated_are_dropped_even_with_a_port_of_the_set():
    p = MAPPINGS["ocn"]
    port = p.port_ranges[0][0]
    tcp_udp = egress.program(p, ("tcp", "udp"))
    assert egress.run(tcp_udp, ipv4(str(p.ipv4), 1, echo(8, port))) == SHOT
    assert egress.run(tcp_udp, ipv4(str(p.ipv4), 17, l4(port))) == OK
    tcp = egress.program(p, ("tcp",))
    assert egress.run(tcp, ipv4(str(p.ipv4), 17, l4(port))) == SHOT


def test_the_program_is_a_few_instructions_whatever_the_number_of_blocks():
    assert all(len(egress.program(p, ("tcp", "udp", "icmp"))) <= 32 for p in MAPPINGS.values())
    text = egress.bytecode(egress.program(MAPPINGS["ocn"], ("tcp",)))
    count, _, rest = text.partition(",")
    assert int(count) == len(rest.split(","))  # tc's `N,code jt jf k,...`
