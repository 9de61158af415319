"""UPnP that tells the truth, as a user sets it up: Debian's miniupnpd.service with the drop-in the
package ships, beside the packaged mape-daemon (upnp.enabled), both in the lab router's namespace.
A LAN client's upnpc (miniupnpc) gets ports of the set, reachable from the internet through the
strict BR, and UPnP error 606 for the others (NAT-PMP: a port of the set instead); a renumbering
restarts miniupnpd on the new address with no mapping of the old set left; while mape-daemon is
stopped miniupnpd grants nothing, and it is in step again when mape-daemon is back."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

from tests.kernel.conftest import running_lab
from tests.kernel.systemd.conftest import CONF, CONFIG, active, journal, run, use_namespace
from tests.kernel.test_forwards_lab import reach
from tests.lab import traffic
from tests.lab.netns import call, sh, spawn
from tests.lab.topo import LAN_GW, wait_for

DROPIN = Path("/etc/systemd/system/miniupnpd.service.d")
BASE = Path("/etc/miniupnpd/miniupnpd.conf")
IGD = f"http://{LAN_GW}:5000/rootDesc.xml"  # a fixed HTTP port: the other calls skip the SSDP search
APP = 9000  # the LAN client's service


def upnpc(lab, *args: str, discover: bool = False) -> str:
    """upnpc in the LAN; `discover`: find the IGD by SSDP multicast, as a console does."""
    where = [] if discover else ["-u", IGD]
    r = subprocess.run(["ip", "netns", "exec", lab.lan, "upnpc", *where, *args], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    return f"rc={r.returncode}\n{r.stdout}{r.stderr}"


def granted(out: str, ipv4: str) -> int | None:
    """The external port a successful add reports (None: refused)."""
    m = re.search(rf"external {re.escape(ipv4)}:(\d+) TCP is redirected", out)
    return int(m.group(1)) if m else None


def natpmp_map(gateway: str, internal: int, suggested: int) -> tuple[int, int]:
    """RFC 6886 TCP mapping request: (result code, the external port granted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(struct.pack("!BBHHHI", 0, 2, 0, internal, suggested, 3600), (gateway, 5351))
        _version, _op, result, _epoch, _internal, external, _life = struct.unpack("!BBHIHHI", s.recv(16))
    return result, external


def mappings(lab) -> list[str] | None:
    """The IGD's port mappings (None: no IGD answered, as while miniupnpd restarts)."""
    out = upnpc(lab, "-l")
    head = "i protocol exPort->inAddr:inPort"
    return [line for line in out.split(head)[1].splitlines() if "->" in line] if head in out else None


def miniupnpd_beside_us(ns: str, lan_if: str) -> None:
    """What the README tells a user to do, plus the lab's namespace."""
    BASE.write_text(f"ext_ifname=eth0\nlistening_ip={lan_if}\nport=5000\nenable_natpmp=yes\nsystem_uptime=yes\n"
                    "uuid=3e2a1a3c-0000-4000-8000-000000000001\n"
                    "allow 1024-65535 192.168.1.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n")  # fmt: skip
    DROPIN.mkdir(parents=True, exist_ok=True)
    shutil.copy("/usr/share/mape-daemon/miniupnpd/mape-daemon.conf", DROPIN / "mape-daemon.conf")
    (DROPIN / "lab.conf").write_text(f"[Service]\nNetworkNamespacePath=/run/netns/{ns}\n")
    run("systemctl", "daemon-reload")


def test_upnp_grants_only_ports_of_the_set_and_follows_a_renumbering(package, tmp_path, request):
    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "app.jsonl"), "0.0.0.0", APP))
        CONF.write_text(CONFIG + f'[lan]\ninterfaces = ["{lab.lan_if}"]\n[upnp]\nenabled = true\n'
                        "[daemon]\nhold_down = 0\n")  # fmt: skip
        use_namespace(lab.ce)
        miniupnpd_beside_us(lab.ce, lab.lan_if)
        try:
            assert run("systemctl", "start", "miniupnpd", check=False) == "" and active("miniupnpd") == "inactive"
            run("systemctl", "start", "mape-daemon")  # READY=1: the first sync, and miniupnpd's file, are done
            assert "miniupnpd config written to /run/mape-daemon/miniupnpd.conf" in journal()
            run("systemctl", "start", "miniupnpd")
            assert active("miniupnpd") == "active"

            ports = sorted(ce.ports())
            outside = next(p for p in range(20000, 65536) if p not in ce.ports())
            out = upnpc(lab, "-r", str(APP), str(ports[50]), "tcp", discover=True)
            assert f"Found valid IGD : http://{LAN_GW}:5000/" in out and granted(out, ce.ipv4) == ports[50], out
            assert not reach(lab, ce.ipv4, ports[50]).startswith("error")  # through the BR, to the LAN client
            out = upnpc(lab, "-r", str(APP), str(outside), "tcp")
            assert granted(out, ce.ipv4) is None and "606" in out, out  # refused, as a client can handle
            client = re.search(r"Local LAN ip address : (\S+)", out).group(1)
            out = upnpc(lab, "-n", client, str(APP), str(outside), "tcp")  # IGDv2 AddAnyPortMapping
            other = granted(out, ce.ipv4)
            assert other in ce.ports() and other != ports[50], out  # another port, inside the set
            assert not reach(lab, ce.ipv4, other).startswith("error")
            result, pmp = call(lab.lan, natpmp_map, LAN_GW, APP, ports[60])  # NAT-PMP: the same rules
            assert (result, pmp) == (0, ports[60])
            assert not reach(lab, ce.ipv4, pmp).startswith("error")
            result, pmp = call(lab.lan, natpmp_map, LAN_GW, APP, outside)
            assert result == 0 and pmp in ce.ports(), (result, pmp)  # a port of the set instead
            assert not reach(lab, ce.ipv4, pmp).startswith("error")

            lab.renumber("2400:4050:2234:9a00::/64")  # another PSID: none of the old ports
            moved = lab.ce_params()
            lab.br_add_ce(moved)
            wait_for(lambda: f"miniupnpd restarted, its config changed ({moved.ipv4})" in journal(), 120, "restart")
            wait_for(lambda: f"ExternalIPAddress = {moved.ipv4}" in upnpc(lab, "-s"), 60, "miniupnpd on the new IPv4")
            assert mappings(lab) == []  # none of the old set's
            new = sorted(moved.ports())[7]
            out = upnpc(lab, "-r", str(APP), str(ports[50]), "tcp")
            assert granted(out, moved.ipv4) is None and "606" in out, out  # the old port: not this line's now
            out = upnpc(lab, "-r", str(APP), str(new), "tcp")
            assert granted(out, moved.ipv4) == new, out
            assert not reach(lab, moved.ipv4, new).startswith("error")
            assert lab.br_dropped(chain) == 0

            run("systemctl", "stop", "mape-daemon")  # the mapping goes: miniupnpd stays up and grants nothing
            assert "miniupnpd refuses every request now" in journal()
            wait_for(lambda: mappings(lab) == [], 60, "miniupnpd back, its mappings gone")
            out = upnpc(lab, "-r", str(APP), str(sorted(moved.ports())[9]), "tcp")
            assert active("miniupnpd") == "active" and "606" in out, out
            run("systemctl", "start", "mape-daemon")  # back: the restart finds miniupnpd running
            wait_for(lambda: granted(upnpc(lab, "-r", str(APP), str(new), "tcp"), moved.ipv4) == new, 60, "UPnP back")
        finally:
            run("systemctl", "stop", "mape-daemon", "miniupnpd", check=False)
            shutil.rmtree(DROPIN)
            run("systemctl", "daemon-reload")
        assert "inet miniupnpd" not in sh(lab.ce, "nft", "list", "tables")


