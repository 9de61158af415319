"""RFC 7597 mapping: golden vectors and the laws of the mapping, checked over random rules."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mape_daemon.mapcalc import IidLayout, MappingError, MapRule, compute, decode_ce, port_ranges, psid_of_port

RFC_RULE = MapRule(IPv6Network("2001:db8::/40"), IPv4Network("192.0.2.0/24"), ea_len=16, psid_offset=6)
RFC_PREFIX = IPv6Network("2001:db8:12:3400::/56")


def expanded(ranges):
    return [p for lo, hi in ranges for p in range(lo, hi + 1)]


def test_rfc7597_appendix_a_example_1_rfc_layout():
    p = compute(RFC_RULE, RFC_PREFIX)
    assert p.ipv4 == IPv4Address("192.0.2.18")
    assert (p.psid, p.psid_len) == (0x34, 8)
    assert p.ce_ipv6 == IPv6Address("2001:db8:12:3400:0:c000:212:34")
    assert p.port_ranges[:2] == ((1232, 1235), (2256, 2259))
    assert (63696, 63699) in p.port_ranges
    assert p.port_ranges[-1] == (64720, 64723)
    assert (len(p.port_ranges), p.ports) == (63, 252)


def test_rfc7597_appendix_a_example_1_draft03_layout():
    p = compute(RFC_RULE, RFC_PREFIX, layout=IidLayout.DRAFT03)
    # The RFC identifier shifted left by one octet; the rest of the mapping is unchanged.
    assert p.ce_ipv6 == IPv6Address("2001:db8:12:3400:c0:2:1200:3400")
    assert p.ipv4 == IPv4Address("192.0.2.18")
    assert p.iid is IidLayout.DRAFT03


def test_ocn_primer_example():
    rule = MapRule(
        IPv6Network("2400:4050::/34"),
        IPv4Network("153.240.0.0/16"),
        ea_len=22,
        psid_offset=6,
        br=IPv6Address("2001:380:a120::9"),
        iid=IidLayout.DRAFT03,
    )
    p = compute(rule, IPv6Network("2400:4050:1234:5600::/56"))
    assert p.ipv4 == IPv4Address("153.240.72.209")
    assert p.psid == 22
    assert p.ce_ipv6 == IPv6Address("2400:4050:1234:5600:99:f048:d100:1600")
    assert compute(rule, IPv6Network("2400:4050:1234:5600::/56"), layout=IidLayout.RFC7597).ce_ipv6 == IPv6Address(
        "2400:4050:1234:5600:0:99f0:48d1:16"
    )
    assert (len(p.port_ranges), p.ports) == (63, 1008)


def test_address_and_longer_prefix_give_the_same_end_user_prefix_and_zero_subnet_id():
    a = compute(RFC_RULE, IPv6Address("2001:db8:12:34ff:1:2:3:4"))
    b = compute(RFC_RULE, IPv6Network("2001:db8:12:34ab::/64"))
    assert a.end_user_prefix == b.end_user_prefix == RFC_PREFIX
    assert a.ce_ipv6 == b.ce_ipv6 == IPv6Address("2001:db8:12:3400:0:c000:212:34")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"psid_offset": 16}, "PSID offset 16 is outside"),
        ({"ea_len": 20, "psid_offset": 6}, "PSID offset 6 \\+ PSID length 12"),
        ({"ea_len": 4}, "gives an IPv4 prefix"),
        ({"ea_len": -1}, "negative"),
        ({"ea_len": 16, "psid_len": 4}, "contradicts the rule"),
    ],
)
def test_impossible_rules_are_refused(kwargs, message):
    base = {"ipv6_prefix": IPv6Network("2001:db8::/40"), "ipv4_prefix": IPv4Network("192.0.2.0/24")}
    with pytest.raises(MappingError, match=message):
        MapRule(**{"ea_len": 16, **base, **kwargs})


def test_prefix_outside_rule_or_too_short_is_refused():
    with pytest.raises(MappingError, match="not inside the rule prefix"):
        compute(RFC_RULE, IPv6Network("2001:db9::/56"))
    with pytest.raises(MappingError, match="shorter than the end-user prefix length /56"):
        compute(RFC_RULE, IPv6Network("2001:db8:12::/48"))


def test_provisioned_psid_when_ea_bits_carry_none():
    # A 1:1 /32 rule with no EA bits: the PSID comes from provisioning.
    rule = MapRule(IPv6Network("2001:db8:1::/56"), IPv4Network("198.51.100.7/32"), ea_len=0, psid_len=4)
    with pytest.raises(MappingError, match="PSID must be provisioned"):
        compute(rule, IPv6Network("2001:db8:1::/56"))
    with pytest.raises(MappingError, match="does not fit in 4 bits"):
        compute(rule, IPv6Network("2001:db8:1::/56"), psid=16)
    p = compute(rule, IPv6Network("2001:db8:1::/56"), psid=5)
    assert (p.ipv4, p.psid, p.psid_len) == (IPv4Address("198.51.100.7"), 5, 4)
    assert p.ports == 63 * 2 ** (16 - 6 - 4)


def test_no_sharing_rule_gives_all_non_system_ports():
    rule = MapRule(IPv6Network("2001:db8::/40"), IPv4Network("192.0.2.0/24"), ea_len=8)
    p = compute(rule, IPv6Network("2001:db8:7::/48"))
    assert (p.ipv4, p.psid_len) == (IPv4Address("192.0.2.7"), 0)
    assert p.port_ranges == tuple((a * 1024, a * 1024 + 1023) for a in range(1, 64))


@st.composite
def rules_and_psids(draw):
    r4 = draw(st.integers(8, 32))
    offset = draw(st.integers(0, 15))
    k = draw(st.integers(0, 16 - offset))
    p = 32 - r4
    r6 = draw(st.integers(16, 64 - (p + k)))
    ipv4 = IPv4Network((draw(st.integers(0, 2**32 - 1)) >> p << p, r4))
    ipv6 = IPv6Network((draw(st.integers(0, 2**128 - 1)) >> (128 - r6) << (128 - r6), r6))
    rule = MapRule(ipv6, ipv4, ea_len=p + k, psid_offset=offset)
    return rule, k


@settings(max_examples=200, deadline=None)
@given(rules_and_psids())
def test_port_sets_of_one_rule_partition_the_ports_above_the_excluded_range(rule_k):
    rule, k = rule_k
    a = rule.psid_offset
    seen: set[int] = set()
    total = 0
    for psid in range(1 << k):
        ports = expanded(port_ranges(psid, k, a))
        total += len(ports)
        seen.update(ports)
        assert all(psid_of_port(port, k, a) == psid for port in ports)
    assert total == len(seen), "port sets of two PSIDs overlap"
    first = 0 if a == 0 else 2 ** (16 - a)
    assert seen == set(range(first, 65536))


@settings(max_examples=300, deadline=None)
@given(rules_and_psids(), st.integers(0, 2**128 - 1), st.sampled_from(list(IidLayout)))
def test_ipv4_and_psid_are_recovered_from_the_ce_address(rule_k, bits, layout):
    rule, _k = rule_k
    n = rule.end_user_len
    host = bits & ((1 << (128 - rule.ipv6_prefix.prefixlen)) - 1)
    addr = IPv6Address(int(rule.ipv6_prefix.network_address) | host)
    p = compute(rule, addr, layout=layout)
    assert p.end_user_prefix.prefixlen == n and addr in p.end_user_prefix
    assert p.ipv4 in rule.ipv4_prefix
    assert decode_ce(p.ce_ipv6, layout) == (p.ipv4, p.psid)
    assert p.ce_ipv6 in p.end_user_prefix
    # Subnet-ID bits between the end-user prefix and /64 are zero.
    assert (int(p.ce_ipv6) >> 64) & ((1 << (64 - n)) - 1) == 0
