"""`mape-daemon run` trusted for months: a netlink overflow, a WAN flap, two prefixes, a host that
cannot run it, and kill -9 in the middle of a sync, each on the lab's real kernel."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.mapping import OCN_SNAT_RULES
from tests.lab.netns import call, running, sh
from tests.lab.topo import SERVER, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\n'


def tunnel_local(lab) -> str | None:
    words = sh(lab.ce, "ip", "-d", "link", "show", "ip6tnl1", check=False).split()
    return words[words.index("local") + 1] if "local" in words else None


def test_an_overflowed_netlink_socket_is_resubscribed_and_tampering_still_repaired_by_event(lab, tmp_path):
    """Before: ENOBUFS killed the watcher and repairs waited for the periodic sync. The periodic
    sync here is an hour away, so only an event can bring the tunnel back."""
    ce = lab.ce_params()
    d = Daemon(lab, tmp_path, CONFIG + "[daemon]\nsync_interval = 3600\n")
    d.start(MAPE_DEBUG_NETLINK_RCVBUF="4096")
    try:
        wait_for(lambda: tunnel_local(lab) == ce.ce_draft03 and d.synced_by_me(), 120, "the first sync")
        burst = "".join(f"route add 198.18.{i // 250}.{i % 250}/32 dev lan0\n" for i in range(3000))
        burst += "".join(f"route del 198.18.{i // 250}.{i % 250}/32 dev lan0\n" for i in range(3000))
        sh(lab.ce, "ip", "-batch", "-", input=burst)
        wait_for(lambda: "netlink events overflowed the socket" in d.text(), 60, "the overflow to be noticed")
        sh(lab.ce, "ip", "link", "del", "ip6tnl1")
        back = "tunnel ip6tnl1 recreated with its addresses and routes: it was missing"
        wait_for(lambda: back in d.text(), 60, "the tunnel back, by event")
        assert tunnel_local(lab) == ce.ce_draft03
        d.wait_state("repairs", {"netlink": 1})  # by the rtnetlink event, not by the periodic sync
    finally:
        assert d.stop() == 0, d.text()
    assert "Traceback" not in d.text()


def test_a_two_second_wan_flap_loses_no_connection(lab, tmp_path):
    """Before: the SLAAC address went with the link, and the daemon tore everything down and
    flushed conntrack, killing every IPv4 connection even though the prefix came back."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG + "[daemon]\nhold_down = 20\n").start()  # room for a slow RA in the lab
    out = tmp_path / "hold.json"
    try:
        wait_for(lambda: tunnel_local(lab) == ce.ce_draft03 and d.synced_by_me(), 120, "the first sync")
        with running(lab.lan, traffic.hold_tcp, SERVER, str(out), stop=tmp_path / "stop-hold"):
            wait_for(lambda: out.exists() and json.loads(out.read_text())["echoes"] >= 3, 60, "a connection")
            before = json.loads(out.read_text())
            sh(lab.ce, "ip", "link", "set", "wan0", "down")
            wait_for(lambda: "prefix gone from wan0" in d.text(), 30, "the hold-down to begin")
            sh(lab.ce, "sleep", "2")  # the flap: link down for two seconds
            sh(lab.ce, "ip", "link", "set", "wan0", "up")
            wait_for(lambda: json.loads(out.read_text())["echoes"] >= before["echoes"] + 5, 60, "echoes after it")
        after = json.loads(out.read_text())
        assert after["broken"] is None and after["sport"] == before["sport"], (before, after)
        assert "conntrack" not in d.text() and "MAP-E off" not in d.text() and "moved" not in d.text(), d.text()
        assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}
    finally:
        assert d.stop() == 0, d.text()


def test_of_two_mapped_prefixes_the_most_recently_announced_wins(lab, tmp_path):
    """Before: the smallest address *string* won (5600 before 9a00), whatever was announced."""
    lab.announce({"2400:4050:1234:5600::/64": 1800, "2400:4050:1234:9a00::/64": 3600})
    newest = lab.ce_params("2400:4050:1234:9a00::/56")
    wait_for(lambda: len([a for a in lab.wan_addresses() if not a["tentative"]]) >= 2, 60, "two SLAAC addresses")
    d = Daemon(lab, tmp_path, CONFIG).start()
    try:
        wait_for(lambda: d.synced_by_me(), 120, "the first sync")
        assert d.state()["ipv4"] == newest.ipv4 and tunnel_local(lab) == newest.ce_draft03
    finally:
        assert d.stop() == 0, d.text()


