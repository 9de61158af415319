"""Where the prefix comes from: a DHCPv6-PD delegation, the WAN's SLAAC addresses, or both, on the
fake kernel (the delegation as the DHCP client's unreachable route; tests/test_rtnl_read.py reads
that route from this machine's kernel, and the lab maps from a real Kea delegation)."""

from __future__ import annotations

import pytest

from mape_daemon.config import parse
from mape_daemon.prefix import source_text
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.report import describe
from tests.fake_kernel import FakeKernel

BASE = '[wan]\ninterface = "wan0"\n'
PD_A = "2400:4050:1234:5600::/56"  # 153.240.72.209 psid 22
PD_A60 = "2400:4050:1234:5610::/60"  # a home gateway's second /60 out of PD_A: the same 56 bits
PD_B = "2400:4050:1234:9a00::/56"  # 153.240.72.210
SLAAC_A = "2400:4050:1234:5600:5054:ff:fe12:3456"
SLAAC_B = "2400:4050:1234:9a00:5054:ff:fe12:3456"


def make(tmp_path, prefix_from: str = "auto", hold_down: int = 0):
    k = FakeKernel(("wan0", "lan0"))
    cfg = parse(BASE + f'prefix_from = "{prefix_from}"\n[daemon]\nhold_down = {hold_down}\n')
    return k, Reconciler(cfg, k, RecordFile(tmp_path / "state"))


def start_line(result) -> str:
    return " | ".join(line.text for line in describe(result, "start"))


def test_a_line_with_only_a_delegation_is_mapped_from_it_and_the_ce_address_goes_on_the_wan(tmp_path):
    """Before: no global address on the WAN meant MAP-E off, whatever was delegated."""
    k, r = make(tmp_path)
    k.delegate(PD_A)
    result = r.sync()
    assert result.ok and (str(result.params.ipv4), result.params.psid) == ("153.240.72.209", 22)
    assert result.selection.source.origin == "pd"
    assert "(prefix 2400:4050:1234:5600::/56 from the delegated prefix 2400:4050:1234:5600::/56 (DHCPv6-PD))" in (
        start_line(result)
    )
    assert k.ce_addrs == {("wan0", str(result.params.ce_ipv6))}  # on the WAN, as a MAP-E CE puts it
    assert r.sync().writes == 0


@pytest.mark.parametrize("slaac_too", [False, True])
def test_a_60_from_a_home_gateway_maps_as_its_56_and_agrees_with_slaac(tmp_path, slaac_too):
    k, r = make(tmp_path)
    k.delegate(PD_A60)
    if slaac_too:
        k.slaac(SLAAC_A)  # the gateway's LAN /64 by RA: the same first 56 bits
    result = r.sync()
    assert (str(result.params.ipv4), result.params.psid) == ("153.240.72.209", 22)
    assert result.selection.source.origin == "pd" and not result.selection.passed_over
    assert "not used" not in start_line(result)


def test_sources_that_disagree_the_delegation_wins_under_auto_and_the_other_is_said(tmp_path):
    k, r = make(tmp_path)
    k.delegate(PD_B)
    k.slaac(SLAAC_A)
    result = r.sync()
    assert str(result.params.ipv4) == "153.240.72.210"
    assert "not used: 2400:4050:1234:5600:5054:ff:fe12:3456 (the WAN's address) maps to 2400:4050:1234:5600::/56" in (
        start_line(result)
    )
    k2, slaac_only = make(tmp_path / "slaac", "slaac")
    k2.delegate(PD_B)
    k2.slaac(SLAAC_A)
    assert str(slaac_only.sync().params.ipv4) == "153.240.72.209"
    k3, pd_only = make(tmp_path / "pd", "pd")
    k3.slaac(SLAAC_A)
    nothing = pd_only.sync()
    assert nothing.params is None and nothing.selection.reason == "no delegated prefix (no DHCPv6-PD route)"


def test_a_new_delegation_moves_the_mapping_as_renumbering_does(tmp_path):
    k, r = make(tmp_path)
    k.delegate(PD_A)
    assert r.sync().ok
    k.delegate(PD_B)
    result = r.sync()
    assert result.ok and str(result.params.ipv4) == "153.240.72.210"
    (cleanup,) = k.cleanups
    assert cleanup.drop_ipv4 == ("153.240.72.209",) and cleanup.ipv4 == "153.240.72.210"
    assert next(line.event for line in describe(result, "event")) == "prefix-change"
    assert [a for _, a in k.ce_addrs] == [str(result.params.ce_ipv6)]  # the old CE /128 is gone


def test_a_lost_delegation_is_held_then_let_go(tmp_path):
    clock = [1000.0]
    k = FakeKernel(("wan0", "lan0"))
    cfg = parse(BASE + "[daemon]\nhold_down = 10\n")
    r = Reconciler(cfg, k, RecordFile(tmp_path / "state"), clock=lambda: clock[0])
    k.delegate(PD_A)
    assert r.sync().ok
    k.delegate(None)  # the client lost its lease (or restarts): its route is gone
    held = r.sync()
    assert held.selection.held and k.tunnels and held.writes == 0
    k.delegate(PD_A)  # back within the hold-down: nothing changes
    assert r.sync().writes == 0
    k.delegate(None)
    r.sync()
    clock[0] += 11
    gone = r.sync()
    assert gone.params is None and not k.tunnels and "no delegated prefix" in gone.selection.reason


def test_status_says_where_the_prefix_came_from(tmp_path):
    k, r = make(tmp_path)
    k.delegate(PD_B)
    k.slaac(SLAAC_A)
    text = source_text(r.sync().selection)
    assert text == (
        "the delegated prefix 2400:4050:1234:9a00::/56 (DHCPv6-PD); not used: "
        "2400:4050:1234:5600:5054:ff:fe12:3456 (the WAN's address) maps to 2400:4050:1234:5600::/56"
    )
