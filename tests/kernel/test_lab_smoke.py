"""The lab itself, with the router configured by hand (ip and iptables, not the daemon):
proof that the simulated ISP and its BR behave like the real ones before the daemon meets them."""

from __future__ import annotations

from tests.lab import traffic
from tests.lab.mapping import LabCE, map_prefix
from tests.lab.netns import call, sh
from tests.lab.topo import PPP_LOCAL, PPP_REMOTE, SERVER, Lab, wait_for


def router_by_hand(lab: Lab, ns: str, ce: LabCE, local: str, block: int = 0, snat: bool = True) -> None:
    """The seed recipe's commands: CE /128, ip6tnl to the BR, IPv4 /32, default route, SNAT."""
    sh(ns, "ip", "-6", "addr", "add", f"{local}/128", "dev", "wan0", "nodad", "noprefixroute")
    sh(ns, "ip", "link", "add", "mape0", "type", "ip6tnl", "mode", "ipip6", "local", local,
       "remote", lab.rule.br, "encaplimit", "none", "dev", "wan0")  # fmt: skip
    sh(ns, "ip", "link", "set", "mape0", "mtu", "1460", "up")
    sh(ns, "ip", "addr", "add", f"{ce.ipv4}/32", "dev", "mape0")
    sh(ns, "ip", "route", "add", "default", "dev", "mape0")
    if snat:
        lo, hi = ce.port_ranges()[block]
        rules = [
            f"-A POSTROUTING -o mape0 -p {p} -j SNAT --to-source {ce.ipv4}:{lo}-{hi}" for p in ("tcp", "udp", "icmp")
        ]
        sh(ns, "iptables-restore", "--noflush", input="*nat\n" + "\n".join(rules) + "\nCOMMIT\n")


def server_seen(lab: Lab, proto: str) -> list[dict]:
    return [e for e in traffic.read_log(lab.server_log) if e["proto"] == proto]


def test_lan_client_reaches_server_through_snat_tunnel_and_br(lab):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    router_by_hand(lab, lab.ce, ce, ce.ce_draft03, block=5)
    lo, hi = ce.port_ranges()[5]

    answers = call(lab.lan, traffic.tcp_sequential, SERVER, 5)
    assert all(a.split()[0] == ce.ipv4 and lo <= int(a.split()[1]) <= hi for a in answers), answers
    assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == ce.ipv4
    sh(lab.lan, "busybox", "ping", "-c", "2", "-W", "3", SERVER)

    for proto, count in (("tcp", 5), ("udp", 1), ("icmp", 2)):
        seen = wait_for(lambda p=proto, c=count: len(server_seen(lab, p)) >= c and server_seen(lab, p), 10, proto)
        assert {e["src"] for e in seen} == {ce.ipv4}
        assert all(lo <= e["sport"] <= hi for e in seen), (proto, seen)
    assert lab.br_dropped(chain) == 0


def test_br_counts_and_drops_out_of_set_source_ports(lab):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    router_by_hand(lab, lab.ce, ce, ce.ce_draft03, snat=False)
    other_psid_port = map_prefix(lab.rule, "2400:4050:1234:5700::/56").port_ranges()[0][0]
    for sport in (1000, other_psid_port):  # A = 0 (system ports), and a port of another PSID
        call(lab.ce, traffic.udp_from_port, SERVER, sport)
    wait_for(lambda: lab.br_dropped(chain) == 2, 10, "the BR to count two drops")
    in_set = ce.port_ranges()[3][0]
    call(lab.ce, traffic.udp_from_port, SERVER, in_set)
    seen = wait_for(lambda: server_seen(lab, "udp"), 10, "the in-set datagram")
    assert [e["sport"] for e in seen] == [in_set]
    assert lab.br_dropped(chain) == 2


def test_wrong_ce_address_gets_nothing_back(lab):
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    # The RFC 7597 layout where the BR expects draft-03: packets go out, nothing comes back.
    router_by_hand(lab, lab.ce, ce, ce.ce_rfc)
    assert call(lab.lan, traffic.tcp_sequential, SERVER, 1, 80, 3)[0].startswith("error")
    assert server_seen(lab, "tcp") == []


def test_br_sends_replies_to_the_ce_that_owns_the_port(lab):
    """Two CEs share one IPv4 with PSIDs 22 and 23: each must get only its own replies."""
    lab.add_ce2("2400:4050:1234:5700::/64")
    ce1, ce2 = lab.ce_params(), map_prefix(lab.rule, "2400:4050:1234:5700::/56")
    assert ce1.ipv4 == ce2.ipv4 and ce1.psid != ce2.psid
    lab.br_add_ce(ce1)
    lab.br_add_ce(ce2)
    router_by_hand(lab, lab.ce, ce1, ce1.ce_draft03)
    router_by_hand(lab, lab.ce2, ce2, ce2.ce_draft03)
    for ns, ce in ((lab.lan, ce1), (lab.ce2, ce2), (lab.lan, ce1)):
        answers = call(ns, traffic.tcp_sequential, SERVER, 3)
        assert all(not a.startswith("error") and int(a.split()[1]) in ce.ports() for a in answers), (ns, answers)


def test_renumbering_moves_the_wan_address(lab):
    old = wait_for(lambda: [a for a in lab.wan_addresses() if not a["tentative"]], 30, "SLAAC")[0]["address"]
    assert old.startswith("2400:4050:1234:5600:")
    lab.renumber("2400:4050:1234:5800::/64")

    def renumbered():
        addrs = {a["address"]: a for a in lab.wan_addresses()}
        new = [a for a in addrs.values() if a["address"].startswith("2400:4050:1234:5800:") and not a["deprecated"]]
        return new and addrs.get(old, {}).get("deprecated") and new

    assert wait_for(renumbered, 30, "the new prefix and the old one deprecated")


def test_pppoe_round_trip(lab):
    lab.start_pppoe()
    wait_for(lab.ppp_up, 60, "ppp0 with its IPv4 address")
    sh(lab.ce, "busybox", "ping", "-c", "1", "-W", "5", "-I", "ppp0", PPP_LOCAL)
    sh(lab.ce, "ip", "route", "add", SERVER, "dev", "ppp0")
    answer = call(lab.ce, traffic.tcp_sequential, SERVER, 1)[0]
    assert answer.split()[0] == PPP_REMOTE, answer
