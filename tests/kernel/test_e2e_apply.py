"""End to end: `mape-daemon apply --once` on the lab's router, real traffic through the BR."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from tests.kernel.conftest import running_lab
from tests.lab import traffic
from tests.lab.mapping import V6PLUS
from tests.lab.netns import call, sh, spawn
from tests.lab.topo import LAN_CONSOLE, LAN_SERVER, PPP_REMOTE, SERVER, wait_for

CONFIG = """[wan]
interface = "wan0"
[lan]
interfaces = ["lan0"]
[pppoe]
hosts = ["192.168.1.55/32"]
"""


def config_for(lab) -> str:
    """CONFIG with the lab's interface names (VLANs, a bridge, a dotted PPPoE name)."""
    return (f'[wan]\ninterface = "{lab.wan}"\n[lan]\ninterfaces = ["{lab.lan_if}"]\n'
            f'[pppoe]\ninterface = "{lab.ppp}"\nhosts = ["192.168.1.55/32"]\n')  # fmt: skip


def run_mape(lab, tmp_path, *args: str, text: str = CONFIG) -> subprocess.CompletedProcess:
    cfg = tmp_path / "mape.toml"
    cfg.write_text(text)
    return subprocess.run(
        ["ip", "netns", "exec", lab.ce, sys.executable, "-m", "mape_daemon", *args, "-c", str(cfg)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "MAPE_STATE_DIR": str(tmp_path / "run")},
    )  # fmt: skip


def mape(lab, tmp_path, *args: str, text: str = CONFIG) -> str:
    r = run_mape(lab, tmp_path, *args, text=text)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def apply_once(lab, tmp_path, text: str = CONFIG) -> str:
    return mape(lab, tmp_path, "apply", text=text)


def block_of(ce, port: int) -> int:
    return next(i for i, (lo, hi) in enumerate(ce.port_ranges()) if lo <= port <= hi)


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_ocn_every_block_used_evenly_all_ports_in_set_ping_and_noop(lab, tmp_path, backend):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    config = CONFIG + f'[firewall]\nbackend = "{backend}"\n'
    out = apply_once(lab, tmp_path, config)
    assert f"{ce.ipv4} psid {ce.psid}, 1008 ports" in out

    n = len(ce.port_ranges())
    answers = call(lab.lan, traffic.tcp_sequential, SERVER, n * 3)
    assert all(not a.startswith("error") for a in answers), [a for a in answers if a.startswith("error")][:5]
    seen = wait_for(lambda: len(s := [e for e in traffic.read_log(lab.server_log) if e["proto"] == "tcp"]) >= n * 3
                    and s, 20, "the server's records")  # fmt: skip
    assert {e["src"] for e in seen} == {ce.ipv4}
    assert all(e["sport"] in ce.ports() for e in seen)
    assert Counter(block_of(ce, e["sport"]) for e in seen) == dict.fromkeys(range(n), 3)

    assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == ce.ipv4
    sh(lab.lan, "busybox", "ping", "-c", "2", "-W", "3", SERVER)
    icmp = [e for e in traffic.read_log(lab.server_log) if e["proto"] == "icmp"]
    assert icmp and all(e["src"] == ce.ipv4 and e["sport"] in ce.ports() for e in icmp)
    assert lab.br_dropped(chain) == 0
    # Without ppp0, a protocol without ports (GRE) is marked for PPPoE and fails closed at the
    # unreachable route in table 10: it never reaches the tunnel.
    call(lab.lan, traffic.raw_send, SERVER, 47, 3)
    if backend == "nftables":
        assert "MAPE-" not in sh(lab.ce, "iptables-save")  # everything is in our table
        assert nft_counter(lab, "pbr", "meta l4proto !=") == 3
        assert nft_counter(lab, "fwd-out", "drop") == 0
    else:
        assert packets(lab, "mangle", "MAPE-PBR-OTHER", "MARK") == 3
        assert packets(lab, "filter", "MAPE-FWD", "DROP") == 0

    assert "0 change(s), 0 kernel write(s)" in apply_once(lab, tmp_path, config)
    assert "nothing to change" in mape(lab, tmp_path, "plan", text=config)

    mape(lab, tmp_path, "cleanup", text=config)
    assert "table ip mape" not in sh(lab.ce, "nft", "list", "tables")
    assert "MAPE-" not in sh(lab.ce, "iptables-save")
    assert "ip6tnl1" not in sh(lab.ce, "ip", "link")
    assert sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203") == ""
    assert ce.ce_draft03 not in sh(lab.ce, "ip", "-6", "addr")


