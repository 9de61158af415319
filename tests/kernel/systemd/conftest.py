"""The Debian package, installed once per boot, and the service's unit, journal and state."""

from __future__ import annotations

import glob
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFIG = '[wan]\ninterface = "wan0"\n'
CONF = Path("/etc/mape-daemon/mape.toml")
DROPIN = Path("/etc/systemd/system/mape-daemon.service.d")


def run(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def active(unit: str = "mape-daemon") -> str:
    return run("systemctl", "is-active", unit, check=False).strip()


def show(prop: str) -> str:
    return run("systemctl", "show", "-p", prop, "--value", "mape-daemon").strip()


SINCE = [0.0]  # the journal from the current test's start of the service on


def journal(*args: str) -> str:
    return run("journalctl", "-u", "mape-daemon", "--no-pager", f"--since=@{SINCE[0]:.0f}", *args, check=False)


@pytest.fixture(scope="session")
def package():
    (deb,) = glob.glob(str(ROOT / "dist" / "mape-daemon_*.deb"))
    run("dpkg", "-i", deb)
    assert active() == "inactive"  # installed, not started: the example config names eth0
    assert CONF.exists()
    for shipped in ("/usr/lib/firewalld/zones/mape.xml", "/usr/lib/firewalld/policies/mape-lan-to-mape.xml",
                    "/usr/lib/NetworkManager/conf.d/90-mape-daemon.conf",
                    "/usr/lib/systemd/network/05-mape-daemon-tunnel.network",
                    "/usr/share/mape-daemon/miniupnpd/mape-daemon.conf",
                    "/usr/lib/mape-daemon/miniupnpd-nft-chains"):  # fmt: skip
        assert Path(shipped).exists(), shipped
    return deb


def use_namespace(ns: str | None, extra: str = "") -> None:
    """Run the service in `ns` (the lab router; None: this system's own namespace), with optional
    extra [Service] lines; the journal this test reads starts now."""
    DROPIN.mkdir(parents=True, exist_ok=True)
    where = f"NetworkNamespacePath=/run/netns/{ns}\n" if ns else ""
    (DROPIN / "lab.conf").write_text(f"[Service]\n{where}{extra}")
    run("systemctl", "daemon-reload")
    run("systemctl", "reset-failed", "mape-daemon", check=False)
    time.sleep(1)
    SINCE[0] = time.time()
