"""The Debian package under systemd, in a lab VM booted with systemd as PID 1.

The service runs in the lab router's namespace (a drop-in sets NetworkNamespacePath=), so it
meets the simulated ISP exactly as it would meet a real WAN.
"""

from __future__ import annotations

import glob
import json
import subprocess
from pathlib import Path

from tests.kernel.conftest import running_lab
from tests.lab import traffic
from tests.lab.netns import call, sh
from tests.lab.topo import SERVER, wait_for

ROOT = Path(__file__).resolve().parents[3]
CONFIG = '[wan]\ninterface = "wan0"\n'


def run(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def active(unit: str = "mape-daemon") -> str:
    return run("systemctl", "is-active", unit, check=False).strip()


def test_package_installs_starts_reloads_logs_and_stops_clean(tmp_path, request):
    (deb,) = glob.glob(str(ROOT / "dist" / "mape-daemon_*.deb"))
    run("dpkg", "-i", deb)
    assert active() == "inactive"  # installed, not started: the example config names eth0
    assert Path("/etc/mape-daemon/mape.toml").exists()

    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        lab.br_add_ce(ce)
        Path("/etc/mape-daemon/mape.toml").write_text(CONFIG)
        dropin = Path("/etc/systemd/system/mape-daemon.service.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "lab.conf").write_text(f"[Service]\nNetworkNamespacePath=/run/netns/{lab.ce}\n")
        run("systemctl", "daemon-reload")
        try:
            run("systemctl", "start", "mape-daemon")  # Type=notify: returns once READY=1 came
            assert active() == "active"
            status = run("systemctl", "status", "--no-pager", "mape-daemon", check=False)
            assert f'Status: "ocn {ce.ipv4} psid {ce.psid}, 1008 ports, tunnel up"' in status, status
            answer = call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0]
            assert answer.split()[0] == ce.ipv4

            run("systemctl", "reload", "mape-daemon")
            assert active() == "active"
            wait_for(lambda: "applied" in run("journalctl", "-u", "mape-daemon", "--no-pager"), 30, "the reload")

            records = [json.loads(line) for line in run("journalctl", "-u", "mape-daemon", "-o", "json").splitlines()]
            synced = [r for r in records if r.get("MAPE_EVENT") in ("sync", "prefix-change")]
            assert synced and synced[0]["MAPE_IPV4"] == ce.ipv4 and synced[0]["MAPE_PSID"] == str(ce.psid)

            security = run("systemd-analyze", "security", "--no-pager", "mape-daemon", check=False)
            print(security.splitlines()[-1] if security else "systemd-analyze security: no output")
        finally:
            run("systemctl", "stop", "mape-daemon", check=False)
        assert active() == "inactive"
        assert "ip6tnl1" not in sh(lab.ce, "ip", "link")
        assert "MAPE-" not in sh(lab.ce, "iptables-save")