def nft_counter(lab, chain: str, rule: str) -> int:
    """Packets counted by the rule of our table's `chain` that contains `rule`."""
    (line,) = [x for x in sh(lab.ce, "nft", "list", "chain", "ip", "mape", chain).splitlines() if rule in x]
    return int(line.split("counter packets ")[1].split()[0])


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_v6plus_240_concurrent_connections_to_one_server_port(tmp_path, request, backend):
    with running_lab(tmp_path, request, rule=V6PLUS, wan_prefix="240b:10:1234:5600::/64") as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        out = apply_once(lab, tmp_path, f'[wan]\ninterface = "wan0"\n[firewall]\nbackend = "{backend}"\n')
        assert f"{ce.ipv4} psid {ce.psid}, 240 ports" in out
        answers = call(lab.lan, traffic.tcp_concurrent, SERVER, 240)
        failed = [a for a in answers if a.startswith("error")]
        assert not failed, (len(failed), failed[:3])
        ports = [int(a.split()[1]) for a in answers]
        assert len(set(ports)) == 240 and set(ports) == ce.ports()
        # MSS clamped to the tunnel's path MTU (1460 - 40): the LAN client's SYN offered 1460.
        seen = [e["mss"] for e in traffic.read_log(lab.server_log) if e["proto"] == "tcp"]
        assert seen and max(seen) <= 1420, Counter(seen)
        # Without [pppoe] a protocol without ports (GRE) is dropped at the tunnel and counted.
        call(lab.lan, traffic.raw_send, SERVER, 47, 3)
        if backend == "nftables":
            assert nft_counter(lab, "fwd-out", "drop") == 3
        else:
            assert packets(lab, "filter", "MAPE-FWD", "DROP") == 3
        assert lab.br_dropped(chain) == 0  # nothing of it reached the BR


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_pppoe_side_by_side(lab, tmp_path, backend):
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    lab.start_pppoe()
    wait_for(lab.ppp_up, 60, "ppp0")
    # The user's own port forward on the PPPoE address to a LAN server.
    sh(lab.ce, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "ppp0", "-p", "tcp", "--dport", "8080",
       "-j", "DNAT", "--to-destination", f"{LAN_SERVER}:8080")  # fmt: skip
    lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "lan-server.jsonl"), LAN_SERVER, 8080))
    apply_once(lab, tmp_path, CONFIG + f'[firewall]\nbackend = "{backend}"\n')

    # Reached on the PPPoE address, the LAN server answers via ppp0 (via the tunnel, SNATed, the
    # reply would not match the connection and the client would get nothing).
    answers = call(lab.inet, traffic.tcp_sequential, PPP_REMOTE, 3, 8080)
    assert all(not a.startswith("error") for a in answers), answers
    # The console goes out by PPPoE with its source port unchanged; other hosts by MAP-E.
    console = call(lab.lan, traffic.tcp_sequential, SERVER, 1, 80, 5, LAN_CONSOLE, 40000)[0]
    assert console == f"{PPP_REMOTE} 40000"
    assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4
    # A protocol without ports (GRE here) is marked for PPPoE and never reaches the tunnel.
    call(lab.lan, traffic.raw_send, SERVER, 47, 3)
    if backend == "nftables":
        assert nft_counter(lab, "pbr", "meta l4proto !=") >= 3
        assert nft_counter(lab, "fwd-out", "drop") == 0
    else:
        assert packets(lab, "mangle", "MAPE-PBR-OTHER", "MARK") >= 3
        assert packets(lab, "filter", "MAPE-FWD", "DROP") == 0


def packets(lab, table: str, chain: str, target: str) -> int:
    out = sh(lab.ce, "iptables", "-t", table, "-L", chain, "-v", "-x", "-n")
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if line.split()[2] == target)


def test_renumbering_moves_the_router_and_forgets_connections_to_the_old_ipv4(lab, tmp_path):
    from mape_daemon.config import parse
    from mape_daemon.kernel import make_kernel
    from mape_daemon.reconciler import Reconciler
    from mape_daemon.record import RecordFile
    from tests.hostns import inside

    old = lab.ce_params()
    lab.br_add_ce(old)
    with inside(lab.ce):
        r = Reconciler(parse(CONFIG), make_kernel("auto"), RecordFile(tmp_path / "run"))
        assert r.sync().ok
    assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == old.ipv4
    assert old.ipv4 in sh(lab.ce, "conntrack", "-L")

    lab.renumber("2400:4050:1234:9a00::/64")
    new = lab.ce_params()
    assert new.ipv4 != old.ipv4
    lab.br_add_ce(new)
    wait_for(lambda: any(a["address"].startswith("2400:4050:1234:9a00:") for a in lab.wan_addresses()), 30, "RA")
    with inside(lab.ce):
        result = r.sync()
        assert result.ok, result.error
        assert str(result.params.ipv4) == new.ipv4
        assert r.sync().writes == 0
    assert old.ipv4 not in sh(lab.ce, "conntrack", "-L")
    assert old.ce_draft03 not in sh(lab.ce, "ip", "-6", "addr")
    answer = call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0]
    assert answer.split()[0] == new.ipv4 and int(answer.split()[1]) in new.ports()


