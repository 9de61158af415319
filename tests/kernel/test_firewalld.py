"""Next to Debian 12's firewalld (1.3.3: the worst case, it flushes the iptables tables on reload,
restart and stop with either backend). Each step first shows our state was really removed (the
repair line names what was missing), then the repair by an event, well inside the periodic sync's
hour, with its latency printed (a figure, not an assertion), and the data path through the strict
BR. Every other program's object is byte-identical at the end."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable

from tests.kernel.test_forwards_lab import forward, reach
from tests.lab import checks, traffic
from tests.lab.daemon import Daemon
from tests.lab.firewalld import DIRECT, Firewalld
from tests.lab.mapping import OCN_SNAT_RULES
from tests.lab.netns import call, sh, spawn
from tests.lab.topo import LAN_SERVER, SERVER, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[daemon]\nsync_interval = 3600\n'
BOUND = CONFIG + '[firewalld]\nzone = "mape"\n'
IPTABLES_NFT = '[firewall]\nbackend = "iptables-nft"\n'  # the backend whose chains firewalld flushes


def snat_back(lab, ipv4: str, iptables: str = "iptables-nft") -> bool:
    return sh(lab.ce, f"{iptables}-save", "-t", "nat").count(f"--to-source {ipv4}:") == OCN_SNAT_RULES


def repair_syncs(d: Daemon) -> Counter[str]:
    return Counter(d.state().get("repairs") or {})


def repaired(lab, d: Daemon, ce, event: Callable[[], object], iptables: str = "iptables-nft",
             by: tuple[str, ...] = ()) -> float:  # fmt: skip
    """Do `event` (a flush of our chains) and wait for the daemon's repair: a repair sync counted
    in its state after it, set off by one of `by` when given (not the periodic sync), and SNAT
    back. A flush that did not happen (nothing to repair) fails here instead of passing at once.
    The seconds it took."""
    before = repair_syncs(d)
    since = time.monotonic()
    event()
    wait_for(lambda: repair_syncs(d) - before and snat_back(lab, ce.ipv4, iptables), 60, "the repair")
    took = time.monotonic() - since
    new = repair_syncs(d) - before
    assert not by or any(set(by) & set(cause.split(",")) for cause in new), (by, new)
    print(f"repaired {took:.2f} s after the event, by {dict(new)}")
    return took


def settled(lab, d: Daemon, fw: Firewalld, ce) -> None:
    """After firewalld is done (its call returned): the tunnel bound to zone mape, and a sync of
    the daemon asked for after that (a SIGHUP) has finished well, with our SNAT in place. A
    firewalld reload flushes the iptables tables more than once, so one repair seen is not the
    last; the sync asked for afterwards is."""
    t = time.time()
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.state().get("last_sync", 0) > t and d.state().get("ok") and snat_back(lab, ce.ipv4)
             and fw.zone_of("ip6tnl1") == "mape", 60, "the daemon's sync after firewalld was done")  # fmt: skip


def test_firewalld_nftables_reload_restart_direct_rule_and_nft_flush(lab, tmp_path):
    """F1, F2, F4, F8: firewalld with its nftables backend, the tunnel bound to zone mape by the
    daemon ([firewalld] zone) and the LAN in zone internal: the policy mape-lan-to-mape lets the
    LAN forward into it."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    fw = Firewalld(lab.ce, tmp_path).start()
    d = Daemon(lab, tmp_path, BOUND + IPTABLES_NFT, fw.env).start()
    try:
        wait_for(lambda: d.synced_by_me() and fw.zone_of("ip6tnl1") == "mape", 180, "converged, in zone mape")
        checks.data_path(lab, ce, chain)
        wait_for(lambda: (d.state().get("firewalld") or {}).get("zone") == "mape", 30, "status to say so")
        assert d.state()["firewalld"]["backend"] == "nftables" and d.state()["firewalld"]["problem"] is None
        before = checks.foreign(lab.ce)

        repaired(lab, d, ce, fw.reload)  # F1: Debian's 1.3.3 flushes the iptables tables on every reload
        assert "SNAT dispatch (MAPE-SNAT) restored (3 rules): it was missing" in d.text()  # the flush, shown
        wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the runtime zone binding again")
        checks.data_path(lab, ce, chain)

        fw.call(DIRECT, "addChain", "sss", "ipv4", "filter", "USER-DIRECT")  # F4: a direct rule (2.x flushes too)
        repaired(lab, d, ce, fw.reload)
        wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the runtime zone binding again")  # else: rejected
        checks.data_path(lab, ce, chain)

        repaired(lab, d, ce, fw.restart)  # F2: stop (CleanupOnExit flushes) and start: NameOwnerChanged twice
        wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the zone binding after the restart")
        checks.data_path(lab, ce, chain)

        # F8: what Debian's nftables.service does on start and stop
        # By the nf_tables event, or by firewalld's watcher when its check after the restart comes
        # first (it finds firewalld's own table gone with ours): an event either way, not the
        # periodic sync an hour away.
        repaired(lab, d, ce, lambda: sh(lab.ce, "nft", "flush", "ruleset"), by=("nftables", "firewalld"))
        wait_for(lambda: "mape" in sh(lab.ce, "nft", "list", "tables"), 30, "the guard back")
        checks.data_path(lab, ce, chain)
        fw.restart()  # firewalld's own table back (it does not notice a flush, and a reload trips on it)
        wait_for(lambda: snat_back(lab, ce.ipv4) and fw.zone_of("ip6tnl1") == "mape", 60, "the last repair")
        after = checks.foreign(lab.ce)
        assert after == before, (after, before)
        assert "periodic" not in d.state()["repairs"], d.state()["repairs"]
    finally:
        rc = d.stop()
        fw.close()
    assert rc == 0, d.text()


