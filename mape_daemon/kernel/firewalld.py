"""firewalld on the system bus, as Docker, libvirt and NetworkManager live with it: its `Reloaded`
signal and a change of owner of its bus name (a restart) trigger a sync, since a reload or restart
flushes the iptables tables (all versions with the iptables backend, and before 2.0 with the
nftables one); after each, the tunnel's zone is checked, and bound again when the config asks.
Never direct rules: their mere presence makes firewalld flush iptables on every reload.

The client is jeepney: pure Python (nothing compiled, so it runs under MemoryDenyWriteExecute),
asyncio-native, no dependencies, and a small import. No bus or no firewalld: nothing to do.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jeepney import DBusAddress, HeaderFields, MatchRule, message_bus, new_method_call
from jeepney.bus import get_bus
from jeepney.io.asyncio import DBusRouter, Proxy, open_dbus_router
from jeepney.wrappers import DBusErrorResponse, unwrap_msg

BUS_NAME = "org.fedoraproject.FirewallD1"
PATH = "/org/fedoraproject/FirewallD1"
FIREWALLD = DBusAddress(PATH, bus_name=BUS_NAME, interface=BUS_NAME)
ZONE = DBusAddress(PATH, bus_name=BUS_NAME, interface=f"{BUS_NAME}.zone")
CONFIG = DBusAddress(f"{PATH}/config", bus_name=BUS_NAME, interface="org.freedesktop.DBus.Properties")
RELOADED = MatchRule(type="signal", interface=BUS_NAME, member="Reloaded", path=PATH)
OWNER = MatchRule(type="signal", sender="org.freedesktop.DBus", interface="org.freedesktop.DBus",
                  member="NameOwnerChanged", path="/org/freedesktop/DBus")  # fmt: skip
OWNER.add_arg_condition(0, BUS_NAME)
# A restarted firewalld claims its name, then loads and applies its zones (seconds on a slow
# machine; with legacy iptables its flush sends no other event): sync again as it settles.
SETTLE = (2.0, 5.0, 10.0)
ALIVE_EVERY = 60.0  # with no signal for this long, ask the bus something: jeepney's signal queue
ASK_TIMEOUT = 30.0  # never wakes on a dropped connection (only pending replies fail), so a dead
# bus shows as an unanswered call, and the supervisor subscribes anew


def bus_present() -> bool:
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or ""
    if address and not address.startswith("unix:path="):
        return True
    try:
        path = get_bus("SYSTEM")
    except Exception:
        return False
    return Path(path).exists()


@dataclass(frozen=True)
class ZoneState:
    running: bool
    backend: str | None = None
    zone: str | None = None  # the tunnel's zone ("" for none)
    masquerade: bool = False
    problem: str | None = None  # what to say once, with the commands that fix it


async def _call(router: DBusRouter, address: DBusAddress, method: str, signature: str = "", *args):
    reply = await router.send_and_get_reply(new_method_call(address, method, signature, args))
    return unwrap_msg(reply)


async def inspect(router: DBusRouter, tunnel: str, bind_to: str | None) -> ZoneState:
    """firewalld's view of the tunnel; with `bind_to`, put the tunnel in that zone first (a runtime
    binding, lost at every reload with FlushAllOnReload=yes: that is why it is done again)."""
    (owned,) = await _call(router, message_bus, "NameHasOwner", "s", BUS_NAME)
    if not owned:
        return ZoneState(False)
    try:
        (variant,) = await _call(router, CONFIG, "Get", "ss", f"{BUS_NAME}.config", "FirewallBackend")
        backend = variant[1]
    except DBusErrorResponse:
        backend = None
    try:
        (zone,) = await _call(router, ZONE, "getZoneOfInterface", "s", tunnel)
        if bind_to and zone != bind_to:
            await _call(router, ZONE, "changeZoneOfInterface", "ss", bind_to, tunnel)
            zone = bind_to
        masq = bool(zone) and (await _call(router, ZONE, "queryMasquerade", "s", zone))[0]
    except DBusErrorResponse as e:
        return ZoneState(True, backend, None, False, f"firewalld refused a zone query for {tunnel}: {e}")
    problem = None
    if not zone:
        problem = (
            f"the tunnel {tunnel} is in no firewalld zone, so firewalld rejects LAN traffic forwarded into it "
            f"(ICMP admin-prohibited). Bind it: `firewall-cmd --permanent --zone=mape --add-interface={tunnel} && "
            'firewall-cmd --reload` (the package ships zone "mape" and policy "mape-lan-to-mape"), or set '
            '[firewalld] zone = "mape" and the daemon binds it at runtime after every reload'
        )
    elif masq:
        problem = (
            f"the tunnel {tunnel} is in zone {zone}, which masquerades: while our SNAT is being restored after a "
            "firewalld reload, connections would be masqueraded onto ports outside the port set. Move it: "
            f"`firewall-cmd --permanent --zone={zone} --remove-interface={tunnel} && firewall-cmd --permanent "
            f"--zone=mape --add-interface={tunnel} && firewall-cmd --reload`"
        )
    return ZoneState(True, backend, zone, masq, problem)


async def watch(
    trigger: Callable[[str], None],
    bound: Callable[[], None],
    checked: Callable[[ZoneState], None],
    tunnel: Callable[[], str],
    bind_to: Callable[[], str | None],
    recheck: asyncio.Event | None = None,
    alive_every: float = ALIVE_EVERY,
    ask_timeout: float = ASK_TIMEOUT,
) -> None:
    """Until cancelled: trigger a sync on every firewalld reload or restart, and report firewalld's
    view of the tunnel (at start, after each, and whenever `recheck` is set: the periodic sync
    sets it, so a binding lost without a signal is made again). Without a system bus, wait for
    one. Raises when the bus stops answering, for the supervisor to subscribe anew."""
    if not bus_present():
        bound()
        while not bus_present():
            await asyncio.sleep(60)
    recheck = recheck or asyncio.Event()
    async with open_dbus_router(bus="SYSTEM") as router:
        bus = Proxy(message_bus, router)
        await asyncio.wait_for(bus.AddMatch(RELOADED), ask_timeout)
        await asyncio.wait_for(bus.AddMatch(OWNER), ask_timeout)
        signals: asyncio.Queue = asyncio.Queue()
        with router.filter(RELOADED, queue=signals), router.filter(OWNER, queue=signals):
            bound()
            checked(await asyncio.wait_for(inspect(router, tunnel(), bind_to()), ask_timeout))
            while True:
                got, asked = asyncio.ensure_future(signals.get()), asyncio.ensure_future(recheck.wait())
                done, _ = await asyncio.wait({got, asked}, timeout=alive_every, return_when=asyncio.FIRST_COMPLETED)
                got.cancel()
                asked.cancel()
                recheck.clear()
                if got in done:
                    trigger("firewalld")
                    if got.result().header.fields.get(HeaderFields.member) == "NameOwnerChanged":
                        waited = 0.0
                        for at in SETTLE:
                            await asyncio.sleep(at - waited)
                            waited = at
                            trigger("firewalld")
                elif not done:  # quiet for a while: is the bus still there?
                    await asyncio.wait_for(_call(router, message_bus, "GetId"), ask_timeout)
                    continue
                checked(await asyncio.wait_for(inspect(router, tunnel(), bind_to()), ask_timeout))
                if got in done:  # it answered: done loading, whatever it flushed is flushed by now
                    trigger("firewalld")
