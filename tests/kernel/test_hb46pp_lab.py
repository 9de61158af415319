"""HB46PP on the lab line (issue 23): a line whose prefix is in no bundled table, whose MAP-E rule
only the provisioning server gives (dnsmasq with the 4over6.info record on the line's resolver, an
HTTPS server with a lab CA in the ISP; the resolver announced in the RAs, as RDNSS). The daemon
learns the resolver, maps by that rule, traffic crosses the strict BR in the set, and after a
restart with the server failing, the cached answer maps the line."""

from __future__ import annotations

import json

from tests.kernel.conftest import running_lab
from tests.lab import checks
from tests.lab.daemon import Daemon
from tests.lab.mapping import LabRule
from tests.lab.topo import wait_for

# Not in the bundled tables: only HB46PP can map this line. EA bits 0x1234: 192.0.2.18, PSID 0x34.
RULE = LabRule("2001:db8:4000::/40", "192.0.2.0/24", 16, 4, "2001:db8:ffff::9")
ANSWER = {
    "enabler_name": "Lab VNE",
    "ttl": 3600,
    "token": "ab" * 32,
    "order": ["dslite", "map_e"],  # the first method we run is chosen
    "dslite": {"aftr": "aftr.lab.example"},
    "map_e": {"version": 0, "br": RULE.br, "rules": [
        {"ipv6": RULE.ipv6_prefix, "ipv4": RULE.ipv4_prefix, "ea_length": RULE.ea_len, "psid_offset": RULE.offset}]},
}  # fmt: skip


def test_a_line_provisioned_by_hb46pp_is_mapped_by_its_rule_and_by_the_cache_when_the_server_fails(tmp_path, request):
    with running_lab(tmp_path, request, rule=RULE, wan_prefix="2001:db8:4012:3400::/64") as lab:
        _, ca = lab.start_hb46pp(ANSWER)
        ce = lab.ce_params()
        assert (ce.ipv4, ce.psid) == ("192.0.2.18", 0x34)
        chain = lab.br_add_ce(ce)
        # No isp.resolvers: the line's resolver is learned from the RAs' RDNSS.
        # The answer offers DS-Lite first; the method fixed to MAP-E wins (the spec's user-fixed mode).
        config = (f'[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[isp]\nprovisioning = "hb46pp"\n'
                  f'method = "map-e"\nca_file = "{ca}"\n')  # fmt: skip
        d = Daemon(lab, tmp_path, config).start()
        try:
            wait_for(lambda: d.synced_by_me() and d.state().get("ipv4") == ce.ipv4, 120, "the provisioned mapping")
            s = d.state()
            assert (s["isp"], s["psid"], s["ce_ipv6"]) == ("hb46pp", ce.psid, ce.ce_draft03)  # version 0: draft-03
            assert s["provisioning"]["state"] == "ok" and s["provisioning"]["source"] == "Lab VNE"
            assert "HB46PP: MAP-E rules from Lab VNE (1 rule(s), BR 2001:db8:ffff::9)" in d.text()
            checks.data_path(lab, ce, chain)
            (req,) = [json.loads(x) for x in (lab.dir / "hb46pp-requests.jsonl").read_text().splitlines()]
            assert (
                "capability=map_e%2Cdslite%2Cipip" in req["path"]
                and "vendorid=acde48" in req["path"]
                and "token" not in req["path"]
            )
        finally:
            assert d.stop() == 0, d.text()

        # The server fails from now on; a restart maps the line by the cached answer at once.
        (lab.dir / "hb46pp-answers.json").write_text(json.dumps({"/config": {"status": 500, "body": "down"}}))
        seen = len(d.text())
        d = Daemon(lab, tmp_path, config).start()
        try:
            wait_for(lambda: d.synced_by_me() and d.state().get("ipv4") == ce.ipv4, 120, "the cached mapping")
            wait_for(lambda: "keeping the last good answer" in d.text()[seen:], 60, "the failed access said")
            assert "answered HTTP 500" in d.text()[seen:] and d.state()["provisioning"]["state"] == "failed"
            checks.data_path(lab, ce, chain)
            requests = (lab.dir / "hb46pp-requests.jsonl").read_text().splitlines()
            assert f"token={'ab' * 32}" in json.loads(requests[-1])["path"]  # the cached answer's token
        finally:
            assert d.stop() == 0, d.text()
