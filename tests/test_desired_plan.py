"""The pure layers: config -> desired state -> plan, with golden expectations."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import replace
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from mape_daemon import desired, maprules
from mape_daemon.actions import FirewallChange, NetAction, NftChange
from mape_daemon.config import parse
from mape_daemon.firewall import port_buckets
from mape_daemon.mapcalc import compute
from mape_daemon.plan import diff
from mape_daemon.state import NOTHING, Jump, Tunnel

GOLDEN = Path(__file__).with_name("golden")
OCN = compute(maprules.bundled().match(IPv6Address("2400:4050:1234:5600::1")), IPv6Address("2400:4050:1234:5600::1"))
BASE = '[wan]\ninterface = "wan0"\n'
PPPOE = BASE + '[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.55/32"]\n'


def chain(state, name):
    return next(c for c in state.chains if c.name == name)


def test_snat_rules_spread_over_every_block_with_every_n_down_to_a_catch_all():
    state = desired.build(parse(BASE), OCN)
    tcp = chain(state, "MAPE-SNAT-TCP").rules
    assert len(tcp) == 63
    assert tcp[0] == "-p tcp -m statistic --mode nth --every 63 --packet 0 -j SNAT --to-source 153.240.72.209:1376-1391"
    assert (
        tcp[61] == "-p tcp -m statistic --mode nth --every 2 --packet 0 -j SNAT --to-source 153.240.72.209:63840-63855"
    )
    assert tcp[62] == "-p tcp -j SNAT --to-source 153.240.72.209:64864-64879"
    assert len(chain(state, "MAPE-SNAT-ICMP").rules) == 63
    udp = chain(state, "MAPE-SNAT-UDP").rules  # by source port while the range has room, then spread
    assert udp[0] == ('-p udp -m multiport --dports 1:52,54:442,444:65535 -m u32 --u32 '
                      '"0x0>>0x16&0x3c@0x0>>0x10&0x3ff=0x0:0xf" -m connlimit --connlimit-upto 16 --connlimit-mask 32 '
                      "--connlimit-daddr -j SNAT --to-source 153.240.72.209:1376-1391")  # fmt: skip
    assert udp[63:] == tuple(r.replace("tcp", "udp") for r in tcp)  # DNS, QUIC and the crowded: spread
    assert len(udp) == 126
    assert sum(len(c.rules) for c in state.chains if c.name.startswith("MAPE-SNAT-")) == 252


def test_udp_source_port_buckets_cover_every_value_once_and_evenly():
    """Every `sport & mask` value has exactly one range, so no UDP flow leaves unSNATed, and the
    ranges get nearly equal shares (an OS's ephemeral ports spread evenly over them)."""
    for n in (1, 15, 63, 64, 100, 1023, 1500, 4097):
        mask, buckets = port_buckets(n)
        assert buckets[0][0] == 0 and buckets[-1][1] == mask and len(buckets) == n
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(buckets))
        sizes = {hi - lo + 1 for lo, hi in buckets}
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_per_connection_udp_is_spread_like_tcp():
    state = desired.build(parse(BASE + '[snat]\nudp_mapping = "per-connection"\n'), OCN)
    assert [r.replace("udp", "tcp") for r in chain(state, "MAPE-SNAT-UDP").rules] == list(
        chain(state, "MAPE-SNAT-TCP").rules
    )


def test_round_robin_of_the_nth_rules_gives_every_block_once_per_n_connections():
    """Simulate the statistic match: each rule counts the packets that reach it."""
    rules_ = chain(desired.build(parse(BASE), OCN), "MAPE-SNAT-TCP").rules
    every = [int(r.split("--every ")[1].split()[0]) if "--every" in r else 1 for r in rules_]
    seen = [0] * len(every)
    hits = [0] * len(every)
    for _ in range(63 * 3):
        for i, n in enumerate(every):
            seen[i] += 1
            if (seen[i] - 1) % n == 0:
                hits[i] += 1
                break
    assert hits == [3] * 63


def test_reserved_ports_are_carved_out_of_their_blocks():
    cfg = parse(BASE + '[snat]\nreserved_ports = [1380, "2400-2405", 3439]\n')
    ranges = desired.pool_ranges(OCN, cfg.snat.reserved_ranges())
    assert ranges[:4] == [(1376, 1379), (1381, 1391), (2406, 2415), (3424, 3438)]
    assert sum(hi - lo + 1 for lo, hi in ranges) == 1008 - 1 - 6 - 1
    tcp = chain(desired.build(cfg, OCN), "MAPE-SNAT-TCP").rules
    assert len(tcp) == 64 and "--every 64 " in tcp[0]


