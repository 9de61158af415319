"""The reconciler's logic against the stateful fake kernel: converge, no-op, drift, renumbering,
teardown, and foreign state left alone."""

from __future__ import annotations

from mape_daemon.config import parse
from mape_daemon.reconciler import Reconciler
from mape_daemon.state import Jump
from tests.fake_kernel import FakeKernel

CFG = parse('[wan]\ninterface = "wan0"\n[pppoe]\nlan_interfaces = ["lan0"]\nhosts = ["192.168.1.55/32"]\n')
SLAAC_A = "2400:4050:1234:5600:5054:ff:fe12:3456"
SLAAC_B = "2400:4050:1234:9a00:5054:ff:fe12:3456"  # another IPv4 (153.240.72.210)


def converged(links=("wan0", "lan0", "ppp0")):
    k = FakeKernel(links)
    k.slaac(SLAAC_A)
    r = Reconciler(CFG, k)
    first = r.sync()
    assert first.ok, first.error
    return k, r


def test_own_ce_address_is_never_taken_as_the_wan_prefix():
    k, r = converged()
    k.drop_slaac()  # only our CE /128 is left on the WAN
    result = r.sync()
    assert result.params is None and "no global IPv6 address" in result.selection.reason
    assert not k.tunnels and not k.chains


def test_renumbering_moves_everything_and_forgets_old_connections():
    k, r = converged()
    k.deprecate_all()
    k.slaac(SLAAC_B)
    result = r.sync()
    assert result.ok
    assert str(result.params.ipv4) != "153.240.72.209"
    assert k.tunnels["ip6tnl1"].local.startswith("2400:4050:1234:9a00:")
    ours_v6 = [w.address for w in k.wan_addrs if w.ours_shape]
    assert ours_v6 == [k.tunnels["ip6tnl1"].local]  # the old CE /128 is gone
    assert k.flushed == ["153.240.72.209"]
    assert f"{result.params.ipv4}:" in k.chains[("nat", "MAPE-SNAT-TCP")][0]
    assert r.sync().writes == 0


def test_firewall_drift_is_repaired_and_only_the_drift():
    k, r = converged()
    cases = [  # the contract (tests/reconciler_contract.py) covers the other drifts
        ("sub-chain flushed", lambda: k.chains.__setitem__(("nat", "MAPE-SNAT-TCP"), []), {"nat"}),
        ("jump deleted", lambda: k.builtin[("mangle", "FORWARD")].clear(), {"mangle"}),
    ]
    for what, damage, expected_kinds in cases:
        damage()
        result = r.sync()
        kinds = {str(a).split()[1] if str(a).split()[1] in ("tunnel", "address", "route", "rule") else "?"
                 for a in result.plan.actions if not hasattr(a, "table")}  # fmt: skip
        kinds |= {a.table for a in result.plan.actions if hasattr(a, "table")}
        assert kinds == expected_kinds, (what, str(result.plan))
        assert r.sync().writes == 0, what


def test_unknown_prefix_fails_closed_and_removes_our_state():
    k, r = converged()
    k.wan_addrs = [w for w in k.wan_addrs if w.ours_shape]
    k.slaac("2409:10:1234:5600:5054:ff:fe12:3456")
    result = r.sync()
    assert result.params is None and "not served by OCN Virtual Connect" in result.selection.reason
    assert not k.tunnels and not k.chains and not [w for w in k.wan_addrs if w.ours_shape]


def test_preferred_address_wins_over_deprecated():
    k = FakeKernel(("wan0",))
    k.slaac(SLAAC_B, deprecated=True)
    k.slaac(SLAAC_A)
    result = Reconciler(CFG, k).sync()
    assert result.selection.source.address == SLAAC_A


def test_ppp0_appearing_late_brings_up_the_pppoe_routing():
    k, r = converged(links=("wan0", "lan0"))
    assert not any(x.dev == "ppp0" for x in k.routes)
    k.links.add("ppp0")
    result = r.sync()
    assert [str(a) for a in result.plan.actions] == [
        "~ sysctl net.ipv4.conf.ppp0.rp_filter=2",
        "+ route default dev ppp0 table 10 metric 0 proto 203",
    ]


def test_a_failed_action_stops_the_sync_and_the_next_sync_finishes_the_job():
    k = FakeKernel(("lan0",))  # no WAN link yet: the tunnel cannot be created
    k.slaac(SLAAC_A)
    r = Reconciler(CFG, k)
    result = r.sync()
    assert not result.ok and "wan0 does not exist" in str(result.error)
    k.links.add("wan0")
    assert r.sync().ok and r.sync().writes == 0


def test_second_jump_copy_is_removed():
    k, r = converged()
    k.builtin[("nat", "POSTROUTING")].append("-o ip6tnl1 -j MAPE-SNAT")
    result = r.sync()
    (change,) = result.plan.actions
    assert change.del_jumps == (Jump("nat", "POSTROUTING", "-o ip6tnl1 -j MAPE-SNAT"),)
    assert k.builtin[("nat", "POSTROUTING")].count("-o ip6tnl1 -j MAPE-SNAT") == 1
