"""`mape-daemon run` against the lab: first sync, repair, renumbering, reload, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.lab import traffic
from tests.lab.netns import call, popen, sh
from tests.lab.topo import SERVER, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[daemon]\nsync_interval = 5\n'


def tunnel_local(lab, name: str = "ip6tnl1") -> str | None:
    out = sh(lab.ce, "ip", "-d", "link", "show", name, check=False)
    words = out.split()
    return words[words.index("local") + 1] if "local" in words else None


def test_daemon_follows_renumbering_repairs_reloads_and_stops_clean(lab, tmp_path):
    old = lab.ce_params()
    lab.br_add_ce(old)
    cfg = tmp_path / "mape.toml"
    cfg.write_text(CONFIG)
    log_path = tmp_path / "daemon.log"
    env = {**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run")}
    with open(log_path, "wb") as log:
        proc = popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg),
                     stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        wait_for(lambda: tunnel_local(lab) == old.ce_draft03, 120, "the first sync")
        wait_for(lambda: "MAPE-SNAT-TCP" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the SNAT chains")
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == old.ipv4

        sh(lab.ce, "ip", "link", "del", "ip6tnl1")  # netlink tells the daemon at once
        wait_for(lambda: tunnel_local(lab) == old.ce_draft03, 30, "the tunnel to come back")
        sh(lab.ce, "iptables", "-t", "nat", "-F", "MAPE-SNAT")  # no event: the periodic sync repairs it
        wait_for(lambda: "-A MAPE-SNAT -p tcp" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the periodic sync")

        lab.renumber("2400:4050:1234:9a00::/64")
        new = lab.ce_params()
        lab.br_add_ce(new)
        wait_for(lambda: tunnel_local(lab) == new.ce_draft03, 60, "re-convergence on the new prefix")
        wait_for(lambda: f"{new.ipv4}:" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the new SNAT address")
        answer = call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0]
        assert answer.split()[0] == new.ipv4 and int(answer.split()[1]) in new.ports()
        state_file = tmp_path / "run" / "state.json"
        wait_for(lambda: json.loads(state_file.read_text())["ipv4"] == new.ipv4, 30, "the state file")
        state = json.loads(state_file.read_text())
        assert (state["psid"], state["ok"], state["prefix"]) == (new.psid, True, "2400:4050:1234:9a00::/56")
        status = subprocess.run(
            ["ip", "netns", "exec", lab.ce, sys.executable, "-m", "mape_daemon", "status", "--json", "-c", str(cfg)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        live = json.loads(status.stdout)
        assert live["tunnel"] == {"name": "ip6tnl1", "present": True, "up": True, "local": new.ce_draft03,
                                  "remote": lab.rule.br}  # fmt: skip
        tcp = live["ports_in_use"]["tcp"]
        assert tcp["of"] == 1008 and tcp["in_use"] >= 1  # the connection above, in its TIME_WAIT

        cfg.write_text("[wan\n")  # a broken file on reload: the running config stays
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running config" in log_path.read_text(), 30, "the reload to be refused")
        assert proc.poll() is None and tunnel_local(lab) == new.ce_draft03

        # A good reload that renames the tunnel: the old one goes, nothing of it is left behind.
        cfg.write_text(CONFIG + '[tunnel]\nname = "mape0"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: tunnel_local(lab, "mape0") == new.ce_draft03 and tunnel_local(lab) is None, 60, "mape0")
        wait_for(lambda: "-o mape0 -j MAPE-SNAT" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the new jump")
        assert "ip6tnl1" not in sh(lab.ce, "iptables-save")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    output = log_path.read_text()
    assert rc == 0, output
    assert "Traceback" not in output, output
    assert tunnel_local(lab) is None and tunnel_local(lab, "mape0") is None
    assert "MAPE-" not in sh(lab.ce, "iptables-save")
    assert new.ce_draft03 not in sh(lab.ce, "ip", "-6", "addr")


def count(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if line.endswith(needle))


def test_daemon_reload_restart_after_kill_late_ppp0_and_rapid_renumbering(lab, tmp_path):
    cfg = tmp_path / "mape.toml"
    cfg.write_text(CONFIG + '[pppoe]\nlan_interfaces = ["lan0"]\n')
    env = {**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run")}
    log_path = tmp_path / "daemon.log"

    def start():
        with open(log_path, "ab") as log:
            return popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg),
                         stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip

    proc = start()
    try:
        ce = lab.ce_params()
        wait_for(lambda: tunnel_local(lab) == ce.ce_draft03, 120, "the first sync")
        mtu = lambda: sh(lab.ce, "ip", "link", "show", "ip6tnl1", check=False)  # noqa: E731
        cfg.write_text(CONFIG + '[pppoe]\nlan_interfaces = ["lan0"]\n[tunnel]\nmtu = 1400\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "mtu 1400" in mtu(), 30, "the reloaded MTU")

        proc.kill()  # no cleanup at all; the next start must adopt what is there
        proc.wait(30)
        proc = start()
        wait_for(lambda: (tmp_path / "run" / "state.json").exists() and "mtu 1400" in mtu(), 60, "the restart")
        wait_for(lambda: log_path.read_text().count("sync") >= 1, 60, "a sync after the restart")
        save = sh(lab.ce, "iptables-save")
        assert count(save, "-o ip6tnl1 -j MAPE-SNAT") == 1 and count(save, "-j MAPE-MSS") == 1, save
        assert len(sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203").splitlines()) == 1

        assert "table 10" not in sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203")
        lab.start_pppoe()  # ppp0 appears after the daemon started
        wait_for(lab.ppp_up, 60, "ppp0")
        wait_for(
            lambda: "dev ppp0" in sh(lab.ce, "ip", "route", "show", "table", "10", check=False), 30, "table 10 via ppp0"
        )

        prefixes = [f"2400:4050:12{i:02x}:5600::/64" for i in range(1, 21)]
        for p in prefixes:
            lab.renumber(p)
        last = lab.ce_params()
        wait_for(lambda: tunnel_local(lab) == last.ce_draft03, 120, "convergence on the last prefix")
        wait_for(lambda: f"{last.ipv4}:" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the last SNAT address")
        ours = [line for line in sh(lab.ce, "ip", "-6", "-o", "addr", "show", "dev", "wan0").splitlines()
                if "/128" in line]  # fmt: skip
        assert len(ours) == 1 and last.ce_draft03 in ours[0], ours
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0, log_path.read_text()
    assert sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203") == ""