def test_nftables_backend_puts_everything_in_our_table_with_one_snat_map_over_the_pool():
    cfg = parse(PPPOE + '[snat]\nreserved_ports = ["1376-1391", "2400"]\n')
    state = desired.build(cfg, OCN, {"ppp0"}, native=True)
    assert not state.chains and not state.jumps and state.nft is not None
    *eim, snat = [line for line in state.nft.splitlines() if " snat ip to " in line]
    pool = desired.pool_ranges(OCN, cfg.snat.reserved_ranges())
    # UDP but DNS and QUIC: from its source port's low bits one lookup to its range's chain, in
    # pool order, which takes the flow while the range holds fewer flows than its size towards
    # the server; a crowded range returns to the spread.
    (vmap,) = [line for line in state.nft.splitlines() if " vmap " in line]
    assert 'oifname "ip6tnl1" udp dport != { 53, 443 } udp sport & 1023 vmap { 0-15 : jump udp-range-0, ' in vmap
    buckets = [tuple(map(int, b)) for b in re.findall(r"(\d+)-(\d+) : jump udp-range-\d+", vmap)]
    assert [lo for lo, _ in buckets] == [0] + [hi + 1 for _, hi in buckets[:-1]] and buckets[-1][1] == 1023
    rule = re.compile(
        r"add @udp-crowd \{ ip daddr \. (\d+) ct count (\d+) \} counter snat ip to 153\.240\.72\.209:(\d+)-?(\d+)?$"
    )
    ranges = [rule.search(r) for r in eim]
    assert [(int(m[3]), int(m[4] or m[3])) for m in ranges] == pool and len(ranges) == len(buckets)
    assert [int(m[2]) for m in ranges] == [hi - lo + 1 for lo, hi in pool] and all(m[1] == m[3] for m in ranges)
    assert "chain udp-range-0 {\n\t\tmeta l4proto udp add @udp-crowd { ip daddr . 2401 ct count 15 }" in state.nft
    entries = re.findall(r"(\d+) : 153\.240\.72\.209 \. (\d+)-(\d+)", snat)
    assert [(int(lo), int(hi)) for _, lo, hi in entries] == pool  # 62 blocks and 2401-2415, in order
    assert [int(i) for i, _, _ in entries] == list(range(len(pool))) and f"numgen inc mod {len(pool)} " in snat
    assert "priority srcnat - 1;" in state.nft  # before a catch-all masquerade at srcnat
    # Marks keep the bits outside pppoe.mask; the connection's mark is copied only under a match.
    assert "meta mark set meta mark and 0xffff0000 or 0x3e8" in state.nft
    assert 'iifname "lan0" ct mark and 0xffff == 0x3e8 meta mark set' in state.nft
    assert 'oifname "ppp0" masquerade' in state.nft and "chain tunnel-out" in state.nft
    plan = diff(state, NOTHING)
    assert [str(a) for a in plan.actions if isinstance(a, NftChange)] == [
        "+ nftables table ip mape (SNAT, guard, inbound closed)"
    ]
    assert not any(isinstance(a, FirewallChange) for a in plan.actions)
    no_guard = desired.build(parse(PPPOE + "[firewall]\nguard = false\n"), OCN, native=True).nft
    assert no_guard is not None and "tunnel-out" not in no_guard and " snat ip to " in no_guard


def test_tunnel_addresses_and_default_route():
    state = desired.build(parse(BASE), OCN)
    assert state.tunnel == Tunnel("ip6tnl1", "2400:4050:1234:5600:99:f048:d100:1600", "2001:380:a120::9", "wan0",
                                  1460, 64)  # fmt: skip
    assert {a.describe() for a in state.addresses} == {
        "address 2400:4050:1234:5600:99:f048:d100:1600/128 dev wan0 nodad noprefixroute",
        "address 153.240.72.209/32 dev ip6tnl1",
    }
    assert [r.describe() for r in state.routes] == ["route default dev ip6tnl1 metric 0 proto 203"]
    assert Jump("nat", "POSTROUTING", "-o ip6tnl1 -j MAPE-SNAT") in state.jumps
    assert chain(state, "MAPE-FWD").rules == ("-p tcp -j RETURN", "-p udp -j RETURN", "-p icmp -j RETURN", "-j DROP")


