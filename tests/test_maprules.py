"""The bundled rule tables: well-formed, disjoint, and every rule maps inside its IPv4 prefix."""

import itertools
import json
from importlib import resources
from ipaddress import IPv6Address, IPv6Network

import pytest

from mape_daemon import maprules
from mape_daemon.mapcalc import IidLayout, compute

TABLE = maprules.bundled()


def test_table_holds_every_isp_with_its_provenance():
    raw = json.loads(resources.files("mape_daemon").joinpath("data/map-rules.json").read_text())
    assert "site-u2023" in raw["about"]  # the provenance travels with the data
    assert len(TABLE.rules) == len(raw["rules"]) == 426
    # Rules kept for provenance but never loaded carry the reason they are out.
    assert all(r["reason"] for r in raw["excluded"]) and len(raw["excluded"]) == 2
    assert {r.isp for r in TABLE.rules} == set(maprules.ISP_NAMES)
    assert all(r.iid is IidLayout.DRAFT03 for r in TABLE.rules)


def test_every_rule_has_a_56_bit_end_user_prefix():
    assert {r.end_user_len for r in TABLE.rules} == {56}


def test_no_two_bundled_rules_overlap():
    nets = sorted((r.ipv6_prefix for r in TABLE.rules), key=lambda n: (int(n.network_address), n.prefixlen))
    for a, b in itertools.pairwise(nets):
        assert not a.overlaps(b), f"{a} overlaps {b}"


def test_no_two_bundled_rules_overlap_in_ipv4():
    """Two rules onto one IPv4 prefix would give two CEs the same address and PSID (the NURO table
    had three rules onto 219.104.128.0/20)."""
    nets = sorted((r.ipv4_prefix for r in TABLE.rules), key=lambda n: (int(n.network_address), n.prefixlen))
    for a, b in itertools.pairwise(nets):
        assert not a.overlaps(b), f"{a} overlaps {b}"


def test_excluded_rules_are_not_loaded():
    assert not any(str(r.ipv6_prefix) in ("240d:f:a000::/36", "240d:f:d000::/36") for r in TABLE.rules)


@pytest.mark.parametrize("rule", TABLE.rules, ids=lambda r: f"{r.isp}-{r.ipv6_prefix}")
def test_first_and_last_end_user_prefix_map_inside_the_ipv4_prefix(rule):
    first = IPv6Network((rule.ipv6_prefix.network_address, 56))
    last = IPv6Network((int(rule.ipv6_prefix.broadcast_address) >> 72 << 72, 56))
    for eup in (first, last):
        p = compute(rule, eup)
        assert p.ipv4 in rule.ipv4_prefix
        assert p.end_user_prefix == eup
        assert TABLE.match(eup) is rule
    assert compute(rule, first).ipv4 == rule.ipv4_prefix.network_address
    assert compute(rule, last).ipv4 == rule.ipv4_prefix.broadcast_address


@pytest.mark.parametrize(
    ("prefix", "isp", "ports"),
    [
        ("2400:4050:1234:5600::/56", "ocn", 1008),
        ("2400:4150:ab00:1200::/56", "ocn", 1008),
        ("240b:10:abcd:ef00::/56", "v6plus", 240),
        ("2404:7a80:1234:5600::/56", "biglobe", 240),
        ("2404:7a84:1234:5600::/56", "biglobe", 240),
    ],
)
def test_each_service_is_found_with_its_port_count(prefix, isp, ports):
    rule = TABLE.match(IPv6Network(prefix))
    assert rule.isp == isp
    assert compute(rule, IPv6Network(prefix)).ports == ports


def test_biglobe_east_and_west_have_their_own_br():
    east = TABLE.match(IPv6Network("2404:7a80:1234:5600::/56"))
    west = TABLE.match(IPv6Network("2404:7a84:1234:5600::/56"))
    assert (east.br, west.br) == (IPv6Address("2001:260:700:1::1:275"), IPv6Address("2001:260:700:1::1:276"))


def test_longest_prefix_wins():
    rule = maprules.MapRule(IPv6Network("2001:db8::/32"), maprules.IPv4Network("192.0.2.0/24"), ea_len=16)
    longer = maprules.MapRule(IPv6Network("2001:db8:ff00::/40"), maprules.IPv4Network("198.51.100.0/24"), ea_len=16)
    table = maprules.RuleTable((rule, longer))
    assert table.match(IPv6Network("2001:db8:ff12:3400::/56")) is longer
    assert table.match(IPv6Network("2001:db8:1200:3400::/56")) is rule


def test_unknown_prefix_fails_closed_with_a_clear_message():
    with pytest.raises(maprules.NoRuleError, match="matches no bundled MAP-E rule; give the rule explicitly"):
        TABLE.match(IPv6Network("2001:db8:1:2::/64"))
    with pytest.raises(maprules.NoRuleError, match="not served by OCN Virtual Connect"):
        TABLE.match(IPv6Address("2409:10:1234:5678::1"))


def test_isp_filter_refuses_a_prefix_of_another_isp():
    with pytest.raises(maprules.NoRuleError, match="matches no v6plus"):
        TABLE.match(IPv6Network("2400:4050:1234:5600::/56"), isp="v6plus")
