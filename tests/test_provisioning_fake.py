"""HB46PP in the daemon, over a fake access and the fake kernel: what each outcome does to the
rules in force and the next wait, the cache across restarts, and a provisioned line mapped,
kept across a reload, asked again when its address changes. The wire is tests/test_provision_host.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from ipaddress import IPv4Address

import pytest

from mape_daemon import hb46pp
from mape_daemon.config import ConfigError, parse
from mape_daemon.hb46pp import Outcome
from mape_daemon.provisioning import Access, Provisioner
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from tests.fake_kernel import FakeKernel
from tests.test_hb46pp import SPEC_EXAMPLE

LINE = "2001:db8:1:2345:5054:ff:fe12:3456"  # in the spec example's rule, in no bundled table
CONFIG = '[wan]\ninterface = "wan0"\n[isp]\nprovisioning = "hb46pp"\nresolvers = ["2001:db8::53"]\n'
ISP = parse(CONFIG).isp


def ok(**changes) -> Access:
    offer = hb46pp.parse_offer(json.dumps({**SPEC_EXAMPLE, **changes}).encode())
    return Access(Outcome.OK, offer, f"https://prov/config offers {', '.join(offer.order) or 'nothing'}")


def test_each_outcome_keeps_or_changes_the_rules_as_the_spec_says(tmp_path, caplog):
    p = Provisioner(tmp_path)
    table, wait = p.judge(ok(), ISP)
    assert table is not None and table.rules[0].isp == "hb46pp" and 0.9 * 86400 <= wait <= 86400
    assert p.token == SPEC_EXAMPLE["token"] and p.report.state == "ok" and p.report.source == "A VNE Highspeed 4over6"
    assert json.loads((tmp_path / "hb46pp.json").read_text())["answer"]["map_e"] == SPEC_EXAMPLE["map_e"]
    with caplog.at_level(logging.WARNING, "mape-daemon"):
        for outcome, (lo, hi) in ((Outcome.BAD_REPLY, (600, 1800)), (Outcome.NO_REPLY, (600, 1800)),
                                  (Outcome.DNS_FAILED, (60, 600))):  # fmt: skip
            kept, wait = p.judge(Access(outcome, detail=f"it went {outcome}"), ISP)
            assert kept == table and lo <= wait <= hi and p.report.state == "failed", outcome
        assert "keeping the last good answer" in caplog.text
        kept, _ = p.judge(ok(order=[]), ISP)  # an empty answer never replaces working rules
        assert kept == table and "nothing we run" in p.report.detail
        kept, _ = p.judge(ok(order=["lw4o6"]), ISP)  # nothing we run
        assert kept == table
    assert Provisioner(tmp_path).load_cache(ISP) == table  # a restart uses the last good answer meanwhile
    gone, wait = p.judge(Access(Outcome.NO_RECORD, detail="no 4over6.info TXT record (NXDOMAIN)"), ISP)
    assert gone is None and 3600 <= wait <= 10800 and p.token is None  # c.2: the line does not provision
    assert not (tmp_path / "hb46pp.json").exists() and Provisioner(tmp_path).load_cache(ISP) is None


def test_a_damaged_cache_is_said_and_ignored(tmp_path, caplog):
    (tmp_path / "hb46pp.json").write_text('{"answer": {"order": ["map_e"]}}')
    with caplog.at_level(logging.WARNING, "mape-daemon"):
        assert Provisioner(tmp_path).load_cache(ISP) is None
    assert "ignoring the cached answer" in caplog.text and "no map_e" in caplog.text


def test_the_rules_field_cannot_come_from_the_file():
    with pytest.raises(ConfigError, match=r"isp\.provisioned: is set by the daemon"):
        parse(CONFIG + "provisioned = 1\n")
    with pytest.raises(ConfigError, match="link-local: add its interface"):
        parse(CONFIG.replace("2001:db8::53", "fe80::1"))
    assert parse(CONFIG.replace("2001:db8::53", "fe80::1%wan0")).isp.resolvers == ("fe80::1%wan0",)


class FakeAccess:
    def __init__(self, *answers: Access):
        self.answers, self.calls = list(answers), []

    def __call__(self, resolvers, capability, token, cafile, credentials=None):
        self.calls.append((tuple(resolvers), capability, token))
        self.credentials = credentials
        return self.answers.pop(0)


@pytest.fixture
def line(tmp_path):
    k = FakeKernel(("wan0", "lan0"))
    k.slaac(LINE)
    path = tmp_path / "mape.toml"
    path.write_text(CONFIG)
    access = FakeAccess(ok(), ok(map_e={**SPEC_EXAMPLE["map_e"], "br": "2001:db8:1::2"}))
    svc = Service(str(path), parse(CONFIG), RecordFile(tmp_path / "run"), lambda cfg: k, tmp_path / "run",
                  provisioner=Provisioner(tmp_path / "lib", access))  # fmt: skip
    return svc, k, access, tmp_path


def run_loop_once(svc) -> None:
    """The provisioning loop until it has judged one access and waits."""

    before = svc.provisioner.report

    async def go():
        task = asyncio.create_task(svc.provisioner.run(lambda: svc.configs.pending or svc.config,
                                                       svc._wan_addresses, svc._provisioned))  # fmt: skip
        while svc.provisioner.report is before and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(go())


def test_a_provisioned_line_is_mapped_kept_across_a_reload_and_asked_again_when_its_address_changes(line):
    svc, k, access, tmp_path = line
    assert not asyncio.run(svc.sync_once("start")) or svc.last.params is None
    assert "no HB46PP answer yet" in svc.last.selection.reason  # fail closed: nothing mapped yet
    svc.runner.schedule.started(0)  # as the runner does for the start sync
    run_loop_once(svc)
    assert access.calls == [(("2001:db8::53",), ("map_e", "dslite", "ipip"), None)]
    assert svc.pending is not None and "provisioning" in svc.runner.schedule.causes  # a sync asked for
    assert svc.runner.schedule.urgent  # ... at once
    assert svc.runner.schedule.cause(0) == "provisioning"  # the runner knows the cause (it crashed on it once)
    assert asyncio.run(svc.sync_once("provisioning"))
    p = svc.last.params
    assert p is not None and p.ipv4 == IPv4Address("203.0.113.52") and p.psid == 5 and p.rule.isp == "hb46pp"
    assert str(p.br) in {t.remote for t in k.tunnels.values()}
    state = svc._status(svc.last)
    assert state.isp == "hb46pp" and state.provisioning["source"] == "A VNE Highspeed 4over6"

    tunnels = dict(k.tunnels)
    (tmp_path / "mape.toml").write_text(CONFIG + "# touched\n")
    svc.reload()
    assert asyncio.run(svc.sync_once("reload")) and svc.config.isp.provisioned is not None
    assert dict(k.tunnels) == tunnels  # the reload kept the rules: nothing torn down

    svc.provisioner.wake.clear()
    svc.provisioner.address_seen(svc._wan_addresses())
    assert not svc.provisioner.wake.is_set()  # the same addresses: no new access
    k.slaac("2001:db8:1:2346:5054:ff:fe12:3456")
    asyncio.run(svc.sync_once("netlink"))
    assert svc.provisioner.wake.is_set()  # renumbered: asked again now, not after the ttl
    run_loop_once(svc)
    assert access.calls[-1][2] == SPEC_EXAMPLE["token"]  # the token of the last answer, echoed
    assert asyncio.run(svc.sync_once("provisioning"))
    assert {t.remote for t in k.tunnels.values()} == {"2001:db8:1::2"}  # the new answer's BR


def test_a_cached_answer_maps_the_line_from_the_first_sync(line):
    svc, k, _, tmp_path = line
    svc.provisioner.judge(ok(), ISP)  # a previous run's answer, cached
    again = Service(str(tmp_path / "mape.toml"), parse(CONFIG), RecordFile(tmp_path / "run2"), lambda cfg: k,
                    tmp_path / "run2", provisioner=Provisioner(tmp_path / "lib", FakeAccess()))  # fmt: skip
    assert asyncio.run(again.sync_once("start")) and again.last.params.rule.isp == "hb46pp"


def test_a_reload_that_changes_isp_asks_at_once_and_one_that_does_not_waits(line):
    svc, _, _, tmp_path = line
    asyncio.run(svc.sync_once("start"))
    svc.provisioner.wake.clear()
    (tmp_path / "mape.toml").write_text(CONFIG + "# touched\n")
    svc.reload()
    asyncio.run(svc.sync_once("reload"))
    assert not svc.provisioner.wake.is_set()
    (tmp_path / "mape.toml").write_text(CONFIG.replace('["2001:db8::53"]', '["2001:db8::53", "2001:db8::54"]'))
    svc.reload()
    asyncio.run(svc.sync_once("reload"))
    assert svc.provisioner.wake.is_set() and svc.config.isp.resolvers[-1] == "2001:db8::54"


def test_an_access_made_before_the_first_sync_is_not_made_twice(line):
    """At start the loop may ask before the first sync has read the WAN: that sync's prefixes
    are what it asked for, not a change."""
    svc, _, access, _ = line
    run_loop_once(svc)
    assert len(access.calls) == 1 and svc.provisioner.asked_for == frozenset()
    asyncio.run(svc.sync_once("provisioning"))
    assert not svc.provisioner.wake.is_set() and svc.provisioner.asked_for == {"2001:db8:1:2345::/64"}


def test_without_isp_resolvers_the_ras_rdnss_are_asked_and_none_waits_hours(tmp_path):
    cfg = parse('[wan]\ninterface = "wan0"\n')  # provisioning "auto", no resolvers
    learned: list[str] = []
    access = FakeAccess(ok())
    p = Provisioner(tmp_path, access, learn=lambda wan: learned)
    applied = []

    async def once():
        before = p.report
        task = asyncio.create_task(p.run(lambda: cfg, frozenset, applied.append))
        while p.report is before and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(once())
    assert access.calls == [] and p.report.state == "no resolver" and p.report.next_at - time.time() >= 3600
    learned.append("fe80::1%wan0")
    asyncio.run(once())
    assert access.calls == [(("fe80::1%wan0",), ("map_e", "dslite", "ipip"), None)]
    assert applied and applied[-1] is not None


def test_metrics_say_how_the_last_access_ended_and_when_the_rules_were_fetched(line):
    """Read live from the provisioner: a failed access shows at the next scrape, sync or not."""
    from tests.test_metrics import free_port, scrape

    svc, _, _, tmp_path = line
    text = CONFIG + f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
    (tmp_path / "mape.toml").write_text(text)
    svc.reload()
    asyncio.run(svc.sync_once("reload"))
    svc._serve_metrics()
    try:
        _, m = scrape(svc)
        assert m[("mape_provisioning_state", (("state", "waiting"),))] == 1
        assert ("mape_provisioning_answer_timestamp_seconds", ()) not in m
        run_loop_once(svc)
        text, m = scrape(svc)
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert m[("mape_provisioning_state", (("state", "ok"),))] == 1
        assert abs(m[("mape_provisioning_answer_timestamp_seconds", ())] - time.time()) < 60
        svc.provisioner.judge(Access(Outcome.NO_REPLY, detail="no answer"), ISP)
        _, m = scrape(svc)
        assert m[("mape_provisioning_state", (("state", "failed"),))] == 1
        assert m[("mape_provisioning_state", (("state", "ok"),))] == 0
        svc.provisioner.judge(Access(Outcome.NO_RECORD, detail="NXDOMAIN"), ISP)
        _, m = scrape(svc)
        assert m[("mape_provisioning_state", (("state", "no_record"),))] == 1
    finally:
        svc.metrics.stop()
