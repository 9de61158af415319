"""Beside Debian's NetworkManager (1.42) and systemd-networkd (252), each managing the router: this
system itself is the router here (they manage only their own namespace), and the packaged service
runs in it. Each step first shows that the manager removed our state (the repair line names it),
then its repair by the rtnetlink event (latency printed, a figure, not an assertion), and the
data path through the strict BR; the objects of other programs are unchanged at the end."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.kernel.conftest import running_lab
from tests.kernel.systemd.conftest import CONF, journal, run, use_namespace
from tests.lab import checks
from tests.lab.netns import sh
from tests.lab.topo import wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\n[daemon]\nsync_interval = 3600\n'
NETWORK = Path("/etc/systemd/network")


def repairs() -> list[str]:
    """The daemon's repair lines so far: each names what was missing."""
    return [line for line in journal("-o", "cat").splitlines() if "it was missing" in line]


def synced_after(what: str) -> None:
    """Ask the daemon for a sync (SIGHUP) and wait until one that started after asking is done:
    whatever a manager removed before now is repaired, and said, by then."""
    t = time.time()
    run("systemctl", "reload", "mape-daemon")
    wait_for(lambda: status().get("last_sync", 0) > t, 60, f"the daemon's sync after {what}")


def act(action: list[str], removes: bool, settled: Callable[[], object] = lambda: True) -> None:
    """Run a manager's `action`. When it `removes` our state, wait for the repair (its lines name
    what was missing, the latency printed: a figure, not an assertion). Either way, once
    `settled` says the manager is done, a sync asked for after that says whether anything of ours
    had gone: it must match `removes`."""
    n, what = len(repairs()), " ".join(action)
    t0 = time.monotonic()
    run(*action)
    if removes:
        wait_for(lambda: len(repairs()) > n, 60, f"the repair after {what}")
        print(f"{what}: restored {time.monotonic() - t0:.2f} s later")
    wait_for(settled, 60, f"the manager done with {what}")
    synced_after(what)
    new = repairs()[n:]
    print(f"{what}: " + ("; ".join(new) or "our state left alone"))
    assert bool(new) == removes, (what, new)


def nm_running() -> bool:
    return run("nmcli", "-t", "-f", "RUNNING", "general", check=False).strip() == "running"


def configured() -> bool:
    """networkd is done with both links (one it is still configuring says "configuring")."""
    return all("configured" in run("networkctl", "status", link, check=False) for link in ("wan0", "lan0"))


def keyfile(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)  # NM ignores keyfiles others can read


def status() -> dict:
    return json.loads(run("mape-daemon", "status", "--json"))


def start_service() -> None:
    CONF.write_text(CONFIG)
    use_namespace(None)
    run("systemctl", "start", "mape-daemon")


def stop_service() -> None:
    run("systemctl", "stop", "mape-daemon", check=False)


