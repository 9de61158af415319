"""NAT behaviour as a console or a call sees it (RFC 4787, measured by RFC 5780): coturn's STUN
server beyond the strict BR with two addresses and two ports, and coturn's behaviour-discovery
client on a LAN host. Every verdict is the client's own, every reflexive port must be in the set,
and the BR must have dropped nothing."""

from __future__ import annotations

import re

import pytest

from tests.kernel.test_e2e_apply import CONFIG, apply_once
from tests.kernel.test_forwards_lab import forward
from tests.lab import traffic
from tests.lab.netns import call, sh, spawn
from tests.lab.topo import LAN_CLIENT, LAN_SERVER, SERVER

APDF = "Address and Port Dependent Filtering"


def discover(lab, test: str, port: int) -> tuple[str, set[str]]:
    """turnutils_natdiscovery's verdict for one test (-m mapping, -f filtering) from a fresh local
    port (RFC 5780 4.4: filtering tests are stateful), and the reflexive addresses it was given."""
    out = sh(lab.lan, "turnutils_natdiscovery", test, "-L", LAN_CLIENT, "-l", str(port), SERVER, timeout=120)
    verdicts = re.findall(r"^(NAT with .+|No NAT.*)!$", out, re.M)
    assert len(verdicts) == 1, out  # no verdict at all: the server gave no OTHER-ADDRESS
    return verdicts[0], set(re.findall(r"UDP reflexive addr: (\S+)", out))


@pytest.mark.parametrize("backend", ["nftables", "iptables-nft"])
def test_stun_client_sees_each_mapping_and_filtering_setting_inside_the_port_set(lab, tmp_path, backend):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    lab.start_stun()
    in_set = {f"{ce.ipv4}:{p}" for p in ce.ports()}
    base = CONFIG + f'[firewall]\nbackend = "{backend}"\n[snat]\n'
    seen: set[str] = set()
    port = iter(range(40000, 41000, 7))

    # Per connection (before this issue, and still a choice): each destination its own port.
    apply_once(lab, tmp_path, base + 'udp_mapping = "per-connection"\n')
    verdict, reflexive = discover(lab, "-m", next(port))
    assert verdict == "NAT with Address and Port Dependent Mapping", verdict
    seen |= reflexive

    filterings = (("", APDF), ('udp_filtering = "address-dependent"', "Address Dependent Filtering"),
                  ('udp_filtering = "endpoint-independent"', "Endpoint Independent Filtering"))  # fmt: skip
    for setting, filtering in filterings:
        apply_once(lab, tmp_path, base + setting + "\n")
        if not setting:  # the default: the mapping is the same for every filtering
            verdict, reflexive = discover(lab, "-m", next(port))
            assert verdict == "NAT with Endpoint Independent Mapping", verdict
            seen |= reflexive
        verdict, reflexive = discover(lab, "-f", next(port))
        assert verdict == f"NAT with {filtering}", (setting, verdict)
        seen |= reflexive
    # What the packet path learned (the map's elements) is not a difference to repair.
    again = apply_once(lab, tmp_path, base + filterings[-1][0] + "\n")
    assert "0 change(s), 0 kernel write(s)" in again, again

    assert seen and seen <= in_set, seen - in_set  # every external port the server saw is ours
    assert lab.br_dropped(chain) == 0


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_a_crowded_range_spreads_the_next_flow_instead_of_dropping_it(lab, tmp_path, backend):
    """A range of 16 ports holds 16 flows towards one server port; the kernel drops the 17th at
    confirm, for as long as the 16 live (a black hole that retries cannot leave). 40 LAN sockets
    whose source ports all choose the first range: 16 get it, the others are spread per
    connection, and every one is answered, at its first datagram or (when the spread too lands on
    the full range) at its second."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    ranges = sorted(ce.port_ranges())
    apply_once(lab, tmp_path, CONFIG + f'[firewall]\nbackend = "{backend}"\n')
    sports = [1024 * k + j for k in range(40, 43) for j in range(16)][:40]  # `& 1023` in the first range's bucket
    answers = call(lab.lan, traffic.udp_concurrent, SERVER, len(sports), traffic.UDP_PORT, 50, 2.0, sports)
    assert not [a for a in answers if a.startswith("error")], answers  # every flow got through
    ports = [int(a.split()[-1]) for a in answers]
    first = ranges[0]
    assert sum(first[0] <= p <= first[1] for p in ports) == first[1] - first[0] + 1  # the range is full
    assert set(ports) <= ce.ports() and len(set(ports)) == len(ports)
    assert lab.br_dropped(chain) == 0


@pytest.mark.parametrize("backend", ["nftables"])
def test_hairpinning_to_a_forward_and_to_a_lan_sockets_mapping(lab, tmp_path, backend):
    """RFC 4787 REQ-9: a LAN host reaching the MAP IPv4 on a forward's port, or on another LAN
    socket's external port (endpoint-independent filtering), gets there from the MAP IPv4 and a
    port of the set (REQ-9a), and the answer comes back."""
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    ports = sorted(ce.ports())
    lab.pids.append(spawn(lab.lan, traffic.serve, str(tmp_path / "lan.jsonl"), LAN_SERVER, 8080))
    text = CONFIG + f'[firewall]\nbackend = "{backend}"\n' + forward(ports[40])
    apply_once(lab, tmp_path, text)
    (answer,) = call(lab.lan, traffic.tcp_sequential, ce.ipv4, 1, ports[40], 3, LAN_CLIENT)
    ip, sport = answer.split()[:2] if not answer.startswith("error") else (answer, "0")
    assert ip == ce.ipv4 and int(sport) in ports, answer  # the LAN server saw the MAP IPv4, a port of ours

    # Without endpoint-independent filtering a mapping is not open to anyone, the LAN included.
    mapping, *rest = call(lab.lan, traffic.udp_hairpin, SERVER, LAN_SERVER, LAN_CLIENT)
    assert rest and rest[0].startswith("error"), rest
    apply_once(lab, tmp_path, text + '[snat]\nudp_filtering = "endpoint-independent"\n')
    mapping, seen, back = call(lab.lan, traffic.udp_hairpin, SERVER, LAN_SERVER, LAN_CLIENT)
    assert mapping.split()[0] == ce.ipv4 and int(mapping.split()[1]) in ports, mapping
    assert seen.split()[0] == ce.ipv4 and int(seen.split()[1]) in ports, seen
    assert back == mapping  # the answer came back from the address the peer sent to
    assert lab.br_dropped(chain) == 0