def test_after_a_power_cut_with_a_slow_onu_miniupnpd_starts_with_the_first_mapping(package, tmp_path, request):
    """Before: booted without a prefix, mape-daemon wrote no file, systemd skipped miniupnpd for want
    of it, and when the prefix came the try-restart started nothing: UPnP stayed off."""
    with running_lab(tmp_path, request) as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "app.jsonl"), "0.0.0.0", APP))
        sh(lab.ce, "ip", "link", "set", lab.wan, "down")  # the ONU is not up yet: no prefix
        for stale in ("miniupnpd.conf", "miniupnpd.conf.applied"):  # a boot: /run is empty (a tmpfs)
            Path("/run/mape-daemon", stale).unlink(missing_ok=True)
        CONF.write_text(CONFIG + f'[lan]\ninterfaces = ["{lab.lan_if}"]\n[upnp]\nenabled = true\n')
        use_namespace(lab.ce)
        miniupnpd_beside_us(lab.ce, lab.lan_if)
        try:
            run("systemctl", "start", "mape-daemon")
            assert "waiting: no global IPv6 address" in run("systemctl", "show", "-p", "StatusText", "mape-daemon")
            run("systemctl", "start", "miniupnpd")  # what boot does: skipped, the file is not there
            assert active("miniupnpd") == "inactive"
            sh(lab.ce, "ip", "link", "set", lab.wan, "up")  # the ONU comes up: the prefix arrives
            wait_for(lambda: "miniupnpd config written" in journal(), 120, "the first mapping's file")
            assert "ran: systemctl --no-block start miniupnpd.service" in journal()
            wait_for(lambda: active("miniupnpd") == "active", 60, "miniupnpd started")
            port = sorted(ce.ports())[5]
            out = upnpc(lab, "-r", str(APP), str(port), "tcp", discover=True)
            assert granted(out, ce.ipv4) == port, out
            assert not reach(lab, ce.ipv4, port).startswith("error")
            assert lab.br_dropped(chain) == 0
        finally:
            run("systemctl", "stop", "mape-daemon", "miniupnpd", check=False)
            shutil.rmtree(DROPIN)
            run("systemctl", "daemon-reload")
