"""`mape-daemon run` with the nftables backend on the lab's kernel: the iptables flushes of
firewalld and of `iptables -F` cannot reach our table, and what does reach it (an `nft` command
of another process) is repaired by the nf_tables event, not by the periodic sync."""

from __future__ import annotations

import json
import signal

from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call, running, sh
from tests.lab.topo import SERVER, wait_for

CONFIG = ('[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\n[firewall]\nbackend = "nftables"\n'
          "[daemon]\nsync_interval = 3600\n")  # fmt: skip


def answer_in_set(lab, ce) -> None:
    ipv4, port = call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()
    assert ipv4 == ce.ipv4 and int(port) in ce.ports()


def test_nftables_backend_ignores_iptables_flushes_and_repairs_its_table_by_event(lab, tmp_path):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG).start()
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        assert "MAPE-" not in sh(lab.ce, "iptables-save")  # nothing of ours in iptables
        answer_in_set(lab, ce)
        # stateless, terse: without counter values, and without what the packet path added to sets
        table = sh(lab.ce, "nft", "-s", "-t", "list", "table", "ip", "mape")

        for t in ("nat", "mangle", "filter"):  # what firewalld's reload does to every iptables table
            sh(lab.ce, "iptables", "-t", t, "-F")
        d.proc.send_signal(signal.SIGHUP)  # a sync after the flushes: the positive signal to wait for
        wait_for(lambda: "applied" in d.text(), 30, "the reload's sync")
        assert "restored" not in d.text() and "updated" not in d.text(), d.text()  # nothing was ours
        answer_in_set(lab, ce)

        sh(lab.ce, "nft", "flush", "chain", "ip", "mape", "nat-out")
        back = "[event: nftables] nftables table ip mape (SNAT, guard, inbound closed) updated: it differed"
        wait_for(lambda: d.logged(back), 30, "the table back, by the nf_tables event")
        sh(lab.ce, "nft", "delete", "table", "ip", "mape")
        back = "[event: nftables] nftables table ip mape (SNAT, guard, inbound closed) restored: it was missing"
        wait_for(lambda: d.logged(back), 30, "the table back, by the nf_tables event")
        d.wait_state("repairs", {"nftables": 2})  # the periodic sync is an hour away
        assert sh(lab.ce, "nft", "-s", "-t", "list", "table", "ip", "mape") == table  # the same table, whole
        answer_in_set(lab, ce)
        assert lab.br_dropped(chain) == 0
    finally:
        assert d.stop() == 0, d.text()
    assert "table ip mape" not in sh(lab.ce, "nft", "list", "tables")
    assert "Traceback" not in d.text()


def test_a_reload_of_pppoe_hosts_keeps_the_tunnel_and_a_long_connection_and_the_last_of_three_sighups_wins(
    lab, tmp_path
):
    """Before: adding one host to pppoe.hosts tore everything down (the tunnel recreated, every
    connection NATed to the MAP IPv4 deleted); a SIGHUP that came while a reload was applied was
    lost. Now the connection keeps its port and echoes on, the tunnel keeps its ifindex, and of
    three SIGHUPs in quick succession the last file is what runs."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG).start()
    out = tmp_path / "hold.json"
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        index = sh(lab.ce, "cat", "/sys/class/net/ip6tnl1/ifindex")
        with running(lab.lan, traffic.hold_tcp, SERVER, str(out), stop=tmp_path / "stop-hold"):
            wait_for(lambda: out.exists() and json.loads(out.read_text())["echoes"] >= 3, 60, "a connection")
            before = json.loads(out.read_text())

            d.cfg.write_text(CONFIG.replace("[pppoe]\n", '[pppoe]\nhosts = ["192.168.1.77"]\n'))
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "192.168.1.77" in sh(lab.ce, "nft", "list", "chain", "ip", "mape", "pbr"), 30, "reload")
            wait_for(lambda: json.loads(out.read_text())["echoes"] >= before["echoes"] + 5, 60, "echoes after it")
            after = json.loads(out.read_text())
            assert after["broken"] is None and after["sport"] == before["sport"], (before, after)
            assert sh(lab.ce, "cat", "/sys/class/net/ip6tnl1/ifindex") == index  # the same tunnel, never recreated
            assert "removed our state under the old config" not in d.text() and "conntrack:" not in d.text()

            for mtu in (1420, 1410, 1400):  # three SIGHUPs in quick succession: the last one wins
                d.cfg.write_text(CONFIG + f"[tunnel]\nmtu = {mtu}\n")
                d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "mtu 1400 " in sh(lab.ce, "ip", "link", "show", "ip6tnl1"), 30, "the last reload")
            wait_for(lambda: d.text().count("applied") >= 2, 30, "the journal saying so")
        assert json.loads(out.read_text())["broken"] is None
        assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}
    finally:
        assert d.stop() == 0, d.text()
    assert "Traceback" not in d.text()


def test_debians_flush_ruleset_under_a_stream_of_new_flows_sends_nothing_wrong_by_the_tunnel(lab, tmp_path):
    """`nft -f /etc/nftables.conf` (Debian's default: `flush ruleset` first) takes our table, SNAT
    and the nftables guard with it. The daemon is paused meanwhile (a slow repair: the window stays
    open); new UDP flows from the LAN go on. Before: they left by the tunnel un-NATed, and the
    strict BR counted them. Now the egress guard on the tunnel's tc hook drops them, and after the
    repair no un-NATed connection is left."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG).start()
    out = tmp_path / "flows.json"

    def counts() -> dict:
        return json.loads(out.read_text()) if out.exists() else {"ok": 0, "fail": 0}

    def unnated() -> list[str]:
        return [line for line in sh(lab.ce, "conntrack", "-L", "-p", "udp", check=False).splitlines()
                if f"dst={SERVER}" in line and f"dst={ce.ipv4}" not in line]  # fmt: skip

    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        assert " bpf " in sh(lab.ce, "tc", "filter", "show", "dev", "ip6tnl1", "egress")
        with running(lab.lan, traffic.udp_flows, SERVER, str(out), stop=tmp_path / "stop-flows"):
            wait_for(lambda: counts()["ok"] >= 20, 60, "flows through the mapping")
            for i in range(3):
                d.proc.send_signal(signal.SIGSTOP)
                try:
                    sh(lab.ce, "nft", "-f", "/etc/nftables.conf")
                    assert "table ip mape" not in sh(lab.ce, "nft", "list", "tables")
                    failed = counts()["fail"]
                    wait_for(lambda f=failed: counts()["fail"] >= f + 10, 60, "new flows into the open window")
                finally:
                    d.proc.send_signal(signal.SIGCONT)
                wait_for(lambda: "table ip mape" in sh(lab.ce, "nft", "list", "tables"), 30, f"repair {i + 1}")
                ok = counts()["ok"]
                wait_for(lambda o=ok: counts()["ok"] >= o + 10, 60, "flows through the mapping again")
            wait_for(lambda: not unnated(), 10, "the un-NATed entries of the window deleted")  # UDP: 30 s to expire
        assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}
    finally:
        assert d.stop() == 0, d.text()