def test_firewalld_reloads_and_restarts_leave_the_nftables_backend_alone(lab, tmp_path):
    """With `auto` (the nftables backend here) firewalld's flushes of the iptables tables find
    nothing of ours: a reload and a restart remove nothing, and nothing needs repairing. A
    [[forward]] reaches its LAN server through firewalld's forward chain (it accepts DNATed
    connections) before and after."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    port = sorted(ce.ports())[40]
    lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "lan.jsonl"), LAN_SERVER, 8080))
    fw = Firewalld(lab.ce, tmp_path).start()
    d = Daemon(lab, tmp_path, BOUND + forward(port), fw.env).start()
    try:
        wait_for(lambda: d.synced_by_me() and fw.zone_of("ip6tnl1") == "mape", 180, "converged, in zone mape")
        assert "MAPE-" not in sh(lab.ce, "iptables-save")
        table = sh(lab.ce, "nft", "-s", "-t", "list", "table", "ip", "mape")
        checks.data_path(lab, ce, chain)
        assert not reach(lab, ce.ipv4, port).startswith("error")
        for action in (fw.reload, fw.restart):
            action()
            wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the zone binding again")
            checks.data_path(lab, ce, chain)
            assert not reach(lab, ce.ipv4, port).startswith("error")
        assert sh(lab.ce, "nft", "-s", "-t", "list", "table", "ip", "mape") == table
        assert "it was missing" not in d.text() and "differed" not in d.text(), d.text()
    finally:
        rc = d.stop()
        fw.close()
    assert rc == 0, d.text()


def test_firewalld_zone_problems_are_said_once_with_the_commands(lab, tmp_path):
    """F5: the tunnel in no zone is rejected by firewalld (ICMP admin-prohibited) and the daemon
    says so once, with the commands; they work and survive a reload. F6: in a masquerading zone,
    connections opened while our SNAT is gone never leave on a wrong port, and none is left in
    conntrack with one."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    fw = Firewalld(lab.ce, tmp_path).start()
    d = Daemon(lab, tmp_path, CONFIG + IPTABLES_NFT, fw.env).start()
    try:
        wait_for(lambda: d.synced_by_me() and "in no firewalld zone" in d.text(), 180, "the warning")
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1, 80, 3)[0].startswith("error")  # rejected
        line = next(x for x in d.text().splitlines() if "in no firewalld zone" in x)
        assert d.text().count("in no firewalld zone") == 1
        command = line.split("Bind it: `")[1].split("`")[0]
        for part in command.split(" && "):
            if part == "firewall-cmd --reload":
                fw.reload()  # the same D-Bus call, with room for TCG (firewall-cmd gives up after 25 s)
            else:
                fw.firewall_cmd(*part.split()[1:])
        settled(lab, d, fw, ce)
        checks.data_path(lab, ce, chain)
        fw.reload()
        settled(lab, d, fw, ce)
        checks.data_path(lab, ce, chain)
        assert d.text().count("in no firewalld zone") == 1

        fw.firewall_cmd("--permanent", "--zone=mape", "--remove-interface=ip6tnl1")  # F6: the trap
        fw.firewall_cmd("--permanent", "--zone=external", "--add-interface=ip6tnl1")
        fw.firewall_cmd("--permanent", "--policy=mape-lan-to-mape", "--add-egress-zone=external")
        fw.reload()
        wait_for(lambda: "which masquerades" in d.text() and snat_back(lab, ce.ipv4), 60, "the masquerade warning")
        d.proc.send_signal(signal.SIGSTOP)  # our repair comes late: firewalld's masquerade is all there is
        fw.reload()
        answers = call(lab.lan, traffic.tcp_concurrent, SERVER, 5, 80, 5)
        d.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: snat_back(lab, ce.ipv4), 60, "the repair after the gap")
        # The guard let through only what was masqueraded onto a port of the set, and nothing else
        # got a conntrack entry to outlive the repair.
        assert all(a.startswith("error") or int(a.split()[1]) in ce.ports() for a in answers), answers
        for line in sh(lab.ce, "conntrack", "-L", "-p", "tcp", check=False).splitlines():
            if f"dst={ce.ipv4}" in line:
                assert int(line.split("dport=")[-1].split()[0]) in ce.ports(), line
        # firewalld has answered about the tunnel since that reload (it is done applying it), and
        # the daemon's last sync was good: then the data path must work.
        wait_for(lambda: (d.state().get("firewalld") or {}).get("zone") == "external" and d.state().get("ok"), 60,
                 "firewalld settled and the daemon converged")  # fmt: skip
        checks.data_path(lab, ce, chain)
    finally:
        rc = d.stop()
        fw.close()
    assert rc == 0, d.text()


