"""The Debian package under systemd, in a lab VM booted with systemd as PID 1.

The service runs in the lab router's namespace (a drop-in sets NetworkNamespacePath=), so it
meets the simulated ISP exactly as it would meet a real WAN, under the unit's whole sandbox.
The tests run in this file's order in one boot: the first needs a kernel that has not loaded
ip6_tunnel yet.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.kernel.conftest import running_lab
from tests.kernel.systemd.conftest import CONF, CONFIG, active, journal, run, show, use_namespace
from tests.lab import traffic
from tests.lab.netns import call, sh
from tests.lab.topo import LAN_CLIENT, SERVER, wait_for


def records_now() -> list[dict]:
    return [json.loads(line) for line in journal("-o", "json").splitlines()]


def test_a_kernel_without_ip6tnl_fails_once_with_69_and_no_restart_loop(package, tmp_path):
    subprocess.run(["modprobe", "-r", "ip6_tunnel"], capture_output=True)  # earlier tests in this boot loaded it
    assert "ip6_tunnel" not in Path("/proc/modules").read_text(), "precondition: ip6_tunnel still loaded"
    Path("/etc/modprobe.d/no-ip6tnl.conf").write_text("install ip6_tunnel /bin/false\n")
    ns = f"noip6-{tmp_path.name[-6:]}"
    try:
        sh(None, "ip", "netns", "add", ns)
        sh(None, "ip", "link", "add", "wan0", "netns", ns, "type", "veth", "peer", "x0", "netns", ns)
        sh(ns, "ip", "link", "set", "wan0", "up")
        sh(ns, "ip", "-6", "addr", "add", "2400:4050:1234:5600::10/64", "dev", "wan0", "nodad")
        CONF.write_text(CONFIG)
        use_namespace(ns)
        r = subprocess.run(["systemctl", "start", "mape-daemon"], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        # "failed" is final: a unit that is to be restarted is "activating (auto-restart)" instead.
        wait_for(lambda: active() == "failed", 30, "the unit to fail for good")
        state = (active(), show("ExecMainStatus"), show("NRestarts"))
        assert state == ("failed", "69", "0"), (state, journal())
        assert "this host cannot run mape-daemon" in journal() and "no ip6tnl support" in journal()
    finally:
        Path("/etc/modprobe.d/no-ip6tnl.conf").unlink()
        run("systemctl", "reset-failed", "mape-daemon", check=False)
        sh(None, "ip", "netns", "del", ns, check=False)


def test_package_installs_starts_reloads_logs_and_stops_clean(package, tmp_path, request):
    security = run("systemd-analyze", "security", "--no-pager", "mape-daemon", check=False)
    exposure = float(security.splitlines()[-1].split("level for mape-daemon.service:")[1].split()[0])
    assert exposure <= 2.5, security.splitlines()[-1]
    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        lab.br_add_ce(ce)
        CONF.write_text(CONFIG)
        use_namespace(lab.ce)
        try:
            run("systemctl", "start", "mape-daemon")  # Type=notify: returns once READY=1 came
            assert active() == "active"
            status = run("systemctl", "status", "--no-pager", "mape-daemon", check=False)
            assert f'Status: "ocn {ce.ipv4} psid {ce.psid}, 1008 ports, tunnel up"' in status, status
            answer = call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0]
            assert answer.split()[0] == ce.ipv4

            run("systemctl", "reload", "mape-daemon")  # returns once READY=1 follows the reload's sync
            assert active() == "active"
            assert "applied" in journal()

            sh(lab.ce, "ip", "link", "del", "ip6tnl1")
            wait_for(lambda: "recreated" in journal(), 60, "the repair")
            records = [json.loads(line) for line in journal("-o", "json").splitlines()]
            start = [r for r in records if r.get("MAPE_EVENT") == "start"]
            assert start and start[0]["MAPE_IPV4"] == ce.ipv4 and start[0]["MAPE_PSID"] == str(ce.psid)
            repair = [r for r in records if r.get("MAPE_EVENT") == "repair"]
            assert repair and repair[0]["MAPE_CAUSE"] == "event" and "ip6tnl1" in repair[0]["MESSAGE"]
            assert repair[0]["MESSAGE"].startswith("tunnel ip6tnl1")  # the level is PRIORITY, not "INFO:mape-daemon:"
            assert repair[0]["MAPE_TRIGGER"] == "netlink" and start[0]["MAPE_PREFIX"] == ce.prefix56

            # Another program's default in our slot (pppd's replacedefaultroute): a conflict, said
            # once, and "conflict resolved" when it goes (our route back).
            sh(lab.ce, "ip", "route", "replace", "default", "via", LAN_CLIENT, "dev", "lan0", "metric", "0")
            wait_for(lambda: "conflict: route slot taken" in journal(), 60, "the conflict")
            sh(lab.ce, "ip", "route", "del", "default", "via", LAN_CLIENT, "dev", "lan0", "metric", "0")
            wait_for(lambda: "conflict resolved: route slot taken" in journal(), 60, "the conflict resolved")
            assert "proto 203" in sh(lab.ce, "ip", "route", "show", "default")

            # The WAN prefix gone: held, then torn down when the default 10 s hold-down ends, and a
            # prefix-change when it is back.
            sh(lab.ce, "ip", "link", "set", "wan0", "down")
            wait_for(lambda: "MAP-E off" in journal(), 60, "the end of the hold-down")
            sh(lab.ce, "ip", "link", "set", "wan0", "up")
            wait_for(lambda: any(r.get("MAPE_EVENT") == "prefix-change" for r in records_now()), 120, "the prefix back")
        finally:
            run("systemctl", "stop", "mape-daemon", check=False)
        assert active() == "inactive" and show("ExecMainStatus") == "0"
        assert "stopped: removed" in journal()
        said = {e: [r for r in records_now() if r.get("MAPE_EVENT") == e] for e in
                ("conflict", "hold", "teardown", "prefix-change", "stop")}  # fmt: skip
        assert [r["MESSAGE"].split(":")[0] for r in said["conflict"]] == ["conflict", "conflict resolved"], said
        assert len(said["hold"]) == 1 and "prefix gone from wan0" in said["hold"][0]["MESSAGE"]
        assert said["teardown"][0]["MAPE_CAUSE"] == "hold-down" and "MAP-E off" in said["teardown"][0]["MESSAGE"]
        back = said["prefix-change"][0]
        assert (back["MAPE_CAUSE"], back["MAPE_TRIGGER"], back["MAPE_PREFIX"]) == ("event", "netlink", ce.prefix56)
        assert said["stop"] and said["stop"][-1]["MAPE_CAUSE"] == "stop"
        assert "ip6tnl1" not in sh(lab.ce, "ip", "link")
        assert "MAPE-" not in sh(lab.ce, "iptables-save")


def test_a_sync_wedged_in_a_child_is_restarted_by_the_watchdog(package, tmp_path, request):
    """Before: the loop pinged the watchdog however long a sync had been stuck."""
    save = Path("/usr/sbin/iptables-nft-save")
    real = save.resolve()
    wedge = Path("/run/mape-wedge")
    with running_lab(tmp_path, request) as lab:
        lab.br_add_ce(lab.ce_params())
        CONF.write_text(CONFIG + '[firewall]\nbackend = "iptables-nft"\n[daemon]\nsync_interval = 2\n')
        use_namespace(lab.ce, "WatchdogSec=6\nRestartSec=1\n")
        save.unlink()  # the overlay root is a throw-away copy: a hanging iptables-nft-save
        # xtables-nft-multi picks the tool by its first argument when not called by a tool's name.
        save.write_text(f'#!/bin/sh\nwhile [ -e {wedge} ]; do sleep 1; done\nexec {real} iptables-save "$@"\n')
        save.chmod(0o755)
        try:
            run("systemctl", "start", "mape-daemon")
            wedge.touch()
            # Another program's nf_tables commit: the next sync must read our chains again, and
            # that read (an iptables-nft-save) hangs. (Our own commits no longer make it read.)
            sh(lab.ce, "nft", "add", "table", "inet", "someone-else")
            wait_for(lambda: int(show("NRestarts") or 0) >= 1, 120, "the watchdog to restart the service")
            assert "Watchdog timeout" in run("journalctl", "--no-pager", check=False)
            wedge.unlink()
            wait_for(lambda: active() == "active" and "tunnel up" in show("StatusText"), 120, "recovery")
        finally:
            wedge.unlink(missing_ok=True)
            run("systemctl", "stop", "mape-daemon", check=False)
            save.unlink()
            save.symlink_to(real)
        assert "ip6tnl1" not in sh(lab.ce, "ip", "link")


def test_legacy_backend_and_pppoe_under_the_full_sandbox(package, tmp_path, request):
    """python-iptables (ctypes) under MemoryDenyWriteExecute, the rp_filter write under
    ProtectKernelTunables, and a conntrack cleanup over netlink, all inside the unit's sandbox."""
    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        lab.br_add_ce(ce)
        lab.sysctl(lab.ce, {"net.ipv4.conf.default.rp_filter": "1"})
        lab.start_pppoe()
        wait_for(lab.ppp_up, 60, "ppp0")
        CONF.write_text(CONFIG + '[lan]\ninterfaces = ["lan0"]\n[firewall]\nbackend = "iptables-legacy"\n'
                        '[pppoe]\nhosts = ["192.168.1.55/32"]\n')  # fmt: skip
        use_namespace(lab.ce)
        try:
            run("systemctl", "start", "mape-daemon")
            assert active() == "active"
            assert sh(lab.ce, "cat", "/proc/sys/net/ipv4/conf/ppp0/rp_filter").strip() == "2"
            assert "MAPE-SNAT-TCP" in sh(lab.ce, "iptables-legacy-save", "-t", "nat")
            assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == ce.ipv4
            lab.renumber("2400:4050:1234:9a00::/64")
            moved = lab.ce_params()
            lab.br_add_ce(moved)
            wait_for(lambda: "moved to" in journal(), 60, "the move")
            wait_for(lambda: ce.ipv4 not in sh(lab.ce, "conntrack", "-L", check=False), 30, "old connections gone")
            assert "Traceback" not in journal() and "error" not in show("StatusText")
        finally:
            run("systemctl", "stop", "mape-daemon", check=False)
        assert show("ExecMainStatus") == "0" and "MAPE-" not in sh(lab.ce, "iptables-legacy-save")


