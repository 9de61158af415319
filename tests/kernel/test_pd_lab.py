"""DHCPv6-PD lines (issue 20): Kea in the ISP delegates a prefix to dhcpcd on the router, whose WAN
has no global address of it; the daemon maps from the delegation (the client's unreachable route),
traffic crosses the strict BR in the set, and a new delegation moves the mapping. Behind a home
gateway (SLAAC on its LAN, a /60 delegated out of its /56) the mapping is the same as the /56's."""

from __future__ import annotations

from tests.kernel.conftest import running_lab
from tests.lab import checks, traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call, sh
from tests.lab.topo import SERVER, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n'
ACCESS = "2001:db8:ff:1::/64"  # the access link's own prefix: no rule maps it
PD_A, PD_B = "2400:4050:1234:5600::/56", "2400:4050:1234:9a00::/56"


def delegated(lab, prefix: str) -> bool:
    return f"unreachable {prefix}" in sh(lab.ce, "ip", "-6", "route", "show", "proto", "dhcp")


def client_state(lab) -> tuple[set[str], set[str]]:
    """What dhcpcd made: its routes and the LAN's addresses (ours must leave both alone), without
    the lifetimes its renewals move."""
    routes = {" ".join(r.split()[:3]) for r in sh(lab.ce, "ip", "-6", "route", "show", "proto", "dhcp").splitlines()}
    addrs = sh(lab.ce, "ip", "-6", "-o", "addr", "show", "dev", "lan0", "scope", "global").split()
    return routes, {addrs[i + 1] for i, w in enumerate(addrs) if w == "inet6"}


def test_a_pd_line_is_mapped_from_the_delegation_and_follows_a_new_one(tmp_path, request):
    with running_lab(tmp_path, request, wan_prefix=ACCESS, delegate=PD_A, slaac=False) as lab:
        lab.start_dhcpcd()
        wait_for(lambda: delegated(lab, PD_A), 90, "dhcpcd's delegation")
        assert lab.wan_addresses() == []  # no global address on the WAN: only the delegation
        ce = lab.ce_params(PD_A)
        chain = lab.br_add_ce(ce)
        before = client_state(lab)
        lan64 = "2400:4050:1234:5601::"  # dhcpcd numbered the LAN from the delegation
        assert before == ({f"unreachable {PD_A} dev", f"{lan64}/64 dev lan0"}, {f"{lan64}1/64"}), before
        d = Daemon(lab, tmp_path, CONFIG).start()
        try:
            wait_for(d.synced_by_me, 120, "the first sync")
            assert d.state()["prefix_from"] == f"the delegated prefix {PD_A} (DHCPv6-PD)"
            assert (d.state()["ipv4"], d.state()["psid"]) == (ce.ipv4, ce.psid)
            assert ce.ce_draft03 in sh(lab.ce, "ip", "-6", "addr", "show", "dev", "wan0")
            checks.data_path(lab, ce, chain)
            assert client_state(lab) == before  # dhcpcd's routes and LAN addresses untouched

            old = call(lab.lan, traffic.udp_query, SERVER)  # a flow of the old mapping in conntrack
            assert old.split()[0] == ce.ipv4
            lab.redelegate(PD_B)
            moved = lab.ce_params(PD_B)
            chain = lab.br_add_ce(moved)
            wait_for(lambda: d.state().get("ipv4") == moved.ipv4 and d.state().get("ok"), 120, "the new mapping")
            assert d.state()["prefix_from"] == f"the delegated prefix {PD_B} (DHCPv6-PD)"
            checks.data_path(lab, moved, chain)
            assert f"src={ce.ipv4}" not in sh(lab.ce, "conntrack", "-L", check=False)  # the old mapping's flows gone
            assert f"moved to {moved.ipv4} psid {moved.psid} (prefix {PD_B}" in d.text()
        finally:
            assert d.stop() == 0, d.text()


def test_behind_a_home_gateway_a_60_maps_as_its_56(tmp_path, request):
    """The gateway's LAN /64 by RA (SLAAC on the WAN) and a /60 delegated out of its /56: both
    give the /56's IPv4 and PSID, the delegation is named, and nothing is said to disagree."""
    with running_lab(tmp_path, request, delegate="2400:4050:1234:5610::/60") as lab:
        lab.start_dhcpcd()
        wait_for(lambda: delegated(lab, "2400:4050:1234:5610::/60"), 90, "dhcpcd's delegation")
        ce = lab.ce_params(PD_A)
        chain = lab.br_add_ce(ce)
        d = Daemon(lab, tmp_path, CONFIG).start()
        try:
            wait_for(d.synced_by_me, 120, "the first sync")
            assert (d.state()["ipv4"], d.state()["psid"], d.state()["prefix"]) == (ce.ipv4, ce.psid, PD_A)
            assert d.state()["prefix_from"] == "the delegated prefix 2400:4050:1234:5610::/60 (DHCPv6-PD)"
            checks.data_path(lab, ce, chain)
        finally:
            assert d.stop() == 0, d.text()
