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


def tunnel_local(lab) -> str | None:
    out = sh(lab.ce, "ip", "-d", "link", "show", "ip6tnl1", check=False)
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

        cfg.write_text("[wan\n")  # a broken file on reload: the running config stays
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running config" in log_path.read_text(), 30, "the reload to be refused")
        assert proc.poll() is None and tunnel_local(lab) == new.ce_draft03
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    output = log_path.read_text()
    assert rc == 0, output
    assert "Traceback" not in output, output
    assert tunnel_local(lab) is None
    assert "MAPE-" not in sh(lab.ce, "iptables-save")
    assert new.ce_draft03 not in sh(lab.ce, "ip", "-6", "addr")