def test_firewalld_iptables_backend_with_nft_and_legacy_iptables(lab, tmp_path):
    """F3: FirewallBackend=iptables flushes every iptables table on reload and stop. With
    iptables-nft the flush is an nf_tables commit; with legacy iptables nothing but firewalld's
    D-Bus signals says it happened (our chains then live in the legacy tables too)."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    for iptables in ("iptables-nft", "iptables-legacy"):
        reload_and_restart_with(lab, tmp_path / iptables, ce, chain, iptables)


def reload_and_restart_with(lab, workdir, ce, chain, iptables: str) -> None:
    fw = Firewalld(lab.ce, workdir, backend="iptables", iptables=iptables.split("-")[1]).start()
    d = Daemon(lab, workdir, BOUND + f'[firewall]\nbackend = "{iptables}"\n', fw.env).start()
    try:
        wait_for(lambda: d.synced_by_me() and fw.zone_of("ip6tnl1") == "mape", 180, f"converged ({iptables})")
        checks.data_path(lab, ce, chain)
        before = checks.foreign(lab.ce, iptables)
        # With legacy iptables firewalld's D-Bus signal is the only news of its flush.
        by = ("firewalld",) if iptables == "iptables-legacy" else ()
        repaired(lab, d, ce, fw.reload, iptables, by)
        wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the binding after the reload")  # else: rejected
        checks.data_path(lab, ce, chain)
        repaired(lab, d, ce, fw.restart, iptables, by)
        wait_for(lambda: fw.zone_of("ip6tnl1") == "mape", 30, "the binding after the restart")
        checks.data_path(lab, ce, chain)
        assert checks.foreign(lab.ce, iptables) == before
    finally:
        rc = d.stop()
        fw.close()
    assert rc == 0, d.text()
