"""The reconciler's logic against the stateful fake kernel: converge, no-op, drift, renumbering,
conntrack, ownership by record, conflicts, fail-closed ordering, the flap hold-down."""

from __future__ import annotations

import pytest

from mape_daemon.actions import ConntrackCleanup, FirewallChange, NetAction, NftChange
from mape_daemon.config import parse
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.state import Jump, Route, Tunnel
from tests.fake_kernel import FakeKernel

BASE = '[wan]\ninterface = "wan0"\n'
CFG = parse(BASE + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.55/32"]\n')
SLAAC_A = "2400:4050:1234:5600:5054:ff:fe12:3456"  # 153.240.72.209 psid 22
SLAAC_B = "2400:4050:1234:9a00:5054:ff:fe12:3456"  # another IPv4 (153.240.72.210)
SLAAC_C = "2400:4050:1234:5700:5054:ff:fe12:3456"  # the same IPv4, psid 23


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


def make(state_dir, cfg=CFG, links=("wan0", "lan0", "ppp0"), clock=None, kernel=None):
    k = kernel or FakeKernel(links)
    return k, Reconciler(cfg, k, RecordFile(state_dir), **({"clock": clock} if clock else {}))


def converged(state_dir, cfg=CFG, links=("wan0", "lan0", "ppp0"), clock=None):
    k = FakeKernel(links)
    k.slaac(SLAAC_A)
    _, r = make(state_dir, cfg, links, clock, k)
    first = r.sync()
    assert first.ok, first.error
    return k, r


def strs(plan) -> list[str]:
    return [str(a) for a in plan.actions]


def test_own_ce_address_is_never_taken_as_the_wan_prefix(state_dir):
    k, r = converged(state_dir, parse(BASE + "[daemon]\nhold_down = 0\n"))
    k.drop_slaac()  # only our CE /128 is left on the WAN
    result = r.sync()
    assert result.params is None and "no global IPv6 address" in result.selection.reason
    assert not k.tunnels and not k.chains and not k.ce_addrs and k.nft is None


def test_renumbering_moves_everything_and_forgets_connections_of_the_old_ipv4(state_dir):
    k, r = converged(state_dir)
    k.deprecate_all()
    k.slaac(SLAAC_B)
    result = r.sync()
    assert result.ok
    assert str(result.params.ipv4) == "153.240.72.210"
    assert k.tunnels["ip6tnl1"].local.startswith("2400:4050:1234:9a00:")
    assert [a for _, a in k.ce_addrs] == [k.tunnels["ip6tnl1"].local]  # the old CE /128 is gone
    (cleanup,) = k.cleanups
    assert cleanup.drop_ipv4 == ("153.240.72.209",) and cleanup.ipv4 == "153.240.72.210"
    assert "153.240.72.210:" in k.chains[("nat", "MAPE-SNAT-TCP")][0]
    assert "ip saddr != 153.240.72.210" in k.nft
    assert r.sync().writes == 0


def test_a_new_psid_on_the_same_ipv4_forgets_connections_outside_the_new_set(state_dir):
    """Before: the same IPv4 meant no flush, and live connections kept ports of the old PSID."""
    k, r = converged(state_dir)
    k.deprecate_all()
    k.slaac(SLAAC_C)
    result = r.sync()
    assert result.ok and (str(result.params.ipv4), result.params.psid) == ("153.240.72.209", 23)
    (cleanup,) = k.cleanups
    assert cleanup.drop_ipv4 == () and cleanup.ipv4 == "153.240.72.209"
    assert cleanup.ranges == result.params.port_ranges


def test_a_failed_conntrack_cleanup_is_retried_until_done_even_across_a_restart(state_dir):
    k, r = converged(state_dir)
    k.deprecate_all()
    k.slaac(SLAAC_B)
    k.fail_on = ConntrackCleanup
    failed = r.sync()
    assert not failed.ok and "injected" in str(failed.error)
    assert k.cleanups == []
    # A restart (a fresh reconciler on the same state folder) still owes the cleanup.
    _, again = make(state_dir, kernel=k)
    result = again.sync()
    assert result.ok and [c.drop_ipv4 for c in k.cleanups] == [("153.240.72.209",)]
    assert again.sync().writes == 0


def test_firewall_drift_is_repaired_and_only_the_drift(state_dir):
    k, r = converged(state_dir)
    cases = [  # the contract (tests/reconciler_contract.py) covers the other drifts
        ("sub-chain flushed", lambda: k.chains.__setitem__(("nat", "MAPE-SNAT-TCP"), []), {"nat", "conntrack"}),
        ("jump deleted", lambda: k.builtin[("mangle", "FORWARD")].clear(), {"mangle"}),
    ]
    for what, damage, expected in cases:
        damage()
        result = r.sync()
        kinds = {a.table if isinstance(a, FirewallChange) else "conntrack" if isinstance(a, ConntrackCleanup)
                 else "?" for a in result.plan.actions}  # fmt: skip
        assert kinds == expected, (what, str(result.plan))
        assert r.sync().writes == 0, what
    (cleanup,) = k.cleanups  # a restored SNAT: connections that left without it are forgotten
    assert cleanup.unnated_via == "ip6tnl1" and cleanup.ipv4 == "153.240.72.209"


def test_unknown_prefix_fails_closed_and_removes_our_state(state_dir):
    k, r = converged(state_dir, parse(BASE + "[daemon]\nhold_down = 0\n"))
    k.wan_addrs = []
    k.slaac("2409:10:1234:5600:5054:ff:fe12:3456")
    result = r.sync()
    assert result.params is None and "not served by OCN Virtual Connect" in result.selection.reason
    assert not k.tunnels and not k.chains and not k.ce_addrs


def test_selection_is_deterministic_preferred_then_newest_then_lowest(state_dir):
    k, r = make(state_dir, links=("wan0",))
    k.slaac(SLAAC_B, deprecated=True)
    k.slaac(SLAAC_A, preferred_lft=1800)
    k.slaac(SLAAC_C, preferred_lft=3600)  # announced most recently: the longest preferred lifetime
    assert r.compute().selection.source.address == SLAAC_C
    k.slaac(SLAAC_C, preferred_lft=1800)  # a tie: the numerically lowest address (not the string order)
    k.slaac("2400:4050:1234:a00:5054:ff:fe12:3456", preferred_lft=1800)
    assert r.compute().selection.source.address == "2400:4050:1234:a00:5054:ff:fe12:3456"


def test_ppp0_appearing_late_brings_up_the_pppoe_routing(state_dir):
    k, r = converged(state_dir, links=("wan0", "lan0"))
    assert not any(x.dev == "ppp0" for x in k.routes)
    k.links["ppp0"] = ""
    result = r.sync()
    assert strs(result.plan) == [
        "~ sysctl net.ipv4.conf.ppp0.rp_filter=2",
        "+ route default dev ppp0 table 10 metric 0 proto 203",
    ]


def test_pppoe_only_hosts_fail_closed_while_ppp0_is_absent(state_dir):
    """Before: with no ppp0 there was no table 10 at all, so marked hosts fell back to MAP-E."""
    k, _ = converged(state_dir, links=("wan0", "lan0"))
    assert k.routes[Route("default", "", 10, 2**32 - 1, kind="unreachable")] == 203
    assert "ct original ip saddr 192.168.1.55/32 counter drop" in k.nft


def test_rp_filter_only_where_needed_and_given_back(state_dir):
    k = FakeKernel(("wan0", "lan0", "ppp0"))
    k.slaac(SLAAC_A)
    k.rp_filter |= {"all": 2, "ppp0": 1}  # "all" = 2 makes every interface loose already
    _, r = make(state_dir, kernel=k)
    assert r.sync().ok and k.rp_filter["ppp0"] == 1
    k.rp_filter |= {"all": 0, "ppp0": 0}  # off is more permissive than loose: left alone
    assert r.sync().writes == 0 and k.rp_filter["ppp0"] == 0
    k.rp_filter["ppp0"] = 1  # strict: loosened, the old value written down
    assert strs(r.sync().plan) == ["~ sysctl net.ipv4.conf.ppp0.rp_filter=2"]
    assert "lan0" not in k.rp_filter  # LAN interfaces are never touched
    assert r.sync(teardown=True).ok and k.rp_filter["ppp0"] == 1


def test_a_failed_action_stops_the_sync_and_the_next_sync_finishes_the_job(state_dir):
    k, r = make(state_dir, links=("lan0",))  # no WAN link yet: the tunnel cannot be created
    k.slaac(SLAAC_A)
    result = r.sync()
    assert not result.ok and "wan0 does not exist" in str(result.error)
    k.links["wan0"] = ""
    assert r.sync().ok and r.sync().writes == 0


def test_second_jump_copy_is_removed(state_dir):
    k, r = converged(state_dir)
    k.builtin[("nat", "POSTROUTING")].append("-o ip6tnl1 -j MAPE-SNAT")
    result = r.sync()
    (change,) = [a for a in result.plan.actions if isinstance(a, FirewallChange)]
    assert change.del_jumps == (Jump("nat", "POSTROUTING", "-o ip6tnl1 -j MAPE-SNAT"),)
    assert k.builtin[("nat", "POSTROUTING")].count("-o ip6tnl1 -j MAPE-SNAT") == 1


def test_traffic_is_steered_into_the_tunnel_only_after_snat_and_guard_and_stops_first(state_dir):
    """Before: the default route came before the SNAT chains, so a LAN packet could leave unNATed."""
    k, r = make(state_dir)
    k.slaac(SLAAC_A)
    actions = r.sync().plan.actions
    steer = min(i for i, a in enumerate(actions) if isinstance(a, NetAction) and isinstance(a.obj, Route)
                and a.obj.dev == "ip6tnl1")  # fmt: skip
    nat = max(i for i, a in enumerate(actions) if isinstance(a, FirewallChange | NftChange))
    assert nat < steer
    teardown = r.sync(teardown=True).plan.actions
    unsteer = max(i for i, a in enumerate(teardown) if isinstance(a, NetAction) and isinstance(a.obj, Route))
    first_fw = min(i for i, a in enumerate(teardown) if isinstance(a, FirewallChange | NftChange))
    assert unsteer < first_fw


def test_an_all_reserved_pool_fails_closed_with_the_reason(state_dir):
    """Before: empty SNAT chains, and the default route into the tunnel anyway."""
    k, r = make(state_dir, parse(BASE + '[snat]\nreserved_ports = ["1024-65535"]\n'))
    k.slaac(SLAAC_A)
    result = r.sync()
    assert result.params is None and "cover every port of PSID 22" in result.selection.reason
    assert not k.tunnels and not k.routes and not k.chains


def test_a_foreign_default_at_our_metric_is_never_touched_and_said_once(state_dir):
    k, r = make(state_dir)
    k.slaac(SLAAC_A)
    pppd = Route("default", "ppp0", 254, 0)
    k.routes[pppd] = 3  # pppd's `defaultroute` (proto boot)
    result = r.sync()
    assert result.ok and k.routes[pppd] == 3
    assert not any(x.table == 254 and x.dev == "ip6tnl1" for x in k.routes)
    (conflict,) = result.conflicts
    assert "default dev ppp0 table main metric 0" in conflict and "nodefaultroute" in conflict
    assert r.sync().writes == 0
    assert r.sync(teardown=True).ok and k.routes == {pppd: 3}
    del k.routes[pppd]  # the user follows the advice: our default comes in at the next sync
    assert r.sync().ok and any(x.dev == "ip6tnl1" for x in k.routes)


def test_a_foreign_interface_or_tunnel_in_the_way_is_named(state_dir):
    k, r = make(state_dir)
    k.slaac(SLAAC_A)
    k.links["ip6tnl1"] = "gre"
    result = r.sync()
    assert not result.ok and "interface ip6tnl1 exists and is gre" in str(result.error)
    del k.links["ip6tnl1"]
    k.tunnels["old-mape"] = Tunnel("old-mape", "2400:4050:1234:5600:99:f048:d100:1600", "2001:380:a120::9", "wan0",
                                   1460, 64)  # fmt: skip
    k.links["old-mape"] = "ip6tnl"
    result = r.sync()
    assert not result.ok and "ip6tnl old-mape (not mape-daemon's) already connects" in str(result.error)
    assert "old-mape" in k.tunnels  # and it is left alone


def test_a_tunnel_of_ours_set_down_by_hand_comes_back_up_with_its_route(state_dir):
    k, r = converged(state_dir)
    k.link_down("ip6tnl1")
    assert strs(r.sync().plan) == ["~ " + k.tunnels["ip6tnl1"].describe(),
                                   "+ route default dev ip6tnl1 metric 0 proto 203"]  # fmt: skip
    assert k.tunnels["ip6tnl1"].up


def test_a_config_naming_another_wan_or_tunnel_removes_the_old_objects(state_dir):
    """Ownership by record: the old CE /128 on the old WAN and the old tunnel go."""
    k, r = converged(state_dir)
    k.links["wan1"] = ""
    old_ce = set(k.ce_addrs)
    k.wan, k.wan_addrs = "wan1", [w for w in k.wan_addrs]  # the same prefix, now on wan1
    r.config = parse('[wan]\ninterface = "wan1"\n[tunnel]\nname = "mape0"\n')
    result = r.sync()
    assert result.ok, result.error
    assert set(k.tunnels) == {"mape0"} and not (old_ce & k.ce_addrs)
    assert k.ce_addrs == {("wan1", k.tunnels["mape0"].local)}
    assert r.sync().writes == 0


def test_protocols_without_ports_follow_one_list(state_dir):
    k, _ = converged(state_dir, parse(BASE + '[snat]\nprotocols = ["tcp", "udp"]\n[pppoe]\n'))
    assert k.chains[("mangle", "MAPE-PBR-OTHER")][:2] == ["-p tcp -j RETURN", "-p udp -j RETURN"]
    assert k.chains[("filter", "MAPE-FWD")] == ["-p tcp -j RETURN", "-p udp -j RETURN", "-j DROP"]
    assert "icmp id" not in k.nft


def test_encap_limit_is_applied(state_dir):
    k, _ = converged(state_dir, parse(BASE + "[tunnel]\nencap_limit = 4\n"))
    assert k.tunnels["ip6tnl1"].encap_limit == "4"


def test_a_wan_flap_keeps_everything_when_the_same_prefix_returns(state_dir):
    clock = Clock()
    k, r = converged(state_dir, clock=clock)
    before = k.snapshot()
    k.link_down("wan0")  # the SLAAC address and our CE /128 go with the link
    clock.now += 1
    held = r.sync()
    assert held.ok and held.selection.held and 0 < held.recheck_in <= 10
    assert [str(a) for a in held.plan.actions] == [f"+ address {k.tunnels['ip6tnl1'].local}/128 dev wan0 nodad "
                                                   "noprefixroute"]  # fmt: skip
    assert not k.cleanups and k.tunnels and k.chains
    clock.now += 2
    k.slaac(SLAAC_A)  # the same prefix is back
    back = r.sync()
    assert back.ok and not back.plan and not back.selection.held
    assert k.snapshot() == before and not k.cleanups


def test_a_lost_prefix_is_let_go_after_the_hold_down_and_a_new_one_moves_at_once(state_dir):
    clock = Clock()
    k, r = converged(state_dir, clock=clock)
    k.drop_slaac()
    assert r.sync().selection.held
    clock.now += 11
    gone = r.sync()
    assert gone.params is None and not k.tunnels
    assert [c.drop_ipv4 for c in k.cleanups] == [("153.240.72.209",)]
    k.slaac(SLAAC_A)
    assert r.sync().ok and k.tunnels
    k.drop_slaac()
    assert r.sync().selection.held
    k.slaac(SLAAC_B)  # a genuinely new prefix during the hold: no waiting
    moved = r.sync()
    assert str(moved.params.ipv4) == "153.240.72.210" and not moved.selection.held


def test_a_no_op_sync_builds_nothing_and_any_input_of_the_desired_state_builds_it_again(state_dir, monkeypatch):
    """The desired state is built again only when what it reads moved: the config, the mapping,
    whether ppp0 exists (issue 18: an nftables no-op sync cost 0.15x a blind re-apply)."""
    from mape_daemon import desired

    builds = []
    real = desired.build
    monkeypatch.setattr(desired, "build", lambda *a, **kw: builds.append(a[1]) or real(*a, **kw))
    k, r = converged(state_dir, links=("wan0", "lan0"))
    assert len(builds) == 1
    assert not r.sync().plan and not r.sync().plan and len(builds) == 1  # no-op syncs: nothing built
    k.links["ppp0"] = ""  # pppd brought ppp0 up: table 10 gets its default through it
    assert any(a.obj.dev == "ppp0" for a in r.sync().plan.actions if isinstance(a, NetAction)) and len(builds) == 2
    k.slaac(SLAAC_B, preferred_lft=7200)  # renumbered
    assert r.sync().params.ipv4 != builds[0].ipv4 and len(builds) == 3
    r.config = parse(BASE + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.56/32"]\n')  # a reload
    assert "+ mangle chain MAPE-PBR (4 rules)" in strs(r.sync().plan) and len(builds) == 4
    assert not r.sync().plan and len(builds) == 4


def test_the_record_not_the_config_says_which_backend_holds_our_state(state_dir):
    """Before: cleanup and the stop-time teardown took the backend from the config and then forgot
    the record's: after a switch (iptables-nft to nftables, as the README advises) the old MAPE-*
    chains and their jumps were orphaned; a start on the new backend failed until cleanup."""
    from tests.fake_kernel import BackendView

    k, r = converged(state_dir)
    assert k.chains and r.record.backend == "fake"  # an iptables backend, chains of ours
    kernel_for = lambda backend: BackendView(k, backend)  # noqa: E731
    teardown = Reconciler(CFG, BackendView(k, "nftables"), RecordFile(state_dir), kernel_for=kernel_for)
    assert teardown.sync(teardown=True).ok  # the config names nftables; the record says otherwise
    assert not k.chains and not any(k.builtin.values()) and not k.tunnels and k.nft is None
    assert teardown.record.backend is None

    k.slaac(SLAAC_A)
    assert Reconciler(CFG, k, RecordFile(state_dir)).sync().ok and k.chains  # back on the iptables backend
    switched = Reconciler(CFG, BackendView(k, "nftables"), RecordFile(state_dir), kernel_for=kernel_for)
    result = switched.sync()  # a start (or reload) on the other backend moves our state
    assert result.ok and result.moved_from[0] == "fake" and result.moved_from[1] > 10, result.error
    assert not k.chains and not any(k.builtin.values())  # no orphan
    assert " snat ip to " in k.nft and switched.record.backend == "nftables"
    assert not switched.sync().plan


def test_a_ce_address_that_went_with_the_wan_leaves_the_record(state_dir):
    """Before: a /128 removed by a WAN flap before a renumbering stayed in the record forever."""
    k, r = converged(state_dir)
    (old,) = r.record.addresses
    k.ce_addrs.clear()  # a network manager removed it
    k.slaac(SLAAC_B, preferred_lft=7200)  # and the prefix moved meanwhile
    assert r.sync().ok
    assert old not in r.record.addresses and len(r.record.addresses) == 1


def test_pppds_states_give_the_right_table_10_without_a_failing_sync(state_dir):
    """Before: ppp0 present but down (pppd negotiating, or between its retries) still got the
    table-10 route: ENETDOWN, a failed sync, a growing backoff, and a tunnel repair that waited."""
    k = FakeKernel(("wan0", "lan0", "ppp0"))
    k.slaac(SLAAC_A)
    k.ppp("ppp0", can_carry=False)  # LCP, auth, IPCP
    _, r = make(state_dir, kernel=k)

    def table10() -> list[str]:
        return sorted(f"{x.kind} {x.dev}" for x in k.routes if x.table == 10)

    assert r.sync().ok and table10() == ["unreachable "]  # fails closed, no route into a dead link
    k.ppp("ppp0", can_carry=True)
    assert r.sync().ok and table10() == ["unicast ppp0", "unreachable "]
    k.ppp("ppp0", can_carry=False)  # pppd's retry: ppp0 down, and someone deletes the tunnel meanwhile
    k.apply_del_tunnel("ip6tnl1")
    result = r.sync()
    assert result.ok, result.error  # the tunnel repair is not held up by ppp0
    assert "ip6tnl1" in k.tunnels and table10() == ["unreachable "]
    assert not r.sync().plan
