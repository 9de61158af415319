"""`mape-daemon doctor`'s verdicts from facts (pure): each known cause fails its own check, with
its fix, and what depends on a failed check is not tried. tests/kernel/test_doctor_lab.py runs
it on the lab router, working and broken on purpose."""

from __future__ import annotations

import time
from dataclasses import replace

from mape_daemon import doctor
from mape_daemon.config import parse
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.statefile import DaemonState
from tests.fake_kernel import FakeKernel

CFG = parse('[wan]\ninterface = "wan0"\n[pppoe]\n')
SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"


def facts(tmp_path, synced: bool = True, cfg=CFG, **kw) -> doctor.Facts:
    k = FakeKernel(("wan0", "lan0", "ppp0"))
    k.slaac(SLAAC)
    r = Reconciler(cfg, k, RecordFile(tmp_path / "state"))
    if synced:
        assert r.sync().ok
    state = DaemonState(pid=1, last_sync=time.time() - 5, ok=True, error=None, changes=0, reason="",
                        tunnel_name="ip6tnl1", wan="wan0")  # fmt: skip
    base = doctor.Facts(cfg, r.compute(), sysctl={"ip_forward": "1", "forwarding6": "1", "accept_ra": "2"},
                        wan_mtu=1500, tunnel_mtu=1460, echo_br=0.012, target="192.0.2.1:443", connect_error="",
                        tunnel_delta=(3, 2), state=state, rp_filter={"all": 0, "ppp0": 2})  # fmt: skip
    return replace(base, **kw)


def verdicts(f: doctor.Facts) -> dict[str, bool | None]:
    return {c.name: c.ok for c in doctor.checks(f)}


def fails(f: doctor.Facts) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor.checks(f) if c.ok is False}


def test_a_working_router_passes_every_check(tmp_path):
    results = doctor.checks(facts(tmp_path))
    assert not doctor.failed(results), doctor.to_text(results)
    assert [c.name for c in results] == [
        "IPv4 forwarding", "router advertisements", "prefix", "CE address", "tunnel", "default route", "BR", "traffic",
        "path MTU", "rp_filter", "daemon",
    ]  # fmt: skip
    assert doctor.to_text(results).endswith("all checks passed")
    assert doctor.to_json(results)["ok"] is True


def test_each_cause_fails_its_own_check_with_the_fix(tmp_path):
    assert set(fails(facts(tmp_path, sysctl={"ip_forward": "0", "forwarding6": "1", "accept_ra": "2"}))) == {
        "IPv4 forwarding"}  # fmt: skip
    ra = fails(facts(tmp_path, sysctl={"ip_forward": "1", "forwarding6": "1", "accept_ra": "1"}))
    assert set(ra) == {"router advertisements"} and "accept_ra=2" in ra["router advertisements"].fix
    assert set(fails(facts(tmp_path, echo_br=None))) == {"BR"}
    lost = fails(facts(tmp_path, connect_error="Connection timed out", tunnel_delta=(6, 0)))
    assert set(lost) == {"traffic"} and "packets go out, nothing comes back" in lost["traffic"].says
    assert "interface-identifier" in lost["traffic"].fix
    other = fails(facts(tmp_path, connect_error="Connection refused", tunnel_delta=(1, 1)))
    assert "nothing comes back" not in other["traffic"].says
    elsewhere = fails(facts(tmp_path, connect_error="Connection timed out", tunnel_delta=(0, 0)))
    assert "nothing entered the tunnel" in elsewhere["traffic"].says
    assert set(fails(facts(tmp_path, tunnel_mtu=1500))) == {"path MTU"}
    assert set(fails(facts(tmp_path, rp_filter={"all": 1, "ppp0": 0}))) == {"rp_filter"}  # the larger one counts
    stale = facts(tmp_path)
    stale = replace(stale, state=replace(stale.state, last_sync=time.time() - 3600))
    assert "stuck or gone" in fails(stale)["daemon"].says
    assert set(fails(facts(tmp_path, state=None))) == {"daemon"}
    restarted = facts(tmp_path)
    restarted = replace(restarted, state=replace(restarted.state, watcher_restarts=2))
    daemon = next(c for c in doctor.checks(restarted) if c.name == "daemon")
    assert daemon.ok and "event watchers restarted 2 time(s)" in daemon.says  # supervised: said, not a failure