def test_a_host_that_cannot_run_it_gets_one_message_and_exit_69(lab, tmp_path):
    """No iptables-nft-restore for the iptables-nft backend: one clear line and EX_UNAVAILABLE,
    which the unit's RestartPreventExitStatus does not restart on. With `auto`, a host without
    iptables runs on the nftables backend, and neither needs the conntrack tool (connection
    tracking is read over netlink)."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("ip", "tc", "sh", "cat"):  # a PATH with no iptables, no nft and no conntrack (iproute2 only)
        (bare / tool).symlink_to(subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    d = Daemon(lab, tmp_path, CONFIG + '[firewall]\nbackend = "iptables-nft"\n', {"PATH": str(bare)}).start()
    assert d.proc.wait(120) == 69, d.text()
    assert "this host cannot run mape-daemon" in d.text() and "iptables" in d.text(), d.text()
    assert "Traceback" not in d.text()
    assert "ip6tnl1" not in sh(lab.ce, "ip", "link")  # nothing half-made
    d.log.unlink()
    d = Daemon(lab, tmp_path, CONFIG, {"PATH": str(bare)}).start()
    try:
        wait_for(lambda: d.synced_by_me(), 120, "a sync with neither iptables nor the conntrack tool")
        assert "nat-out" in sh(lab.ce, "nft", "list", "table", "ip", "mape")
    finally:
        assert d.stop() == 0, d.text()


STOP_POINTS = ["nft@2", "firewall:1@2", "firewall:2@2", "firewall:3@2", "route@2", "routingrule@2", "address@2"]


def test_kill_9_inside_a_sync_then_restart_adopts_and_converges_without_duplicates(lab, tmp_path):
    """7 times (each point once): a daemon is frozen at a point inside a
    repair sync (after the tunnel, before SNAT; between two firewall tables; before the routes),
    killed with SIGKILL, and the next one's own first sync (its pid in the state file) must end
    converged with exactly one of each object."""
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    # The iptables-nft backend: its three firewall transactions give the most points to stop at.
    d = Daemon(lab, tmp_path, CONFIG + '[daemon]\nsync_interval = 3600\n[firewall]\nbackend = "iptables-nft"\n')
    # Each point once: drawn repeats (13, then 3) cost CI minutes of its 25 and found nothing new.
    for i, point in enumerate(STOP_POINTS):
        d.start(MAPE_DEBUG_STOP_BEFORE=point)
        wait_for(lambda: d.synced_by_me(), 180, f"run {i}: its own first sync")
        assert_converged_once(lab, ce)
        # Damage all kinds at once (the daemon paused meanwhile): one repair sync does everything,
        # and freezes at `point`.
        d.proc.send_signal(signal.SIGSTOP)
        sh(lab.ce, "ip", "link", "del", "ip6tnl1")
        for table, chain in (("filter", "MAPE-FWD"), ("mangle", "MAPE-MSS"), ("nat", "MAPE-SNAT")):
            sh(lab.ce, "iptables", "-t", table, "-F", chain)  # one change per table: three firewall actions
        sh(lab.ce, "ip", "rule", "del", "priority", "5000")
        sh(lab.ce, "nft", "delete", "table", "ip", "mape")
        d.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: proc_state(d.proc.pid) != "T", 10, f"run {i}: resumed")
        wait_for(lambda: proc_state(d.proc.pid) == "T", 60, f"run {i}: frozen before {point}")
        d.proc.kill()
        d.proc.wait(30)
    d.start()
    try:
        wait_for(lambda: d.synced_by_me(), 180, "the last restart's own first sync")
        assert_converged_once(lab, ce)
    finally:
        assert d.stop() == 0, d.text()
    assert "Traceback" not in d.text()


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def assert_converged_once(lab, ce) -> None:
    links = sh(lab.ce, "ip", "-o", "link", "show", "type", "ip6tnl")
    assert sum(1 for line in links.splitlines() if "ip6tnl1@" in line) == 1, links
    assert tunnel_local(lab) == ce.ce_draft03
    save = sh(lab.ce, "iptables-save")
    for jump in ("-o ip6tnl1 -j MAPE-SNAT", "-j MAPE-MSS", "-j MAPE-PBR", "-o ip6tnl1 -j MAPE-FWD"):
        assert sum(1 for line in save.splitlines() if line.endswith(jump)) == 1, (jump, save)
    assert save.count(f"--to-source {ce.ipv4}:") == OCN_SNAT_RULES
    assert sh(lab.ce, "nft", "list", "tables").count("table ip mape") == 1
    rules = [line for line in sh(lab.ce, "ip", "rule").splitlines() if "0x3e8" in line]
    assert len(rules) == 2, rules
    ours = [line for line in sh(lab.ce, "ip", "-6", "-o", "addr", "show", "dev", "wan0").splitlines() if "/128" in line]
    assert len(ours) == 1 and ce.ce_draft03 in ours[0], ours
    routes = sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203").splitlines()
    assert sorted(r.split(" proto")[0].strip() for r in routes) == [
        "default dev ip6tnl1", "unreachable default table 10 metric 4294967295"], routes  # fmt: skip


def test_on_iptables_legacy_the_minute_sync_finds_a_flush_and_a_backend_change_waits_for_a_foreign_jump(lab, tmp_path):
    """README: legacy iptables sends no event when someone runs `iptables -F`, so the full sync
    runs every 60 s there (not every 15 minutes): the flush is repaired by it, and only by it.
    Then a reload to iptables-nft must remove our legacy chains first; while a user's chain jumps
    into one of them that removal is refused, the old state is put back whole and keeps serving,
    and once the rule is gone the retried reload moves everything (fake-only before)."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG + '[firewall]\nbackend = "iptables-legacy"\n').start()
    legacy = lambda: sh(lab.ce, "iptables-legacy-save", "-t", "nat")  # noqa: E731
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        sh(lab.ce, "iptables-legacy", "-t", "nat", "-F")
        assert "-j MAPE-SNAT" not in legacy()  # our jump and rules gone
        wait_for(lambda: "SNAT dispatch (MAPE-SNAT) restored" in d.text(), 90, "the periodic sync's repair")
        d.wait_state("repairs", {"periodic": 1})
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4

        # A user's chain of their own that jumps into ours: not ours to delete, and while it is
        # there the kernel refuses to delete our chain.
        sh(lab.ce, "iptables-legacy", "-t", "nat", "-N", "USER-NAT")
        sh(lab.ce, "iptables-legacy", "-t", "nat", "-A", "USER-NAT", "-j", "MAPE-SNAT")
        d.cfg.write_text(CONFIG + '[firewall]\nbackend = "iptables-nft"\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "the old config stays and the reload is retried" in d.text(), 60, "the refused reload")
        wait_for(lambda: d.state().get("ok"), 60, "the old state put back")
        assert legacy().count(f"--to-source {ce.ipv4}:") == OCN_SNAT_RULES
        assert "MAPE-" not in sh(lab.ce, "iptables-nft-save")
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4

        sh(lab.ce, "iptables-legacy", "-t", "nat", "-F", "USER-NAT")
        wait_for(lambda: "MAPE-" not in legacy() and "MAPE-SNAT" in sh(lab.ce, "iptables-nft-save", "-t", "nat"),
                 120, "the retried reload")  # fmt: skip
        # The move's sync writes the state file under the new backend once it is done (the
        # chains show up in iptables-nft-save before the tunnel and routes are back).
        wait_for(lambda: d.state().get("backend") == "iptables-nft" and d.state().get("ok"), 60,
                 "the sync after the move")  # fmt: skip
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4
        assert lab.br_dropped(chain) == 0
    finally:
        assert d.stop() == 0, d.text()


def test_an_identical_rule_of_another_program_is_a_conflict_said_once_and_its_end_is_said(lab, tmp_path):
    """README: an identical rule is left alone (it does the same), said once as a conflict, and
    "conflict resolved" when it goes, when ours takes its place (fake-only before)."""
    theirs = ("fwmark", "0x3e8/0xffff", "lookup", "10", "priority", "5000")
    sh(lab.ce, "ip", "rule", "add", *theirs)  # a user's copy of our PPPoE rule, before we start
    d = Daemon(lab, tmp_path, CONFIG).start()
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        assert d.text().count("conflict: an identical rule exists, not ours") == 1
        assert "proto 203" not in next(r for r in sh(lab.ce, "ip", "rule").splitlines() if r.startswith("5000:"))
        assert any("identical rule" in c for c in d.state()["conflicts"])  # and status lists it
        sh(lab.ce, "ip", "rule", "del", *theirs)
        wait_for(lambda: "conflict resolved: an identical rule exists" in d.text(), 60, "the conflict resolved")
        mine = [r for r in sh(lab.ce, "ip", "rule").splitlines() if r.startswith("5000:")]
        assert len(mine) == 1 and "proto 203" in mine[0], mine
        assert d.text().count("conflict: an identical rule exists") == 1 and d.state()["conflicts"] == []
    finally:
        assert d.stop() == 0, d.text()