def test_pppoe_waits_for_its_interface():
    cfg = parse(PPPOE)
    without = desired.build(cfg, OCN, frozenset({"wan0", "lan0"}))
    assert not any(r.dev == "ppp0" for r in without.routes)
    assert [r.describe() for r in without.routes if r.table == 10] == [
        "route unreachable default table 10 metric 4294967295 proto 203"  # fails closed until ppp0 exists
    ]
    assert without.loose_rp == frozenset()
    with_ppp = desired.build(cfg, OCN, frozenset({"wan0", "lan0", "ppp0"}))
    assert any(r.dev == "ppp0" and r.table == 10 for r in with_ppp.routes)
    assert with_ppp.loose_rp == {"ppp0"}  # only where replies arrive off main's default: never the LAN
    assert [r.describe() for r in sorted(with_ppp.rules)] == [
        "rule 4999: fwmark 0x3e8/0xffff lookup main suppress_prefixlength 0 proto 203",
        "rule 5000: fwmark 0x3e8/0xffff lookup 10 proto 203",
    ]


def test_no_parameters_means_nothing_of_ours():
    assert desired.build(parse(PPPOE), None) is NOTHING


def test_golden_plan_from_nothing():
    state = desired.build(parse(PPPOE), OCN, frozenset({"wan0", "lan0", "ppp0"}))
    text = str(diff(state, NOTHING)) + "\n"
    golden = GOLDEN / "plan-ocn-pppoe.txt"
    assert text == golden.read_text(), "plan output changed; if on purpose, regenerate tests/golden"


def test_converged_plan_is_empty_and_teardown_undoes_everything():
    state = desired.build(parse(PPPOE), OCN, frozenset({"wan0", "lan0", "ppp0"}))
    assert not diff(state, state)
    teardown = diff(NOTHING, state)
    kinds = [type(a) for a in teardown.actions]
    assert NetAction in kinds and FirewallChange in kinds
    fw = [a for a in teardown.actions if isinstance(a, FirewallChange)]
    assert {n for a in fw for n in a.delete} == {c.name for c in state.chains}
    assert teardown.actions[-1] == NftChange(None, "no longer wanted")
    # The tunnel goes whole: its address and route vanish with it and are not deleted one by one.
    net = [str(a) for a in teardown.actions if isinstance(a, NetAction)]
    assert "- address 153.240.72.209/32 dev ip6tnl1" not in net
    assert any(line.startswith("- tunnel ip6tnl1") for line in net)


def test_changed_tunnel_is_recreated_and_its_objects_readded():
    cfg = parse(BASE)
    old = desired.build(cfg, OCN)
    new_params = compute(OCN.rule, IPv6Address("2400:4050:1234:5700::1"))  # same IPv4, PSID 23
    new = desired.build(cfg, new_params)
    plan = [str(a) for a in diff(new, old).actions]
    assert plan[0] == "- address 2400:4050:1234:5600:99:f048:d100:1600/128 dev wan0 nodad noprefixroute"
    assert plan[1].startswith("- tunnel ip6tnl1")
    assert plan[2].startswith("+ tunnel ip6tnl1") and "local 2400:4050:1234:5700:99:f048:d100:1700" in plan[2]
    assert "+ address 153.240.72.209/32 dev ip6tnl1" in plan
    assert "+ route default dev ip6tnl1 metric 0 proto 203" in plan


def test_mtu_change_is_made_in_place():
    old = desired.build(parse(BASE), OCN)
    new = desired.build(parse(BASE + "[tunnel]\nmtu = 1400\n"), OCN)
    plan = diff(new, old)
    assert [a.op for a in plan.actions if isinstance(a, NetAction)] == ["set"]


def test_duplicate_jump_is_removed_once():
    state = desired.build(parse(BASE), OCN)
    jump = Jump("nat", "POSTROUTING", "-o ip6tnl1 -j MAPE-SNAT")
    doubled = type(state)(**{**state.__dict__, "jumps": (*state.jumps, jump)})
    (change,) = diff(state, doubled).actions
    assert change.del_jumps == (jump,) and not change.replace and not change.add_jumps


def after(change, chains, jumps):
    """A table's (chain names, jumps) once `change` is applied to it: what iptables-restore does."""
    names = (set(chains) - set(change.delete)) | {c.name for c in change.replace}
    left = list(jumps)
    for j in change.del_jumps:
        left.remove(j)  # a -D of a jump that is not there fails the whole transaction
    return names, [*change.add_jumps, *left]