def test_without_our_state_the_ce_address_tunnel_and_route_fail_and_the_rest_is_not_tried(tmp_path):
    f = facts(tmp_path, synced=False, echo_br=None, connect_error=None, state=None)
    v = verdicts(f)
    assert v["CE address"] is False and v["tunnel"] is False and v["default route"] is False
    assert v["BR"] is None and v["traffic"] is None
    assert "start mape-daemon" in fails(f)["CE address"].fix


def test_no_prefix_says_why_and_tries_nothing_that_needs_one(tmp_path):
    k = FakeKernel(("wan0", "lan0"))
    f = replace(facts(tmp_path), computed=Reconciler(CFG, k, RecordFile(tmp_path / "s2")).compute())
    v = verdicts(f)
    assert v["prefix"] is False and v["CE address"] is None and v["traffic"] is None
    assert "no global IPv6 address on wan0" in fails(f)["prefix"].says


def test_a_foreign_default_in_our_slot_is_named_with_nodefaultroute(tmp_path):
    from mape_daemon.state import Route

    f = facts(tmp_path)
    k = FakeKernel(("wan0", "lan0", "ppp0"))
    k.slaac(SLAAC)
    k.routes[Route("default", "ppp0", 254, 0)] = 16  # pppd's defaultroute (proto boot/dhcp: not ours)
    r = Reconciler(CFG, k, RecordFile(tmp_path / "s3"))
    r.sync()
    got = fails(replace(f, computed=r.compute()))
    assert "default route" in got and "nodefaultroute" in got["default route"].fix


def test_hb46pp_is_checked_where_the_line_provisions(tmp_path):
    """One access's outcome: a line without the record is fine in "auto" (the bundled tables),
    not in "hb46pp"; each failure with its fix."""
    auto = parse('[wan]\ninterface = "wan0"\n[isp]\nresolvers = ["2001:db8::53"]\n')
    only = parse('[wan]\ninterface = "wan0"\n[isp]\nprovisioning = "hb46pp"\nresolvers = ["2001:db8::53"]\n')
    assert "HB46PP" not in verdicts(facts(tmp_path))  # not asked: no check
    f = facts(tmp_path, provisioning=("ok", "https://prov/config offers map_e"))
    assert verdicts(f)["HB46PP"] is True and list(verdicts(f))[2] == "HB46PP"
    none = ("no record", "no 4over6.info TXT record on the line's resolvers (NXDOMAIN)")
    assert verdicts(facts(tmp_path, config=auto, provisioning=none))["HB46PP"] is True
    assert "isp.provisioning" in fails(facts(tmp_path, config=only, provisioning=none))["HB46PP"].fix
    for outcome, fix in (("dns failed", "isp.resolvers"), ("no reply", "ca_file"), ("bad reply", "provider")):
        check = fails(facts(tmp_path, config=auto, provisioning=(outcome, "it went wrong")))["HB46PP"]
        assert fix in check.fix and check.says == "it went wrong", outcome


def test_ds_lite_and_ipip_are_checked_by_their_own_far_end(tmp_path):
    from tests.test_lines import DSLITE, IPIP

    for text, far, says in ((DSLITE, "AFTR", "DS-Lite via AFTR 2001:db8:aa::1"),
                            (IPIP, "provider end", "fixed IPv4 198.18.0.77 over IPIP")):  # fmt: skip
        f = facts(tmp_path / far, cfg=parse(text))
        results = doctor.checks(f)
        assert not doctor.failed(results), doctor.to_text(results)
        assert far in [c.name for c in results] and says in doctor.to_text(results)
        lost = fails(facts(tmp_path / f"{far}-lost", cfg=parse(text), echo_br=None))
        assert set(lost) == {far} and ("dslite.aftr" if far == "AFTR" else "ipip.remote") in lost[far].fix
