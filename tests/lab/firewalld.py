"""Debian's own firewalld, run the way netavark's tests run it: its own dbus-daemon and
`firewalld --nofork --nopid --system-config DIR` in the router's network namespace, no systemd.

The configuration folder holds firewalld.conf (the backend under test), the zones and policy the
package ships (packaging/firewalld), and the LAN interface in zone "internal". With
`iptables="legacy"` firewalld runs in a mount namespace whose /etc/alternatives points iptables at
the legacy binaries: the `update-alternatives --set iptables iptables-legacy` of a real host,
without changing the tools the rest of the lab (and our daemon) use.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from jeepney import DBusAddress, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import unwrap_msg

from . import netns
from .topo import wait_for

PROJECT = Path(__file__).resolve().parents[2]
BUS_NAME = "org.fedoraproject.FirewallD1"
ROOT = DBusAddress("/org/fedoraproject/FirewallD1", bus_name=BUS_NAME, interface=BUS_NAME)
ZONE = DBusAddress("/org/fedoraproject/FirewallD1", bus_name=BUS_NAME, interface=f"{BUS_NAME}.zone")
DIRECT = DBusAddress("/org/fedoraproject/FirewallD1", bus_name=BUS_NAME, interface=f"{BUS_NAME}.direct")

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_type="method_call"/><allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/><allow receive_type="method_return"/>
    <allow receive_type="error"/><allow receive_type="signal"/>
  </policy>
</busconfig>
"""


class Firewalld:
    def __init__(self, ns: str, workdir: Path, backend: str = "nftables", iptables: str = "nft", lan: str = "lan0"):
        self.ns, self.dir, self.backend, self.iptables = ns, workdir / "firewalld", backend, iptables
        self.socket = self.dir / "bus"
        self.procs: dict[str, subprocess.Popen] = {}
        conf = self.dir / "etc"
        (conf / "zones").mkdir(parents=True, exist_ok=True)
        (conf / "policies").mkdir(exist_ok=True)
        (conf / "firewalld.conf").write_text(
            f"DefaultZone=public\nFirewallBackend={backend}\nFlushAllOnReload=yes\nCleanupOnExit=yes\n"
            "IPv6_rpfilter=yes\nLogDenied=off\nIndividualCalls=no\n"
        )
        shutil.copy(PROJECT / "packaging/firewalld/zones/mape.xml", conf / "zones")
        shutil.copy(PROJECT / "packaging/firewalld/policies/mape-lan-to-mape.xml", conf / "policies")
        internal = Path("/usr/lib/firewalld/zones/internal.xml").read_text()
        (conf / "zones/internal.xml").write_text(internal.replace("</zone>", f'  <interface name="{lan}"/>\n</zone>'))
        (self.dir / "dbus.conf").write_text(DBUS_CONF.format(socket=self.socket))

    @property
    def env(self) -> dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.socket}"}

    def start(self) -> Firewalld:
        if "dbus" not in self.procs:
            conf = f"--config-file={self.dir / 'dbus.conf'}"
            self.procs["dbus"] = subprocess.Popen(["dbus-daemon", "--nofork", conf])
            wait_for(self.socket.exists, 30, "the bus")
        log = open(self.dir / "firewalld.log", "ab")  # noqa: SIM115 - the process keeps it
        cmd = [
            "firewalld",
            "--nofork",
            "--nopid",
            "--system-config",
            str(self.dir / "etc"),
            "--log-target",
            "console",
            *(["--debug=3"] if os.environ.get("MAPE_LAB_FIREWALLD_DEBUG") else []),
        ]
        if self.iptables == "legacy":
            cmd = ["unshare", "-m", "sh", "-c", f'{self._legacy_alternatives()} && exec "$@"', "sh",
                   "ip", "netns", "exec", self.ns, *cmd]  # fmt: skip
        else:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        self.procs["firewalld"] = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=log, stderr=log,
                                                   stdin=subprocess.DEVNULL)  # fmt: skip
        wait_for(lambda: self.call(ROOT, "getDefaultZone", check=False), 300, "firewalld on the bus")
        return self

    def _legacy_alternatives(self) -> str:
        """Shell that mounts a copy of /etc/alternatives whose iptables tools are the legacy ones."""
        alt = self.dir / "alternatives"
        if not alt.exists():
            shutil.copytree("/etc/alternatives", alt, symlinks=True)
            for tool in ("iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore",
                         "ip6tables-save"):  # fmt: skip
                (alt / tool).unlink(missing_ok=True)
                (alt / tool).symlink_to(f"/usr/sbin/{tool.replace('tables', 'tables-legacy', 1)}")
        return f"mount --make-rprivate / && mount --bind {alt} /etc/alternatives"

    def call(self, address: DBusAddress, method: str, signature: str = "", *args, check: bool = True):
        try:
            with open_dbus_connection(bus=f"unix:path={self.socket}", auth_timeout=10) as bus:
                msg = new_method_call(address, method, signature, args)
                return unwrap_msg(bus.send_and_get_reply(msg, timeout=120))
        except Exception:
            if check:
                raise
            return None

    def reload(self) -> float:
        """firewall-cmd --reload; returns when firewalld says it is done (time.monotonic())."""
        self.call(ROOT, "reload")
        return time.monotonic()

    def stop(self) -> None:
        proc = self.procs.pop("firewalld", None)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # CleanupOnExit=yes: it flushes on the way out
            proc.wait(120)

    def restart(self) -> float:
        self.stop()
        self.start()
        return time.monotonic()

    def zone_of(self, iface: str) -> str:
        return self.call(ZONE, "getZoneOfInterface", "s", iface)[0]

    def firewall_cmd(self, *args: str) -> str:
        """The real command line tool, for the commands our log tells a person to type."""
        return netns.sh(self.ns, "env", f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={self.socket}", "firewall-cmd", *args,
                        timeout=300)  # fmt: skip

    def close(self) -> None:
        self.stop()
        for proc in self.procs.values():
            proc.terminate()
            proc.wait(30)
        self.procs.clear()
