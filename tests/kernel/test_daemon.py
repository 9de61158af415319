"""`mape-daemon run` against the lab: first sync, repair, renumbering, reload, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.mapping import OCN_SNAT_RULES
from tests.lab.netns import call, popen, sh, spawn
from tests.lab.topo import SERVER, wait_for

# The iptables-nft backend: these tests flush and count MAPE-* chains (the nftables backend has
# its own daemon test, test_daemon_nftables.py).
CONFIG = '[wan]\ninterface = "wan0"\n[daemon]\nsync_interval = 5\n[firewall]\nbackend = "iptables-nft"\n'


def tunnel_local(lab, name: str = "ip6tnl1") -> str | None:
    out = sh(lab.ce, "ip", "-d", "link", "show", name, check=False)
    words = out.split()
    return words[words.index("local") + 1] if "local" in words else None


def logged(log_path, line: str) -> bool:
    """The daemon logged `line`: "[event: nftables] text" also matches a line whose bracket names
    more triggers than that one ("[event: netlink,nftables] text")."""
    cause, _, text = line.partition("] ")
    for logged_line in log_path.read_text().splitlines():
        head, _, rest = logged_line.partition("] ")
        if rest == text and all(part.strip() in head for part in cause.lstrip("[").replace(":", ",").split(",")):
            return True
    return False


def test_daemon_follows_renumbering_repairs_reloads_and_stops_clean(lab, tmp_path):
    """Each kind of repair, the renumbering and the reload, with the line the log gives each:
    what was done to which object, why, and what set the sync off."""
    old = lab.ce_params()
    lab.br_add_ce(old)
    cfg = tmp_path / "mape.toml"
    config = CONFIG + "[pppoe]\n"
    cfg.write_text(config)
    log_path = tmp_path / "daemon.log"
    env = {**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run")}
    with open(log_path, "wb") as log:
        proc = popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg),
                     stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        wait_for(lambda: state_pid(tmp_path) == proc.pid, 120, "the first sync")  # finished: the routes are last
        assert tunnel_local(lab) == old.ce_draft03
        assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == old.ipv4

        sh(lab.ce, "ip", "link", "del", "ip6tnl1")  # netlink tells the daemon at once
        back = "[event: netlink] tunnel ip6tnl1 recreated with its addresses and routes: it was missing"
        wait_for(lambda: logged(log_path, back), 30, "the tunnel to come back")  # the line follows the sync
        assert tunnel_local(lab) == old.ce_draft03
        sh(lab.ce, "ip", "-6", "addr", "del", f"{old.ce_draft03}/128", "dev", "wan0")
        ce_back = f"[event: netlink] CE address {old.ce_draft03}/128 on wan0 restored: it was missing"
        wait_for(lambda: logged(log_path, ce_back), 30, "the CE address back")
        sh(lab.ce, "ip", "rule", "del", "priority", "5000")
        rule = "[event: netlink] rule 5000 (fwmark 0x3e8/0xffff -> table 10) restored: it was missing"
        wait_for(lambda: logged(log_path, rule), 30, "the rule back")
        settled(tmp_path)  # between syncs: the echo of our own rule add triggers one too
        sh(lab.ce, "iptables", "-t", "nat", "-F", "MAPE-SNAT-TCP")  # no rtnetlink event, but an nf_tables one
        wait_for(lambda: logged(log_path, "[event: nftables] SNAT for tcp restored (63 rules): the chain was empty"),
                 30, "the repair by the nf_tables event")  # fmt: skip

        lab.renumber("2400:4050:1234:9a00::/64")
        new = lab.ce_params()
        lab.br_add_ce(new)
        wait_for(lambda: tunnel_local(lab) == new.ce_draft03, 60, "re-convergence on the new prefix")
        wait_for(lambda: f"{new.ipv4}:" in sh(lab.ce, "iptables-save", "-t", "nat"), 30, "the new SNAT address")
        moved = (f"[event: netlink] moved to {new.ipv4} psid {new.psid} (prefix 2400:4050:1234:9a00::/56 announced, "
                 f"2400:4050:1234:5600::/56 deprecated; was {old.ipv4} psid {old.psid})")  # fmt: skip
        wait_for(lambda: logged(log_path, moved), 30, "the line, which follows the sync")
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
        wait_for(lambda: "nothing changes, staying with the config loaded at" in log_path.read_text(), 30,
                 "the reload to be refused")  # fmt: skip
        assert proc.poll() is None and tunnel_local(lab) == new.ce_draft03

        cfg.write_text(config + "[tunnel]\nmtu = 1400\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: logged(log_path, "[reload] tunnel ip6tnl1 changed: mtu was 1460, wanted 1400"), 30, "reload")

        # A good reload that renames the tunnel: the old one goes, nothing of it is left behind.
        cfg.write_text(config + '[tunnel]\nname = "mape0"\n')
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


def settled(tmp_path, quiet: float = 1.0) -> None:
    """Return just after a sync (the state file is written after each one, the periodic ones
    included) followed by `quiet` seconds without another: the next periodic sync is then seconds
    away, and an event's sync cannot be mistaken for it."""
    path = tmp_path / "run" / "state.json"
    first = path.stat().st_mtime_ns
    wait_for(lambda: path.stat().st_mtime_ns != first, 60, "a sync")
    last = [path.stat().st_mtime_ns, time.monotonic()]

    def still() -> bool:
        if (mtime := path.stat().st_mtime_ns) != last[0]:
            last[:] = [mtime, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_for(still, 60, "the daemon to settle")


def state_pid(tmp_path) -> int | None:
    """The pid that wrote the state file: the daemon whose sync it reports."""
    try:
        return json.loads((tmp_path / "run" / "state.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def count(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if line.endswith(needle))


def test_daemon_reload_restart_after_kill_late_ppp0_and_rapid_renumbering(lab, tmp_path):
    cfg = tmp_path / "mape.toml"
    cfg.write_text(CONFIG + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\n')
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
        cfg.write_text(CONFIG + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\n[tunnel]\nmtu = 1400\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "mtu 1400" in mtu(), 30, "the reloaded MTU")

        proc.kill()  # no cleanup at all; the next start must adopt what is there
        proc.wait(30)
        proc = start()
        wait_for(lambda: state_pid(tmp_path) == proc.pid, 120, "the restarted daemon's own first sync")
        assert "mtu 1400" in mtu()
        save = sh(lab.ce, "iptables-save")
        assert count(save, "-o ip6tnl1 -j MAPE-SNAT") == 1 and count(save, "-j MAPE-MSS") == 1, save
        assert len(sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203").splitlines()) == 2  # + unreachable

        assert "dev ppp0" not in sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203")
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


def conntrack_wrong(lab, ipv4: str, ports: set[int], old_ipv4: str | None) -> list[str]:
    """Tracked connections whose mapping is wrong: NATed to the old IPv4, or to a port or ICMP id
    outside the set."""
    wrong = []
    for line in sh(lab.ce, "conntrack", "-L", check=False).splitlines():
        words = line.split()
        if not words or words[0] not in ("tcp", "udp", "icmp"):
            continue
        dsts = [w[4:] for w in words if w.startswith("dst=")]
        key = "id=" if words[0] == "icmp" else "dport="
        port = int([w[len(key) :] for w in words if w.startswith(key)][-1])
        if (old_ipv4 and dsts[-1] == old_ipv4) or (dsts[-1] == ipv4 and port not in ports):
            wrong.append(line)
    return wrong


def test_churn_renumbering_flushes_and_reloads_never_send_wrong_traffic(lab, tmp_path):
    """Continuous TCP, UDP and ICMP from the LAN while the prefix changes (IPv4 kept and PSID
    changed, then both changed), our nat chains are flushed and the config is reloaded: the BR
    never sees a wrong source or a port outside the set, and no connection keeps an old mapping."""
    first = lab.ce_params()
    chains = [lab.br_add_ce(first)]
    cfg = tmp_path / "mape.toml"
    cfg.write_text(CONFIG.replace("sync_interval = 5", "sync_interval = 3"))
    env = {**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run")}
    log_path, counts, stop = tmp_path / "daemon.log", tmp_path / "churn.json", tmp_path / "stop-churn"
    with open(log_path, "wb") as log:
        proc = popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg),
                     stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    churn = None
    try:
        wait_for(lambda: tunnel_local(lab) == first.ce_draft03, 120, "the first sync")
        wait_for(lambda: "mape" in sh(lab.ce, "nft", "list", "tables"), 30, "the guard")
        churn = spawn(lab.lan, traffic.churn, SERVER, str(counts), str(stop))

        def served_from(ce) -> bool:
            log = traffic.read_log(lab.server_log)[-20:]
            return any(e["src"] == ce.ipv4 and e["sport"] in ce.ports() for e in log if e["proto"] == "udp")

        wait_for(lambda: served_from(first), 60, "churn through the first mapping")
        same_ipv4 = lab.ce_params("2400:4050:1234:5700::/56")
        assert (same_ipv4.ipv4, same_ipv4.psid) == (first.ipv4, 23)
        chains.append(lab.br_add_ce(same_ipv4))
        lab.renumber("2400:4050:1234:5700::/64")
        wait_for(lambda: tunnel_local(lab) == same_ipv4.ce_draft03, 60, "the move to PSID 23")
        wait_for(lambda: not conntrack_wrong(lab, same_ipv4.ipv4, same_ipv4.ports(), None), 30, "old ports gone")
        wait_for(lambda: served_from(same_ipv4), 60, "churn through PSID 23")

        moved = lab.ce_params("2400:4050:1234:9a00::/56")
        chains.append(lab.br_add_ce(moved))
        lab.renumber("2400:4050:1234:9a00::/64")
        wait_for(lambda: tunnel_local(lab) == moved.ce_draft03, 60, "the move to a new IPv4")
        wait_for(lambda: not conntrack_wrong(lab, moved.ipv4, moved.ports(), first.ipv4), 30, "the old IPv4 gone")
        wait_for(lambda: served_from(moved), 60, "churn through the new IPv4")

        for proto in ("TCP", "UDP", "ICMP"):
            sh(lab.ce, "iptables", "-t", "nat", "-F", f"MAPE-SNAT-{proto}")
        snat = lambda: sh(lab.ce, "iptables-save", "-t", "nat").count(f"--to-source {moved.ipv4}:")  # noqa: E731
        wait_for(lambda: snat() == OCN_SNAT_RULES, 60, "the periodic sync to restore SNAT")
        cfg.write_text(CONFIG.replace("sync_interval = 5", "sync_interval = 3") + "[tunnel]\nmtu = 1400\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "mtu 1400" in sh(lab.ce, "ip", "link", "show", "ip6tnl1"), 30, "the reload")
        wait_for(lambda: served_from(moved), 60, "churn after the repair and the reload")
        stop.touch()
        os.waitpid(churn, 0)
        churn = None
        assert not conntrack_wrong(lab, moved.ipv4, moved.ports(), first.ipv4)
        for chain in chains:
            assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}, chain
        seen = json.loads(counts.read_text())
        assert min(seen["tcp_ok"], seen["udp_ok"], seen["icmp_ok"]) > 10, seen
    finally:
        if churn is not None:
            stop.touch()
            os.waitpid(churn, 0)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    assert rc == 0, log_path.read_text()


def test_ppp0_down_while_the_tunnel_is_deleted_is_repaired_at_once_without_an_error(lab, tmp_path):
    """pppd's states are states: ppp0 present but down (as while pppd negotiates or between its
    retries) leaves table 10 unreachable with no failing sync; a tunnel deleted meanwhile comes
    back by its event, and no ERROR line is written. Before: the table-10 route via the down ppp0
    failed with ENETDOWN, every sync failed and backed off, and the repair waited."""
    d = Daemon(lab, tmp_path, CONFIG + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\n').start()
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        lab.start_pppoe()
        wait_for(lab.ppp_up, 60, "ppp0")
        via_ppp = lambda: f"dev {lab.ppp}" in sh(lab.ce, "ip", "route", "show", "table", "10")  # noqa: E731
        wait_for(via_ppp, 30, "table 10 via ppp0")

        sh(lab.ce, "ip", "link", "set", lab.ppp, "down")
        sh(lab.ce, "ip", "link", "del", "ip6tnl1")
        wait_for(lambda: d.logged("tunnel ip6tnl1 recreated with its addresses and routes: it was missing"), 30,
                 "the tunnel back by its event")  # fmt: skip
        d.wait_state("ok", True)
        assert not via_ppp() and "unreachable default" in sh(lab.ce, "ip", "route", "show", "table", "10")
        sh(lab.ce, "ip", "link", "set", lab.ppp, "up")  # IPCP done again: it carries traffic
        wait_for(via_ppp, 30, "table 10 via ppp0 again")
    finally:
        assert d.stop() == 0, d.text()
    assert "ERROR" not in d.text() and "Traceback" not in d.text(), d.text()
