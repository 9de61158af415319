"""HB46PP's pure layer: the TXT record, the request, the answer checked, the method chosen, the
MAP-E rules mapped, and the spec's waits (v6mig-prov spec 1.1, sections 3.1-3.6)."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from urllib.parse import parse_qs, urlsplit

import pytest

from mape_daemon import hb46pp
from mape_daemon.hb46pp import Outcome, Pointer, ProvisioningError
from mape_daemon.mapcalc import IidLayout, compute

# The spec's own example answer (section 3.4; v6pc/v6mig-prov spec.md 1.1, CC BY 4.0), trimmed of
# the methods we do not run.
SPEC_EXAMPLE = {
    "enabler_name": "A VNE",
    "service_name": "Highspeed 4over6",
    "isp_name": "ISP-A",
    "ttl": 86400,
    "token": "640756965820d3b9025b6941f9590af6802830ba58663fe8f043dc92b576f17a",
    "auth": "ok",
    "order": ["464xlat", "map_e", "dslite"],
    "map_e": {
        "version": 0,
        "mesh": True,
        "br": "2001:db8:1::1",
        "rules": [{"ipv6": "2001:db8:1:2000::/52", "ipv4": "203.0.113.0/24", "ea_length": 12, "psid_offset": 4}],
    },
    "dslite": {"aftr": "aftr.example.net"},
    "464xlat": {"nat64prefix": "2001:db8:6::/96"},
    "ipip": [{"ipv6_local": "2001:db8:7:100::7", "ipv6_remote": "2001:db8:7::1", "ipv4": "203.0.113.0/29"}],
}


def offer(**changes) -> hb46pp.Offer:
    return hb46pp.parse_offer(json.dumps({**SPEC_EXAMPLE, **changes}).encode())


def test_the_txt_record_is_found_among_others_and_its_modes_checked():
    p = hb46pp.parse_txt(["v=spf1 -all", "v=v6mig-1 url=https://vne.example.jp/rule.cgi t=b"])
    assert p == Pointer("https://vne.example.jp/rule.cgi", True)
    assert hb46pp.parse_txt(["v=v6mig-1 url=http://10.0.0.1/x t=a"]).verify is False
    for bad, why in (
        (["v=spf1 -all"], "no v=v6mig-1 record"),
        (["v=v6mig-1 url=ftp://x/ t=a"], "no usable URL"),
        (["v=v6mig-1 url=https://x/ t=c"], "t= is 'c'"),
        (["v=v6mig-1 url=http://x/ t=b"], "verify a certificate over http"),
    ):
        with pytest.raises(ProvisioningError, match=why):
            hb46pp.parse_txt(bad)


def test_the_request_carries_the_required_parameters_and_the_token():
    url = hb46pp.query_url(Pointer("https://vne.example.jp/rule.cgi?x=1", True), ("map_e", "dslite"), "ab" * 32)
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.path == "/rule.cgi" and q["x"] == "1"  # the record's own query kept
    assert q["capability"] == "map_e,dslite" and q["token"] == "ab" * 32
    assert q["vendorid"][:6] == "acde48" and q["product"] == "mape-daemon"
    assert all(c.isdigit() or c == "_" for c in q["version"])  # [0-9_]{1,32}: dots become _
    assert "token" not in hb46pp.query_url(Pointer("https://x/", True), ("map_e",))


def test_the_spec_example_is_read_and_its_map_e_rule_maps_a_prefix():
    o = offer()
    assert o.order == ("464xlat", "map_e", "dslite") and o.ttl == 86400 and o.token == SPEC_EXAMPLE["token"]
    assert o.source == "A VNE Highspeed 4over6" and o.dslite_aftr == "aftr.example.net" and o.map_e.mesh is True
    assert o.ipip == ()  # not on offer: not read
    assert hb46pp.choose(o, ("map_e", "dslite", "ipip")) == "map_e"  # 464xlat first, but not ours
    assert hb46pp.choose(o, ("dslite",)) == "dslite"
    assert hb46pp.choose(o, ("map_e", "dslite"), fixed="dslite") == "dslite"  # the user's fixed method wins
    assert hb46pp.choose(o, ("map_e", "ipip"), fixed="ipip") is None  # ... if on offer
    rule = hb46pp.rule_table(o).match(IPv6Network("2001:db8:1:2345::/64"))
    assert rule.iid is IidLayout.DRAFT03 and rule.br == IPv6Address("2001:db8:1::1") and rule.k == 4
    p = compute(rule, IPv6Network("2001:db8:1:2345::/64"))
    # EA bits 0x345: IPv4 suffix 0x34 = 52, PSID 5 (offset 4: ports 0x?5?? of each of 15 blocks)
    assert p.ipv4 == IPv4Address("203.0.113.52") and p.psid == 5
    assert hb46pp.rule_table(offer(map_e={**SPEC_EXAMPLE["map_e"], "version": 1})).rules[0].iid is IidLayout.RFC7597


def test_the_longest_rule_is_the_bmr():
    rules = [{"ipv6": "2001:db8:1::/48", "ipv4": "198.51.100.0/24", "ea_length": 16, "psid_offset": 6},
             {"ipv6": "2001:db8:1:2000::/52", "ipv4": "203.0.113.0/24", "ea_length": 12, "psid_offset": 4}]  # fmt: skip
    table = hb46pp.rule_table(offer(map_e={"br": "2001:db8:1::1", "rules": rules}))
    assert table.match(IPv6Network("2001:db8:1:2345::/64")).ipv4_prefix.network_address == IPv4Address("203.0.113.0")
    assert table.match(IPv6Network("2001:db8:1:3400::/56")).ipv4_prefix.network_address == IPv4Address("198.51.100.0")


def test_an_empty_order_is_an_answer_with_nothing_on_offer():
    o = hb46pp.parse_offer(b'{"order": [], "auth": "bad"}')
    assert o.order == () and o.auth == "bad" and hb46pp.choose(o, ("map_e",)) is None
    with pytest.raises(ProvisioningError, match="offers no map_e"):
        hb46pp.rule_table(o)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"ttl": 60}', "no order"),
        (b'{"order": "map_e"}', "order is 'map_e', not a list"),
        (b'{"order": [1]}', "not a list of method names"),
        (b'{"order": [], "ttl": 604801}', "ttl 604801 is outside"),
        (b'{"order": [], "ttl": true}', "ttl is True, not a int"),
        (b'{"order": ["map_e"]}', "no map_e"),
        (b'{"order": ["map_e"], "map_e": {"br": "2001:db8::1", "rules": []}}', "has no rules"),
        (b'{"order": ["map_e"], "map_e": {"br": "nope", "rules": []}}', "map_e.br"),
        (b'{"order": ["map_e"], "map_e": {"version": 2, "br": "2001:db8::1", "rules": []}}', "version is 2"),
        (
            b'{"order": ["map_e"], "map_e": {"br": "2001:db8::1", "rules": [{"ipv6": "2001:db8::/32", '
            b'"ipv4": "203.0.113.0/24", "ea_length": 4, "psid_offset": 6}]}}',
            r"rules\[0\]: .*not an address",
        ),
        (
            b'{"order": ["map_e"], "map_e": {"br": "2001:db8::1", "rules": [{"ipv6": "2001:db8::/32"}]}}',
            r"no map_e.rules\[0\].ipv4",
        ),
        (b'{"order": ["dslite"], "dslite": {}}', "no dslite.aftr"),
        (b'{"order": ["ipip"], "ipip": []}', "ipip with no tunnel"),
        (
            b'{"order": ["ipip"], "ipip": [{"ipv6_local": "x", "ipv6_remote": "2001:db8::1", "ipv4": "192.0.2.1/32"}]}',
            r"ipip\[0\]",
        ),
    ],
)
def test_a_bad_answer_is_refused_with_what_is_wrong(body, why):
    with pytest.raises(ProvisioningError, match=why):
        hb46pp.parse_offer(body)


def test_a_broken_method_that_is_not_on_offer_does_not_spoil_the_answer():
    o = hb46pp.parse_offer(b'{"order": ["dslite"], "dslite": {"aftr": "2001:db8::aa"}, "map_e": {"rules": 7}}')
    assert o.dslite_aftr == "2001:db8::aa" and o.map_e is None


def test_the_waits_are_the_spec_windows_drawn_at_random():
    rng = random.Random(1)
    windows = {Outcome.NO_RECORD: (3600, 10800), Outcome.DNS_FAILED: (60, 600), Outcome.NO_REPLY: (600, 1800),
               Outcome.BAD_REPLY: (600, 1800)}  # fmt: skip
    for outcome, (lo, hi) in windows.items():
        waits = [hb46pp.next_wait(outcome, rng=rng) for _ in range(200)]
        assert lo <= min(waits) < lo + (hi - lo) / 10 and hi - (hi - lo) / 10 < max(waits) <= hi, outcome
    ttl = [hb46pp.next_wait(Outcome.OK, 86400, rng) for _ in range(200)]
    assert min(ttl) >= 0.9 * 86400 and max(ttl) <= 86400 and len(set(ttl)) == 200  # never past the ttl
    no_ttl = [hb46pp.next_wait(Outcome.OK, None, rng) for _ in range(200)]
    assert min(no_ttl) >= 72000 and max(no_ttl) <= 86400


def test_credentials_go_only_where_section_3_3_lets_them():
    creds = hb46pp.Credentials("me", "s3cret")
    named = hb46pp.Credentials("me", "s3cret", "vne.example.jp")
    verified, unverified = Pointer("https://vne.example.jp/x", True), Pointer("https://vne.example.jp/x", False)

    def sent(pointer, c):
        q = parse_qs(urlsplit(hb46pp.query_url(pointer, ("map_e",), None, c)).query)
        return (q.get("user"), q.get("pass"))

    assert sent(verified, creds) == (["me"], ["s3cret"]) and sent(Pointer("http://h/x", False), creds)[0] == ["me"]
    assert sent(verified, named) == (["me"], ["s3cret"])
    assert sent(unverified, named) == (None, None)  # not verified (t=a)
    assert sent(Pointer("https://other.example.jp/x", True), named) == (None, None)  # another host (a redirect)
    assert sent(Pointer("http://vne.example.jp/x", False), named) == (None, None)  # not https
    assert "s3cret" not in repr(named)
