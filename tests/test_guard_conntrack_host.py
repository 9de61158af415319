"""The guard table, the nftables backend's whole table, our nftables adapter and the conntrack
cleanups on this machine's own kernel, with real traffic through network namespaces (no tunnel
needed: our rules match the outgoing interface by name, so a veth named like the tunnel stands in
for it).

    client (10.77.0.2) --c0/r0-- router (SNAT, guard) --tnl0/s0-- server (198.51.100.2)
"""

from __future__ import annotations

import uuid
from collections import Counter
from ipaddress import IPv6Address

import pytest

from mape_daemon import desired, firewall, maprules
from mape_daemon.config import parse
from mape_daemon.kernel import conntrack, ctnetlink
from mape_daemon.kernel.netlink import Netlink
from mape_daemon.kernel.nftables import NftTable
from mape_daemon.kernel.rtnl import Reader
from mape_daemon.mapcalc import compute
from tests.hostns import inside
from tests.lab import traffic
from tests.lab.netns import call, sh, spawn

SERVER = "198.51.100.2"
CFG = parse('[wan]\ninterface = "wan0"\n[tunnel]\nname = "tnl0"\n[pppoe]\nhosts = ["10.77.0.55/32"]\n')


def params():
    a = IPv6Address("2400:4050:1234:5600::1")
    return compute(maprules.bundled().match(a), a)


P = params()  # 153.240.72.209, psid 22: ports 1376-1391, 2400-2415, ...
OTHER = IPv6Address("2400:4050:1234:5700::1")


