"""Which of the host's network managers are running, and whether they manage our interfaces, for
`mape-daemon status` (a one-shot reading on the system bus and in networkd's state files)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

from .firewalld import BUS_NAME as FIREWALLD
from .firewalld import bus_present

NM = "org.freedesktop.NetworkManager"
NM_ROOT = DBusAddress("/org/freedesktop/NetworkManager", bus_name=NM, interface=NM)
NETIF = Path("/run/systemd/netif/links")


def _networkd(ifname: str) -> str | None:
    """networkd's admin state of a link (configured, unmanaged, ...), None where it does not run."""
    try:
        index = socket.if_nametoindex(ifname)
        text = (NETIF / str(index)).read_text()
    except OSError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return fields.get("ADMIN_STATE")


def detect(wan: str, tunnel: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "networkd": {"wan": _networkd(wan), "tunnel": _networkd(tunnel)} if NETIF.exists() else None,
        "networkmanager": None,
        "firewalld_running": False,
    }
    if not bus_present():
        return out
    try:
        with open_dbus_connection(bus="SYSTEM", auth_timeout=2) as bus:

            def call(address, method, signature="", *args):
                return unwrap_msg(bus.send_and_get_reply(new_method_call(address, method, signature, args), timeout=2))

            out["firewalld_running"] = call(message_bus, "NameHasOwner", "s", FIREWALLD)[0]
            if call(message_bus, "NameHasOwner", "s", NM)[0]:
                managed = {}
                for role, name in (("wan", wan), ("tunnel", tunnel)):
                    try:
                        (path,) = call(NM_ROOT, "GetDeviceByIpIface", "s", name)
                        device = DBusAddress(path, bus_name=NM, interface="org.freedesktop.DBus.Properties")
                        managed[role] = call(device, "Get", "ss", f"{NM}.Device", "Managed")[0][1]
                    except DBusErrorResponse:
                        managed[role] = None  # NM does not know it
                out["networkmanager"] = managed
    except (OSError, TimeoutError, DBusErrorResponse):
        pass
    return out