def test_vlan_named_router_end_to_end_with_pppoe_side_by_side(tmp_path, request):
    """WAN `wan-0.10` (a VLAN), LAN `br_lan.20` (a VLAN on a bridge), PPPoE as `pppoe-wan.1`: every
    name with a dot, a dash or an underscore, as real routers have them. Before: the sysctl path
    of a dotted name split into directories and every sync failed."""
    with running_lab(tmp_path, request, vlan=True) as lab:
        ce = lab.ce_params()
        chain = lab.br_add_ce(ce)
        lab.sysctl(lab.ce, {"net.ipv4.conf.default.rp_filter": "1"})  # strict, as many distributions ship
        lab.start_pppoe()
        wait_for(lab.ppp_up, 60, lab.ppp)
        rp, lan_rp = (f"/proc/sys/net/ipv4/conf/{i}/rp_filter" for i in (lab.ppp, lab.lan_if))
        lan_before = sh(lab.ce, "cat", lan_rp)
        out = apply_once(lab, tmp_path, config_for(lab))
        assert f"{ce.ipv4} psid {ce.psid}, 1008 ports" in out
        assert sh(lab.ce, "cat", rp).strip() == "2"
        assert sh(lab.ce, "cat", lan_rp) == lan_before  # the LAN's is never touched

        answers = call(lab.lan, traffic.tcp_sequential, SERVER, 63)
        assert all(a.split()[0] == ce.ipv4 and int(a.split()[1]) in ce.ports() for a in answers), answers[:3]
        assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == ce.ipv4
        sh(lab.lan, "busybox", "ping", "-c", "2", "-W", "3", SERVER)
        console = call(lab.lan, traffic.tcp_sequential, SERVER, 1, 80, 5, LAN_CONSOLE, 40000)[0]
        assert console == f"{PPP_REMOTE} 40000"
        assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}
        assert "0 change(s), 0 kernel write(s)" in apply_once(lab, tmp_path, config_for(lab))

        mape(lab, tmp_path, "cleanup", text=config_for(lab))
        assert sh(lab.ce, "cat", rp).strip() == "1"  # given back
        assert "MAPE-" not in sh(lab.ce, "iptables-save") and "mape" not in sh(lab.ce, "nft", "list", "tables")
        assert sh(lab.ce, "ip", "route", "show", "table", "all", "proto", "203") == ""


def test_a_tunnel_or_interface_in_the_way_is_named_and_left_alone(lab, tmp_path):
    """Before: an ip6tnl with our endpoints under another name made creation "succeed" (EEXIST)
    and every later sync fail; an interface with our name was taken over."""
    ce = lab.ce_params()
    sh(lab.ce, "ip", "link", "add", "old-mape", "type", "ip6tnl", "mode", "ipip6", "local", ce.ce_draft03,
       "remote", lab.rule.br, "dev", "wan0")  # fmt: skip
    r = run_mape(lab, tmp_path, "apply")
    assert r.returncode == 1 and "ip6tnl old-mape (not mape-daemon's) already connects" in r.stderr, r.stderr
    assert "old-mape" in sh(lab.ce, "ip", "link") and "ip6tnl1" not in sh(lab.ce, "ip", "link")
    sh(lab.ce, "ip", "link", "del", "old-mape")
    sh(lab.ce, "ip", "link", "add", "ip6tnl1", "type", "dummy")
    r = run_mape(lab, tmp_path, "apply")
    assert r.returncode == 1 and "interface ip6tnl1 exists and is dummy" in r.stderr, r.stderr
    assert "MAPE-" not in sh(lab.ce, "iptables-save")  # nothing half-applied around it
    sh(lab.ce, "ip", "link", "del", "ip6tnl1")
    assert f"{ce.ipv4} psid {ce.psid}" in apply_once(lab, tmp_path)


def test_a_tunnel_set_down_by_hand_is_brought_back_with_its_route(lab, tmp_path):
    ce = lab.ce_params()
    lab.br_add_ce(ce)
    apply_once(lab, tmp_path)
    sh(lab.ce, "ip", "link", "set", "ip6tnl1", "down")
    assert "dev ip6tnl1" not in sh(lab.ce, "ip", "route")  # the kernel dropped the route with it
    out = apply_once(lab, tmp_path)
    assert "~ tunnel ip6tnl1" in out and "+ route default dev ip6tnl1" in out
    assert call(lab.lan, traffic.tcp_sequential, SERVER, 1)[0].split()[0] == ce.ipv4
