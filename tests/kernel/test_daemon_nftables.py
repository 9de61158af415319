"""`mape-daemon run` with the nftables backend on the lab's kernel: the iptables flushes of
firewalld and of `iptables -F` cannot reach our table, and what does reach it (an `nft` command
of another process) is repaired by the nf_tables event, not by the periodic sync."""

from __future__ import annotations

import time

from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call, sh
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
        table = sh(lab.ce, "nft", "-s", "list", "table", "ip", "mape")  # stateless: without counter values

        for t in ("nat", "mangle", "filter"):  # what firewalld's reload does to every iptables table
            sh(lab.ce, "iptables", "-t", t, "-F")
        time.sleep(3)  # room for a repair to show, had there been anything to repair
        assert "restored" not in d.text() and "updated" not in d.text(), d.text()
        answer_in_set(lab, ce)

        sh(lab.ce, "nft", "flush", "chain", "ip", "mape", "nat-out")
        back = "[event: nftables] nftables table ip mape (SNAT, guard, inbound closed) updated: it differed"
        wait_for(lambda: d.logged(back), 30, "the table back, by the nf_tables event")
        sh(lab.ce, "nft", "delete", "table", "ip", "mape")
        back = "[event: nftables] nftables table ip mape (SNAT, guard, inbound closed) restored: it was missing"
        wait_for(lambda: d.logged(back), 30, "the table back, by the nf_tables event")
        d.wait_state("repairs", {"nftables": 2})  # the periodic sync is an hour away
        assert sh(lab.ce, "nft", "-s", "list", "table", "ip", "mape") == table  # the same table, whole
        answer_in_set(lab, ce)
        assert lab.br_dropped(chain) == 0
    finally:
        assert d.stop() == 0, d.text()
    assert "table ip mape" not in sh(lab.ce, "nft", "list", "tables")
    assert "Traceback" not in d.text()
