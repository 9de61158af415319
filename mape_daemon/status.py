"""`mape-daemon status`: the daemon's state file combined with the live kernel."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .portuse import usage
from .statefile import NAME, DaemonState

HISTORY_SHOWN = 8


def collect(state_dir: Path) -> dict[str, Any]:
    from .kernel import LinuxKernel

    st = DaemonState.read(state_dir)
    if st is None:
        return {"ok": False, "error": f"no state at {state_dir / NAME}: is mape-daemon running?"}
    state = asdict(st)
    kernel = LinuxKernel(None)  # reads only: no netfilter backend needed
    live = kernel.tunnel(st.tunnel_name)
    state["tunnel"] = {"name": st.tunnel_name, "present": live is not None, "up": bool(live and live.up),
                       "local": live.local if live else None, "remote": live.remote if live else None}  # fmt: skip
    state["managers"] = kernel.managers(st.wan, st.tunnel_name)
    if st.ipv4 and st.port_ranges:
        usages = usage(kernel.nat_flows(st.ipv4), st.port_ranges)
        state["ports_in_use"] = {proto: u.as_dict() for proto, u in usages.items()}
    return state


def manager_lines(s: dict[str, Any]) -> list[str]:
    """firewalld (its backend, the tunnel's zone), NetworkManager and networkd (do they manage the
    WAN or the tunnel)."""
    m, fw = s.get("managers") or {}, s.get("firewalld") or {}
    out = []
    if m.get("firewalld_running") or fw.get("running"):
        zone = fw.get("zone")
        out.append(f"firewalld:  {fw.get('backend') or '?'} backend, tunnel in zone "
                   f"{zone if zone else 'NONE' if zone == '' else '?'}"
                   + (" (masquerades!)" if fw.get("masquerade") else ""))  # fmt: skip
        if fw.get("problem"):
            out.append(f"            {fw['problem']}")
    if (nm := m.get("networkmanager")) is not None:
        out.append(f"NetworkManager: manages the WAN: {nm.get('wan')}, the tunnel: {nm.get('tunnel')}")
    if (nd := m.get("networkd")) is not None and any(nd.values()):
        out.append(f"networkd:   WAN {nd.get('wan') or 'not known'}, tunnel {nd.get('tunnel') or 'not known'}")
    return out


def _clock(t: float | None) -> str:
    return "?" if t is None else time.strftime("%H:%M", time.localtime(t))


def _provisioning(p: dict[str, Any] | None) -> list[str]:
    """HB46PP's line: whose rules are in force, the last access, and the next."""
    if not p or p["state"] == "off":
        return []
    parts = [p["state"]] + ([f"parameters of {p['source']}, fetched {_clock(p['fetched_at'])}"] if p["source"] else [])
    parts += [p["detail"]] if p["detail"] else []
    parts += [f"next {_clock(p['next_at'])}"] if p["next_at"] else []
    return [f"HB46PP:     {'; '.join(parts)}"]


def _line(s: dict[str, Any]) -> list[str]:
    """The parameters in force: MAP-E's rule, IPv4 and PSID; DS-Lite's AFTR; IPIP's fixed IPv4."""
    if s.get("method") in (None, "map-e"):
        return [f"ISP/rule:   {s['isp'] or '-'} {s['rule'] or ''}",
                f"IPv4:       {s['ipv4'] or '-'}   PSID {s['psid'] if s['psid'] is not None else '-'}",
                f"CE address: {s['ce_ipv6'] or '-'}"]  # fmt: skip
    local = "B4 address" if s["method"] == "ds-lite" else "tunnel from"
    return [f"method:     {s['summary']}", f"{local + ':':11} {s['ce_ipv6'] or '-'}"]


def _update(u: dict[str, Any] | None) -> list[str]:
    if not u:
        return []
    when = f" {_clock(u['at'])}" if u.get("at") else ""
    nxt = f"; next try {_clock(u['next_at'])}" if u.get("next_at") else ""
    return [f"update:     {u['state']}{when}: {u['detail']}{nxt}"]


def to_text(s: dict[str, Any]) -> str:
    if "last_sync" not in s:
        return s.get("error", "no state")
    age = time.time() - s["last_sync"]
    t = s["tunnel"]
    lines = [
        f"prefix:     {s['prefix'] or '-'}  ({s.get('reason') or 'ok'})",
        *([f"from:       {s['prefix_from']}"] if s.get("prefix_from") else []),
        *_line(s),
        *_provisioning(s.get("provisioning")),
        *_update(s.get("update")),
        f"tunnel:     {t['name']} {'up' if t['up'] else 'DOWN' if t['present'] else 'absent'}",
        *([f"firewall:   {s['backend']}"] if s.get("backend") else []),
        f"last sync:  {age:.0f} s ago, {'ok' if s['ok'] else 'FAILED: ' + str(s['error'])}, {s['changes']} change(s)",
    ]
    for proto, u in s.get("ports_in_use", {}).items():
        fb = u["fullest_block"]
        full = f", fullest block {fb['range'][0]}-{fb['range'][1]}: {fb['in_use']}/{fb['size']}" if fb else ""
        lines.append(f"{proto + ':':11} {u['in_use']} of {u['of']} ports in use{full}")
    for proto, why in sorted((s.get("ports_running_out") or {}).items()):
        lines.append(f"RUNNING OUT: {proto}: {why}")
    for c in s.get("conflicts", []):
        lines.append(f"CONFLICT:   {c}")
    fw = s.get("forwards") or {}
    lines += [f"forward:    {f}" for f in fw.get("active", [])]
    lines += [f"DISABLED:   {u}" for u in fw.get("unavailable", [])]
    if (u := s.get("upnp")) is not None:
        offer = f"grants ports of {u['offering']}'s set" if u["offering"] else "refuses every request (no mapping)"
        lines.append(f"UPnP:       miniupnpd FAILING: {u['problem']}" if u["problem"] else
                     f"UPnP:       miniupnpd {offer} ({u['file']})")  # fmt: skip
    lines += manager_lines(s)
    if s.get("repairs"):
        lines.append("repairs:    " + ", ".join(f"{n} by {cause}" for cause, n in sorted(s["repairs"].items())))
    history = s.get("history", [])[-HISTORY_SHOWN:]
    if history:
        lines.append("last changes:")
        for h in history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"]))
            lines.append(f"  {when} [{h['cause']}] {h['text']}")
    return "\n".join(lines)