def test_networkmanager_reapply_flap_a_stray_profile_and_its_pppoe(package, tmp_path, request):
    """N1-N4: NM (1.42) leaves a configured WAN alone when it starts, then removes addresses it did
    not configure (our CE /128) when a profile is activated, on reapply and when the link comes
    back up; our conf drop-in keeps the tunnel unmanaged even with a profile for it; NM
    leaves untracked rules and table 10 alone; an NM PPPoE connection gets our table-10 route, and
    loses it (fail closed) when it goes down."""
    Path("/etc/NetworkManager/conf.d/99-lab.conf").write_text(
        "[device-lab]\nmatch-device=interface-name:wan0;interface-name:lan0\nmanaged=1\n"  # veths: unmanaged by udev
    )
    profiles = Path("/etc/NetworkManager/system-connections")
    keyfile(profiles / "wan.nmconnection", "[connection]\nid=wan\ntype=ethernet\ninterface-name=wan0\n"
            "[ipv4]\nmethod=disabled\n[ipv6]\nmethod=auto\naddr-gen-mode=eui64\n")  # fmt: skip
    keyfile(profiles / "lan.nmconnection", "[connection]\nid=lan\ntype=ethernet\ninterface-name=lan0\n"
            "[ipv4]\nmethod=manual\naddress1=192.168.1.1/24\n[ipv6]\nmethod=disabled\n")  # fmt: skip
    with running_lab(tmp_path, request, root=True) as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        try:
            start_service()  # first, on the kernel's own SLAAC address: NM then takes over a WAN with our /128
            checks.data_path(lab, ce, chain)
            run("systemctl", "unmask", "NetworkManager.service")
            act(["systemctl", "start", "NetworkManager.service"], False, nm_running)  # N1: a configured WAN is left
            act(["nmcli", "con", "up", "wan"], True)  # NM takes the WAN over, and drops our /128 doing so
            wait_for(lambda: [a for a in lab.wan_addresses() if not a["tentative"]], 60, "NM's SLAAC address")
            checks.data_path(lab, ce, chain)
            before = checks.foreign(None)
            rules = (sh(None, "ip", "rule"), sh(None, "ip", "route", "show", "table", "10"))
            for action in (["nmcli", "device", "reapply", "wan0"],
                           ["sh", "-c", "ip link set wan0 down && ip link set wan0 up"],
                           ["sh", "-c", "nmcli con down wan && nmcli con up wan"]):  # fmt: skip
                act(action, True)  # each configures the WAN again: addresses NM did not make go
            assert ce.ce_draft03 in sh(None, "ip", "-6", "addr", "show", "dev", "wan0")
            assert run("nmcli", "-g", "GENERAL.STATE", "device", "show", "ip6tnl1").strip() == "10 (unmanaged)"
            assert status()["managers"]["networkmanager"] == {"wan": True, "tunnel": False}
            checks.data_path(lab, ce, chain)

            local = sh(None, "ip", "-d", "link", "show", "ip6tnl1")  # N2: a stray profile for our tunnel
            run("nmcli", "con", "add", "type", "ip-tunnel", "ifname", "ip6tnl1", "con-name", "stray",
                "ip-tunnel.mode", "ip6ip6", "ip-tunnel.parent", "wan0", "ip-tunnel.remote", "2001:db8::1",
                "ipv4.method", "disabled", "ipv6.method", "disabled")  # fmt: skip
            up = subprocess.run(["nmcli", "con", "up", "stray"], capture_output=True, text=True, timeout=120)
            assert up.returncode != 0, up.stdout  # NM will not take the device: managed=0 holds
            assert run("nmcli", "-g", "GENERAL.STATE", "device", "show", "ip6tnl1").strip() == "10 (unmanaged)"
            assert sh(None, "ip", "-d", "link", "show", "ip6tnl1") == local

            run("nmcli", "device", "reapply", "wan0")  # N3: rules and table 10 are not NM's to prune
            run("systemctl", "restart", "NetworkManager.service")
            wait_for(lambda: run("nmcli", "-g", "GENERAL.STATE", "device", "show", "wan0").startswith("100"), 60,
                     "NM back")  # fmt: skip
            assert (sh(None, "ip", "rule"), sh(None, "ip", "route", "show", "table", "10")) == rules
            checks.data_path(lab, ce, chain)
            assert checks.foreign(None)["rules"] == before["rules"]

            lab.start_pppoe_server()  # N4: NetworkManager's own PPPoE connection
            run("nmcli", "con", "add", "type", "pppoe", "ifname", "ppp0", "con-name", "ppp", "pppoe.parent",
                "wan0", "username", "lab", "password", "lab", "ipv4.never-default", "yes", "ipv6.method",
                "disabled", "connection.autoconnect", "no")  # fmt: skip
            for _ in range(2):
                up = subprocess.run(["nmcli", "con", "up", "ppp"], capture_output=True, text=True, timeout=120)
                assert up.returncode == 0, up.stderr + run("journalctl", "-u", "NetworkManager", "-n", "60")
                t0 = time.monotonic()
                wait_for(lambda: "dev ppp0" in sh(None, "ip", "route", "show", "table", "10"), 60, "table 10 via ppp0")
                print(f"table 10 via ppp0 {time.monotonic() - t0:.2f} s after NM brought it up")
                run("nmcli", "con", "down", "ppp")
                wait_for(lambda: "unreachable default" in sh(None, "ip", "route", "show", "table", "10"), 30,
                         "table 10 failing closed again")  # fmt: skip
            checks.data_path(lab, ce, chain)
        finally:
            stop_service()
            run("nmcli", "con", "delete", "wan", "lan", "stray", "ppp", check=False)
            for f in profiles.glob("*.nmconnection"):
                f.unlink()
            run("systemctl", "stop", "NetworkManager.service", check=False)
            Path("/etc/NetworkManager/conf.d/99-lab.conf").unlink()