def test_a_first_sync_that_keeps_failing_is_not_a_start_timeout_restart_loop(package, tmp_path, request):
    """Before: READY=1 waited for a successful sync, so a first sync that kept failing (here:
    another device holds the tunnel's name) hit the start timeout: systemd stopped the unit (our
    teardown ran), restarted it, and so on every ~95 s. Now the unit is up after the first
    attempt, says the error in its status and retries until the obstacle goes."""
    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        lab.br_add_ce(ce)
        sh(lab.ce, "ip", "link", "add", "ip6tnl1", "type", "veth", "peer", "name", "ip6tnl1p")
        CONF.write_text(CONFIG)
        use_namespace(lab.ce, "TimeoutStartSec=10\n")
        try:
            run("systemctl", "start", "mape-daemon")  # returns once the first attempt is done
            assert active() == "active"
            assert "exists and is veth" in show("StatusText"), show("StatusText")
            # Failures at 0, 1, 3, 7, 15 s and on: the fifth is past the start timeout.
            wait_for(lambda: journal().count("exists and is veth") >= 5, 120, "five failed attempts")
            assert (active(), show("NRestarts")) == ("active", "0"), journal()
            sh(lab.ce, "ip", "link", "del", "ip6tnl1")  # the obstacle goes: the next attempt maps
            wait_for(lambda: "tunnel up" in show("StatusText"), 90, "the mapping")
            assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4
        finally:
            run("systemctl", "stop", "mape-daemon", check=False)
            use_namespace(lab.ce)