def test_a_firewall_change_applied_again_changes_nothing_and_keeps_one_copy_of_a_doubled_jump():
    """Before: a retry of the same change (its answer lost) failed on -D of what was gone or
    added our jump a second time. Pruned against the table as it is, it is a no-op."""
    state = desired.build(parse(BASE), OCN)
    jump = next(j for j in state.jumps if j.table == "nat")
    stale = Jump("nat", "POSTROUTING", "-o ip6tnl9 -j MAPE-SNAT")
    nat = [c for c in state.chains if c.table == "nat"]
    for have_jumps in ([], [jump, jump, jump, stale], [stale, stale]):
        others = tuple(j for j in state.jumps if j.table != "nat") + tuple(have_jumps)
        have = replace(state, chains=frozenset(c for c in state.chains if c.table != "nat"), jumps=others)
        (change,) = [a for a in diff(state, have).actions if isinstance(a, FirewallChange)]
        names, jumps = after(change, [], have_jumps)
        assert Counter(jumps) == {jump: 1} and names == {c.name for c in nat}
        again = change.against(names, jumps)
        assert again is not None and again.replace == change.replace  # rewriting whole chains is safe
        assert not again.touches_jumps, again
        assert after(again, names, jumps) == (names, jumps)
    gone = FirewallChange("nat", delete=("MAPE-OLD",), del_jumps=(stale,))
    assert gone.against(["MAPE-OLD"], [stale]) == gone and gone.against([], []) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[wan]\ninterface = "wan0"\nbogus = 1\n', "wan.bogus: unknown key"),
        ("[tunnel]\n", "wan: Field required"),
        (BASE + "[tunnel]\nmtu = 99999\n", "tunnel.mtu"),
        (BASE + '[isp]\nname = "explicit"\n', 'isp.rule: is required when isp.name = "explicit"'),
        (BASE + '[snat]\nreserved_ports = ["9-2"]\n', "snat.reserved_ports: bad port or range '9-2'"),
        (
            BASE + "[pppoe]\nfwmark = 0x11170\nmask = 0xffff\n",
            "pppoe.fwmark: 0x11170 has bits outside pppoe.mask 0xffff",
        ),
        (BASE + "[pppoe]\ntable = 254\n", "pppoe.table: 254 is a kernel table"),
        (BASE + '[tunnel]\nname = "wan0"\n', "tunnel.name: 'wan0' is also wan.interface"),
        (BASE + '[lan]\ninterfaces = ["wan0"]\n', "lan.interfaces: ['wan0'] names the WAN"),
        (BASE + '[pppoe]\ninterface = "wan0"\n', "pppoe.interface: 'wan0' must differ"),
        (BASE + '[tunnel]\nencap_limit = "4"\n', "tunnel.encap_limit: '4': give \"none\""),
        (BASE + "[tunnel]\nmtu = 99999\n", "tunnel.mtu: 99999: Input should be less than or equal to 65000"),
        ('[wan]\ninterface = "eth0.10.100.1000"\n', "wan.interface: interface name 'eth0.10.100.1000' is 16 bytes"),
        ('[wan]\ninterface = "eth0:1"\n', "wan.interface: interface name 'eth0:1' has ':'"),
        ('[wan]\ninterface = ".."\n', "wan.interface: '..' is not a valid interface name"),
        ('[wan]\ninterface = "eth+"\n', "wan.interface: interface name 'eth+': iptables and nftables read"),
        (
            BASE + "[lan]\ninterfaces = ['lan\"0']\n",
            "lan.interfaces.0: interface name 'lan\"0' has '\"', which nftables",
        ),
        (BASE + '[pppoe]\ninterface = "pp\'p"\n', 'pppoe.interface: interface name "pp\'p" has "\'", which'),
        ("[wan\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(text, message):
    from mape_daemon.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(text, "test.toml")


def test_the_shipped_example_config_is_valid_and_documents_every_section():
    from mape_daemon.config import Config, load

    example = Path(__file__).parents[1] / "etc" / "mape.toml"
    cfg = load(example)
    assert cfg.wan.interface == "eth0" and cfg.pppoe is None
    text = example.read_text()
    for section in Config.model_fields:
        assert f"[{section}]" in text, section
    # The commented PPPoE section is valid too once uncommented.
    block = text[text.index("# [pppoe]") : text.index("[daemon]")].splitlines()
    pppoe = parse(BASE + "\n".join(line.removeprefix("# ") for line in block if line.startswith("# ")))
    assert pppoe.pppoe is not None and str(pppoe.pppoe.hosts[0]) == "192.168.1.55/32"
