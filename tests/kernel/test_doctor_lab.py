"""`mape-daemon doctor` on the lab router (issue 20): it passes on a working one, and on routers
broken on purpose it names the cause: forwarding off, accept_ra 1, the BR unreachable, pppd's
default route in our slot, a wrong interface-identifier layout (packets go out, nothing back)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.lab.daemon import Daemon
from tests.lab.netns import sh
from tests.lab.topo import SERVER, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[daemon]\nhold_down = 0\n'


def doctor(d: Daemon) -> tuple[int, dict[str, dict]]:
    r = subprocess.run(["ip", "netns", "exec", d.lab.ce, sys.executable, "-m", "mape_daemon", "doctor", "-c",
                        str(d.cfg), "--target", f"{SERVER}:80", "--timeout", "3", "--json"],
                       capture_output=True, text=True, env=d.env, timeout=120)  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] == (r.returncode == 0), (r.returncode, out)
    return r.returncode, {c["name"]: c for c in out["checks"]}


def failing(d: Daemon, *expected: str) -> dict[str, dict]:
    """Doctor's verdict: exactly the `expected` checks fail (the exit status says so too)."""
    rc, checks = doctor(d)
    failed = {n: c["says"] for n, c in checks.items() if c["ok"] is False}
    assert list(failed) == list(expected), failed
    assert (rc != 0) == bool(expected)
    return checks


def test_doctor_passes_on_a_working_router_and_names_each_cause(lab, tmp_path):
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG).start()
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        rc, checks = doctor(d)
        assert rc == 0, checks
        assert checks["prefix"]["says"].startswith(f"{ce.prefix56} from ") and ce.ipv4 in checks["prefix"]["says"]
        assert checks["traffic"]["ok"] and checks["BR"]["ok"] and checks["CE address"]["ok"]

        lab.sysctl(lab.ce, {"net.ipv4.ip_forward": "0"})
        failing(d, "IPv4 forwarding")
        lab.sysctl(lab.ce, {"net.ipv4.ip_forward": "1"})

        lab.sysctl(lab.ce, {"net.ipv6.conf.wan0.accept_ra": "1"})
        failing(d, "router advertisements")
        lab.sysctl(lab.ce, {"net.ipv6.conf.wan0.accept_ra": "2"})

        sh(lab.isp, "ip", "addr", "del", f"{lab.rule.br}/128", "dev", "lo")  # the BR gone
        failing(d, "BR", "traffic")
        sh(lab.isp, "ip", "addr", "add", f"{lab.rule.br}/128", "dev", "lo")

        # pppd's defaultroute in our slot: the daemon leaves it (a conflict), doctor names it.
        sh(lab.ce, "ip", "route", "replace", "default", "dev", "lan0", "metric", "0")
        wait_for(lambda: "route slot taken" in d.text(), 60, "the daemon to see the conflict")
        checks = failing(d, "default route", "traffic")  # our connection leaves by that route, not the tunnel
        assert "nodefaultroute" in checks["default route"]["fix"]
        sh(lab.ce, "ip", "route", "del", "default", "dev", "lan0", "metric", "0")
        wait_for(lambda: "conflict resolved" in d.text(), 60, "the conflict resolved")
        failing(d)
    finally:
        assert d.stop() == 0, d.text()

    # A wrong interface-identifier layout: the BR expects the draft03 CE address.
    (tmp_path / "rfc").mkdir()
    rfc = Daemon(lab, tmp_path / "rfc", CONFIG + '[isp]\nname = "explicit"\n[isp.rule]\n'
                 f'ipv6_prefix = "2400:4050::/34"\nipv4_prefix = "153.240.0.0/16"\nea_len = 22\npsid_offset = 6\n'
                 f'br = "{lab.rule.br}"\niid = "rfc7597"\n')  # fmt: skip
    rfc.start()
    try:
        wait_for(rfc.synced_by_me, 120, "the first sync")
        rc, checks = doctor(rfc)
        assert rc != 0 and checks["traffic"]["ok"] is False, checks
        assert "packets go out, nothing comes back" in checks["traffic"]["says"]
        assert "interface-identifier" in checks["traffic"]["fix"]
    finally:
        assert rfc.stop() == 0, rfc.text()