@pytest.fixture(scope="module")
def topo():
    tag = uuid.uuid4().hex[:6]
    client, router, server = f"gc{tag}", f"gr{tag}", f"gs{tag}"
    pids = []
    try:
        for ns in (client, router, server):
            sh(None, "ip", "netns", "add", ns)
            sh(ns, "ip", "link", "set", "lo", "up")
        sh(None, "ip", "link", "add", "c0", "netns", client, "type", "veth", "peer", "r0", "netns", router)
        sh(None, "ip", "link", "add", "tnl0", "netns", router, "type", "veth", "peer", "s0", "netns", server)
        for ns, dev, addr in ((client, "c0", "10.77.0.2/24"), (router, "r0", "10.77.0.1/24"),
                              (router, "tnl0", f"{P.ipv4}/32"), (server, "s0", f"{SERVER}/24")):  # fmt: skip
            sh(ns, "ip", "addr", "add", addr, "dev", dev)
            sh(ns, "ip", "link", "set", dev, "up")
        sh(client, "ip", "addr", "add", "10.77.0.55/24", "dev", "c0")
        sh(client, "ip", "route", "add", "default", "via", "10.77.0.1")
        sh(router, "ip", "route", "add", "default", "dev", "tnl0")
        sh(server, "ip", "route", "add", f"{P.ipv4}/32", "dev", "s0")
        sh(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        pids.append(spawn(server, traffic.serve, f"/tmp/{server}.jsonl", SERVER))
        yield client, router, server
    finally:
        import os
        import signal

        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for ns in (client, router, server):
            sh(None, "ip", "netns", "del", ns, check=False)


def snat(router: str, on: bool) -> None:
    lo, hi = P.port_ranges[3]
    rules_ = "".join(f"-A POSTROUTING -o tnl0 -p {p} -j SNAT --to-source {P.ipv4}:{lo}-{hi}\n"
                     for p in ("tcp", "udp", "icmp")) if on else ""  # fmt: skip
    rules_ += "-A POSTROUTING -o ppp9 -j MASQUERADE\n"  # a user's rule: nat, and so conntrack, stays on
    sh(router, "iptables-nft-restore", input=f"*nat\n{rules_}COMMIT\n")
    sh(router, "conntrack", "-F", check=False)


def guard_drops(router: str) -> int:
    out = sh(router, "nft", "list", "chain", "ip", "mape", "tunnel-out")
    return sum(int(w.split()[0]) for w in out.split("counter packets")[1:])


def test_nft_table_is_replaced_whole_read_back_canonical_and_removed(topo):
    _, router, _ = topo
    script = desired.build(CFG, P).nft
    neighbour = compute(maprules.bundled().match(OTHER), OTHER)  # same rule, another PSID and set
    other = desired.build(CFG, neighbour).nft
    with inside(router):
        t = NftTable()
        t.replace(None)
        assert t.observe() is None
        t.replace(script)
        listed = t.observe()
        assert listed is not None and listed != script  # nft prints its own form (sets folded, sorted)
        assert t.expected(script) == listed  # learned: the next sync compares equal and writes nothing
        assert NftTable(dict(t.canonical)).expected(script) == listed  # kept across a restart via the record
        t.replace(script)
        assert t.observe() == listed
        # What was learned is nft's form of this script, not any listing: it holds this mapping's
        # source and every port range of its set, and nft reads it back as the same table.
        assert str(P.ipv4) in listed and all(f"{lo}-{hi}" in listed for lo, hi in P.port_ranges)
        t.replace(None)
        sh(router, "nft", "-f", "-", input=listed)
        assert t.observe() == listed
        # Another mapping in place: the sync that wants ours sees the difference (and the reverse).
        t.replace(other)
        assert t.observe() != listed and t.expected(script) != t.observe()
        assert t.expected(other) == t.observe() and t.expected(script) == listed
        t.replace(None)
        assert t.observe() is None


def test_guard_passes_what_snat_put_in_the_set_and_drops_the_rest(topo):
    client, router, _ = topo
    with inside(router):
        NftTable().replace(desired.build(CFG, P).nft)
    try:
        snat(router, True)
        lo, hi = P.port_ranges[3]
        answer = call(client, traffic.tcp_sequential, SERVER, 1)[0]
        assert answer.split()[0] == str(P.ipv4) and lo <= int(answer.split()[1]) <= hi, answer
        sh(client, "busybox", "ping", "-c", "1", "-W", "3", SERVER)  # ICMP ids are mapped into the set too
        assert guard_drops(router) == 0

        snat(router, False)  # our SNAT flushed (firewalld reload, iptables -F): nothing may leave wrong
        assert call(client, traffic.tcp_sequential, SERVER, 1, 80, 2)[0].startswith("error")
        assert call(client, traffic.udp_query, SERVER, 7, 1).startswith("error")
        assert guard_drops(router) >= 2
        # Dropped before conntrack confirmed them: no wrong mapping is left to outlive the repair.
        assert "10.77.0.2" not in sh(router, "conntrack", "-L", check=False)

        snat(router, True)  # a host that must use PPPoE never leaves by the tunnel, even SNATed
        assert call(client, traffic.tcp_sequential, SERVER, 1, 80, 2, "10.77.0.55")[0].startswith("error")
        assert call(client, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == str(P.ipv4)
    finally:
        with inside(router):
            NftTable().replace(None)


def test_conntrack_cleanup_deletes_exactly_the_stale_mappings(topo):
    client, router, _ = topo
    snat(router, True)
    for sport in (41000, 41001, 41002):
        call(client, traffic.udp_from_port, SERVER, sport)
    with inside(router):
        flows = conntrack.nat_flows(str(P.ipv4))
        lo, hi = P.port_ranges[3]
        assert len(flows) == 3 and all(f.protocol == "udp" and lo <= f.port <= hi for f in flows), flows
        assert {f.host for f in flows} == {"10.77.0.2"}  # the LAN host, for the busiest-hosts list
        # The set moved to other blocks (a new PSID on the same IPv4): all three are now outside it.
        assert conntrack.cleanup((), str(P.ipv4), P.port_ranges[:3], None) == 3
        assert conntrack.nat_flows(str(P.ipv4)) == []
    for sport in (41003, 41004):
        call(client, traffic.udp_from_port, SERVER, sport)
    with inside(router):
        assert conntrack.cleanup((), str(P.ipv4), P.port_ranges, None) == 0  # all in the set: kept
        # A port forward's connection: to the MAP IPv4, DNATed to the LAN host.
        sh(router, "conntrack", "-I", "-p", "tcp", "-s", SERVER, "-d", str(P.ipv4), "--sport", "5555", "--dport",
           "1377", "-r", "10.77.0.2", "-q", SERVER, "--reply-port-src", "22", "--reply-port-dst", "5555",
           "--state", "ESTABLISHED", "--timeout", "600")  # fmt: skip
        assert conntrack.cleanup((), str(P.ipv4), P.port_ranges, None) == 0  # still ours: kept
        assert conntrack.cleanup((str(P.ipv4),), None, (), None) == 3  # the IPv4 is no longer ours
    # Entries that left by the tunnel without any NAT (our SNAT was missing, the guard too).
    snat(router, False)
    call(client, traffic.udp_from_port, SERVER, 41005)
    with inside(router):
        assert conntrack.cleanup((), str(P.ipv4), P.port_ranges, None) == 0
        assert conntrack.cleanup((), str(P.ipv4), P.port_ranges, "tnl0") == 1
    assert "sport=41005" not in sh(router, "conntrack", "-L", check=False)


def test_sysctl_paths_take_interface_names_with_dots(topo):
    """Before: `br0.10` became /proc/sys/net/ipv4/conf/br0/10/rp_filter and every sync failed."""
    _, router, _ = topo
    sh(router, "ip", "link", "add", "br_lan-0.10", "type", "veth", "peer", "x0")
    try:
        sh(router, "sysctl", "-qw", "net.ipv4.conf.br_lan-0/10.rp_filter=1")  # sysctl(8) writes dots as /
        with inside(router):
            nl = Netlink()
            try:
                assert nl.rp_filter(["br_lan-0.10"])["br_lan-0.10"] == 1
                nl.set_rp_filter("br_lan-0.10", "2")
                assert nl.rp_filter(["br_lan-0.10"])["br_lan-0.10"] == 2
            finally:
                nl.close()
    finally:
        sh(router, "ip", "link", "del", "br_lan-0.10", check=False)


RANGES = desired.pool_ranges(P, ())
PORTS = frozenset(p for lo, hi in P.port_ranges for p in range(lo, hi + 1))


def native(cfg=CFG) -> str:
    state = desired.build(cfg, P, native=True)
    assert not state.chains and not state.jumps and state.nft is not None  # nothing in iptables
    return state.nft


def block_of(port: int) -> int:
    return next(i for i, (lo, hi) in enumerate(RANGES) if lo <= port <= hi)


def test_native_table_spreads_every_block_wins_over_a_masquerade_and_survives_iptables_flushes(topo):
    client, router, _ = topo
    sh(router, "conntrack", "-F", check=False)
    # A user's catch-all MASQUERADE in iptables-nft at srcnat: our chain (srcnat - 1) binds first.
    sh(router, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")
    with inside(router):
        t = NftTable()
        t.replace(native())
        listed = t.observe()
        assert listed is not None and t.expected(native()) == listed  # the next sync compares equal
    try:
        answers = call(client, traffic.tcp_sequential, SERVER, 2 * len(RANGES))
        assert all(a.split()[0] == str(P.ipv4) for a in answers), answers[:3]
        # numgen inc over the map: 2N connections use each of the N blocks exactly twice.
        assert Counter(block_of(int(a.split()[1])) for a in answers) == dict.fromkeys(range(len(RANGES)), 2)
        udp = call(client, traffic.udp_query, SERVER)
        assert udp.split()[0] == str(P.ipv4) and int(udp.split()[1]) in PORTS, udp
        sh(client, "busybox", "ping", "-c", "2", "-W", "3", SERVER)
        icmp = sh(router, "conntrack", "-L", "-p", "icmp", check=False)
        assert f"dst={P.ipv4}" in icmp  # ICMP ids are mapped too (the guard would drop them otherwise)

        # What firewalld and `iptables -F` do to the iptables tables does not reach our table.
        sh(router, "iptables-nft", "-t", "nat", "-F")
        sh(router, "iptables-nft", "-t", "mangle", "-F")
        with inside(router):
            assert t.observe() == listed
        answer = call(client, traffic.tcp_sequential, SERVER, 1)[0]
        assert answer.split()[0] == str(P.ipv4) and int(answer.split()[1]) in PORTS
    finally:
        sh(router, "iptables-nft", "-t", "nat", "-F")
        with inside(router):
            NftTable().replace(None)


def test_native_table_without_its_snat_drops_in_the_guard_and_reserved_ports_are_never_used(topo):
    client, router, server = topo
    with inside(router):
        t = NftTable()
        t.replace(native())
        sh(router, "nft", "flush", "chain", "ip", "mape", firewall.NAT_CHAIN)  # someone flushed our SNAT
        assert t.expected(native()) != t.observe()  # the next sync sees it and replaces the table
    # Fails closed: the guard drops the un-NATed packets, and the server never sees one of them.
    # (An error alone proves nothing: the server has no route back to the client anyway.)
    sh(server, "nft", "add table ip seen; add chain ip seen in { type filter hook prerouting priority -300; }; "
       "add rule ip seen in ip saddr 10.77.0.0/24 counter")  # fmt: skip
    dropped = guard_drops(router)
    try:
        assert call(client, traffic.tcp_sequential, SERVER, 1, 80, 2)[0].startswith("error")
        assert guard_drops(router) > dropped
        assert "packets 0 " in sh(server, "nft", "list", "chain", "ip", "seen", "in")
    finally:
        sh(server, "nft", "delete", "table", "ip", "seen")
    with inside(router):
        lo, hi = P.port_ranges[0]
        reserved = desired.build(CFG.model_copy(update={"snat": CFG.snat.model_copy(
            update={"reserved_ports": (f"{lo}-{hi}",)})}), P, native=True).nft  # fmt: skip
        assert reserved is not None
        t.replace(reserved)
    try:
        answers = call(client, traffic.tcp_sequential, SERVER, 2 * (len(RANGES) - 1))
        ports = [int(a.split()[1]) for a in answers]
        assert all(p in PORTS and not lo <= p <= hi for p in ports), answers[:3]
        assert len({block_of(p) for p in ports}) == len(RANGES) - 1
    finally:
        with inside(router):
            NftTable().replace(None)


def insert(router: str, proto: str, src: str, sport: int, reply_dst: str, reply_port: int) -> None:
    state = ["--state", "ESTABLISHED"] if proto == "tcp" else []
    sh(router, "conntrack", "-I", "-p", proto, "-s", src, "-d", SERVER, "--sport", str(sport), "--dport", "9",
       "-r", SERVER, "-q", reply_dst, "--reply-port-src", "9", "--reply-port-dst", str(reply_port), *state,
       "--timeout", "600")  # fmt: skip


def raw_dump_count(filtered: bool) -> int:
    """Entries the kernel sent for our request: the filter works in the kernel, not only here."""
    reader = Reader(ctnetlink.NETLINK_NETFILTER)
    try:
        return len(list(reader.dump(ctnetlink.CT_GET, ctnetlink.request(str(P.ipv4), filtered))))
    finally:
        reader.close()


def test_the_lean_conntrack_reading_equals_pyroute2s_and_is_filtered_by_the_kernel(topo):
    """nat_flows decodes ctnetlink itself (pyroute2's full decode costs 0.3 ms per entry): on
    enough entries for many receives, it reads exactly what pyroute2 reads, and the kernel sends
    only the entries NATed to the MAP IPv4."""
    from pyroute2.conntrack import Conntrack

    client, router, _ = topo
    snat(router, True)
    assert call(client, traffic.ping_once, SERVER, 4242, 1)  # a real ICMP flow: its id is the port
    ours = {("udp", 1024 + i, f"10.77.0.{2 + i % 7}") for i in range(400)}
    ours |= {("tcp", 5000 + i, f"10.77.0.{2 + i % 3}") for i in range(200)}
    for proto, port, host in ours:
        insert(router, proto, host, 20000 + port, str(P.ipv4), port)
    for i in range(150):  # NATed to another address, and not NATed at all: not ours
        insert(router, "udp", "10.77.0.9", 30000 + i, "192.0.2.1", 7000 + i)
        insert(router, "tcp", "10.77.0.9", 40000 + i, "10.77.0.9", 40000 + i)
    with inside(router):
        flows = {(f.protocol, f.port, f.host) for f in conntrack.nat_flows(str(P.ipv4))}
        icmp = {f for f in flows if f[0] == "icmp"}
        assert flows - icmp == ours and len(icmp) == 1 and next(iter(icmp))[2] == "10.77.0.2", flows - ours
        assert sorted(ctnetlink.dump(str(P.ipv4), filtered=False)) == sorted(ctnetlink.dump(str(P.ipv4)))
        with Conntrack() as ct:
            oracle = {(conntrack.PROTO_NAMES[e.tuple_orig.proto], conntrack._reply_port(e), e.tuple_orig.saddr)
                      for e in ct.dump_entries() if e.tuple_reply.daddr == str(P.ipv4)}  # fmt: skip
        assert flows == oracle
        assert raw_dump_count(True) == len(flows) < raw_dump_count(False) == len(flows) + 300