def test_networkd_reconfigure_restart_opt_in_and_a_catch_all(package, tmp_path, request):
    """S1: networkd (252) drops foreign addresses on the links it configures and every foreign rule
    whenever it configures a link (start, reconfigure, restart; a reload with unchanged files
    configures nothing): each is back at once. S3: our .network keeps the tunnel
    unmanaged before a catch-all. S2: the documented opt-in drop-in stops the churn."""
    NETWORK.mkdir(parents=True, exist_ok=True)
    (NETWORK / "10-wan.network").write_text(
        "[Match]\nName=wan0\n[Network]\nIPv6AcceptRA=yes\nLinkLocalAddressing=ipv6\n"
    )
    (NETWORK / "11-lan.network").write_text("[Match]\nName=lan0\n[Network]\nAddress=192.168.1.1/24\n"
                                            "LinkLocalAddressing=no\n")  # fmt: skip
    dropin = Path("/etc/systemd/networkd.conf.d/mape-daemon.conf")
    with running_lab(tmp_path, request, root=True) as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        try:
            start_service()  # first: networkd then configures links where our state already is
            checks.data_path(lab, ce, chain)
            run("systemctl", "unmask", "systemd-networkd.service", "systemd-networkd.socket")  # the lab masks it
            act(["systemctl", "start", "systemd-networkd.service"], True, configured)  # S1
            checks.data_path(lab, ce, chain)
            before = checks.foreign(None)
            act(["networkctl", "reload"], False, configured)  # unchanged files: nothing is configured
            act(["networkctl", "reconfigure", "wan0"], True, configured)
            act(["systemctl", "restart", "systemd-networkd.service"], True, configured)
            assert "proto 203" in sh(None, "ip", "rule")
            checks.data_path(lab, ce, chain)

            (NETWORK / "99-all.network").write_text("[Match]\nName=*\n[Network]\nDHCP=yes\n")  # S3
            tunnel = sh(None, "ip", "addr", "show", "ip6tnl1")
            tunnel_repairs = len([r for r in repairs() if "ip6tnl1" in r])
            run("networkctl", "reload")
            wait_for(lambda: "unmanaged" in run("networkctl", "status", "ip6tnl1", check=False), 30, "unmanaged")
            assert status()["managers"]["networkd"] == {"wan": "configured", "tunnel": "unmanaged"}
            assert sh(None, "ip", "addr", "show", "ip6tnl1") == tunnel
            assert len([r for r in repairs() if "ip6tnl1" in r]) == tunnel_repairs
            (NETWORK / "99-all.network").unlink()
            run("networkctl", "reload")

            dropin.parent.mkdir(parents=True, exist_ok=True)  # S2: the opt-in, as the README gives it
            dropin.write_text("[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n")
            (NETWORK / "10-wan.network").write_text((NETWORK / "10-wan.network").read_text()
                                                    + "KeepConfiguration=static\n")  # fmt: skip
            run("systemctl", "restart", "systemd-networkd.service")
            wait_for(configured, 60, "networkd back")
            synced_after("networkd's restart with the opt-in")
            # networkd may still drop its own SLAAC address: the hold-down covers it.
            act(["networkctl", "reconfigure", "wan0"], False, configured)
            act(["systemctl", "restart", "systemd-networkd.service"], False, configured)
            checks.data_path(lab, ce, chain)
            assert checks.foreign(None)["rules"] == before["rules"]
        finally:
            stop_service()
            run("systemctl", "stop", "systemd-networkd.service", "systemd-networkd.socket", check=False)
            for f in ("10-wan.network", "11-lan.network", "99-all.network"):
                (NETWORK / f).unlink(missing_ok=True)
            dropin.unlink(missing_ok=True)
