"""Receiving IPv4 through the strict BR: [[forward]]s inside the port set reach a LAN server, the
MAP IPv4 is closed to everything else, and a renumbering moves a forward or reports it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.kernel.test_e2e_apply import CONFIG, apply_once
from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call, sh, spawn
from tests.lab.topo import LAN_GW, LAN_SERVER, SERVER, wait_for


def forward(port: int, to_port: int = 8080) -> str:
    return f'[[forward]]\nname = "web"\nprotocol = "tcp"\nport = {port}\nto = "{LAN_SERVER}"\nto_port = {to_port}\n'


def reach(lab, ipv4: str, port: int, timeout: float = 3) -> str:
    """From the internet side: the answering server's view "ip port", or an error."""
    return call(lab.inet, traffic.tcp_sequential, ipv4, 1, port, timeout)[0]


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables", "iptables-legacy"])
def test_a_forward_is_reachable_a_router_service_is_not_and_snat_never_uses_its_port(lab, tmp_path, backend):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    ports = sorted(ce.ports())
    fwd, service = ports[40], ports[80]
    lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "lan.jsonl"), LAN_SERVER, 8080))
    lab.pids.append(spawn(lab.ce, traffic.serve, str(tmp_path / "router.jsonl"), "0.0.0.0", service))
    to_router = ports[120]
    text = CONFIG + f'[firewall]\nbackend = "{backend}"\n' + forward(fwd)
    out = apply_once(lab, tmp_path, text + forward(25565).replace('"web"', '"mc"'))
    assert "disabled: forward mc tcp 25565 -> 192.168.1.20:8080: tcp 25565 is outside this line's port set" in out

    answer = reach(lab, ce.ipv4, fwd)
    assert not answer.startswith("error"), answer  # through the BR, DNATed to the LAN server
    assert reach(lab, ce.ipv4, service).startswith("error")  # the router's own service: closed
    text += f'[[forward]]\nprotocol = "tcp"\nport = {to_router}\nto = "{LAN_GW}"\nto_port = {service}\n'
    apply_once(lab, tmp_path, text)
    assert not reach(lab, ce.ipv4, to_router).startswith("error")  # a forward to the router opens it
    assert reach(lab, ce.ipv4, service).startswith("error")  # and nothing else
    if backend != "iptables-legacy":  # it runs the same iptables-restore text as iptables-nft
        # Every port of the set but the forwarded ones, by as many outbound connections as the pool holds.
        outbound = call(lab.lan, traffic.tcp_concurrent, SERVER, len(ports) - 2, 80, 60)
        used = {int(a.split()[1]) for a in outbound if not a.startswith("error")}
        # (a port-clash retry or three may fail)
        assert fwd not in used and to_router not in used and len(used) >= len(ports) - 6
    assert lab.br_dropped(chain) == 0

    apply_once(lab, tmp_path, text + "[inbound]\nclosed = false\n")
    assert not reach(lab, ce.ipv4, service).startswith("error")  # opened on request
    assert not reach(lab, ce.ipv4, fwd).startswith("error")


def test_closed_inbound_passes_native_ipv6_and_the_icmp_errors_of_our_flows(lab, tmp_path):
    """Before: "native IPv6 is never closed" only looked for a table name with ip6 in it, and
    nothing showed that ICMP errors of our own flows pass the closed policy (without them a path
    MTU black hole or a hung connect). Now: a real IPv6 connection to the router's WAN address,
    and a port-unreachable from the internet back to a LAN client through the tunnel."""
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    port = sorted(ce.ports())[80]
    lab.pids.append(spawn(lab.ce, traffic.serve, str(tmp_path / "router.jsonl"), "::", port))  # IPv4 and IPv6
    apply_once(lab, tmp_path, CONFIG + '[firewall]\nbackend = "nftables"\n')
    assert "chain in-closed" in sh(lab.ce, "nft", "list", "table", "ip", "mape")
    assert reach(lab, ce.ipv4, port).startswith("error")  # the router's service over IPv4: closed
    wan6 = next(a["address"] for a in lab.wan_addresses() if not (a["deprecated"] or a["tentative"]))
    answer = call(lab.isp, traffic.tcp_sequential, wan6, 1, port, 3)[0]
    assert not answer.startswith("error"), answer  # the same service over native IPv6: open
    assert call(lab.lan, traffic.udp_refused, SERVER, 9)  # the server's ICMP error came back to the LAN


def test_renumbering_moves_a_forward_with_the_set_or_reports_it(lab, tmp_path):
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    port = sorted(ce.ports())[40]
    lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "lan.jsonl"), LAN_SERVER, 8080))
    d = Daemon(lab, tmp_path, CONFIG + forward(port) + "[daemon]\nhold_down = 0\n").start()
    try:
        wait_for(d.synced_by_me, 180, "the first sync")
        assert not reach(lab, ce.ipv4, port).startswith("error")

        # Config time, against the running daemon's set: check-config and a reload refuse a forward outside it.
        good = d.cfg.read_text()
        outside = next(p for p in range(20000, 65536) if p not in ce.ports())
        d.cfg.write_text(good + forward(outside).replace('"web"', '"game"'))
        r = subprocess.run(["ip", "netns", "exec", lab.ce, sys.executable, "-m", "mape_daemon", "check-config",
                            str(d.cfg)], capture_output=True, text=True, env=d.env, timeout=120)  # fmt: skip
        assert r.returncode == 78 and f"forward.1.port: tcp {outside} is outside this line's port set" in r.stderr
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nothing changes, staying with the config loaded at" in d.text(), 60, "the reload refused")
        d.cfg.write_text(good)
        assert not reach(lab, ce.ipv4, port).startswith("error")  # the running config still serves

        lab.renumber("2400:4050:2234:5600::/64")  # the same PSID, another IPv4: the forward follows
        moved = lab.ce_params()
        assert moved.ipv4 != ce.ipv4 and port in moved.ports()
        lab.br_add_ce(moved)
        wait_for(lambda: d.state().get("ipv4") == moved.ipv4, 60, "the new mapping")
        wait_for(lambda: not reach(lab, moved.ipv4, port).startswith("error"), 30, "the forward")
        assert d.state()["forwards"]["active"] == [f"web tcp {port} -> {LAN_SERVER}:8080"]

        lab.renumber("2400:4050:2234:9a00::/64")  # another PSID: none of the old ports
        other = lab.ce_params()
        assert port not in other.ports()
        lab.br_add_ce(other)
        wait_for(lambda: d.state().get("ipv4") == other.ipv4, 60, "the new mapping")
        state = d.state()
        assert state["forwards"]["active"] == [] and f"tcp {port} is outside" in state["forwards"]["unavailable"][0]
        assert f"web tcp {port} -> {LAN_SERVER}:8080: tcp {port} is outside this line's port set" in d.text()
        assert "chain dnat-in" not in sh(lab.ce, "nft", "list", "table", "ip", "mape")  # no DNAT that cannot work
    finally:
        d.stop()
