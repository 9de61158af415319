"""DS-Lite and IPIP beside MAP-E (issue 23): the parameters each method gives, the state it wants,
switching method on a reload, HB46PP choosing the method, and an AFTR name looked up on the line's
resolvers. Over the fake kernel; the lab runs them for real (tests/kernel/test_lines_lab.py)."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv6Address

import pytest

from mape_daemon import desired, hb46pp
from mape_daemon.config import ConfigError, parse
from mape_daemon.hb46pp import Outcome
from mape_daemon.lines import B4_IPV4, DsLite, FixedIpv4, NoParameters
from mape_daemon.prefix import map_address
from mape_daemon.provisioning import Access, Provisioner
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from mape_daemon.state import Address
from tests.fake_kernel import FakeKernel
from tests.test_hb46pp import SPEC_EXAMPLE

SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"  # OCN: 153.240.72.209 psid 22 by MAP-E
BASE = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\n'
DSLITE = BASE + '[isp]\nmethod = "ds-lite"\nprovisioning = "off"\n[dslite]\naftr = "2001:db8:aa::1"\n'
IPIP = BASE + ('[isp]\nmethod = "ipip"\nprovisioning = "off"\n[ipip]\nremote = "2001:db8:bb::1"\n'
               'ipv4 = "198.18.0.77"\ninterface_id = "::feed"\n')  # fmt: skip


def test_each_method_maps_the_prefix_to_its_own_parameters():
    d = map_address(parse(DSLITE), SLAAC)
    assert isinstance(d, DsLite) and d.ce_ipv6 == IPv6Address("2400:4050:1234:5600::b4")
    assert d.br == IPv6Address("2001:db8:aa::1") and not d.snat and d.port_ranges == ()
    f = map_address(parse(IPIP), SLAAC)
    assert isinstance(f, FixedIpv4) and f.ce_ipv6 == IPv6Address("2400:4050:1234:5600::feed")
    assert f.ipv4 == IPv4Address("198.18.0.77") and f.port_ranges == ((1, 65535),) and f.snat
    m = map_address(parse(BASE), SLAAC)
    assert (m.method, str(m.ipv4), m.psid) == ("map-e", "153.240.72.209", 22)


def test_a_method_without_its_parameters_is_refused_with_the_key_to_set():
    with pytest.raises(ConfigError, match=r"dslite\.aftr: is required"):
        parse(BASE + '[isp]\nmethod = "ds-lite"\nprovisioning = "off"\n')
    with pytest.raises(ConfigError, match=r"ipip\.interface_id: is required"):
        parse(IPIP.replace('interface_id = "::feed"\n', ""))
    with pytest.raises(ConfigError, match=r"isp\.name: 'ocn' names MAP-E rules"):
        parse(BASE + '[isp]\nmethod = "ds-lite"\nname = "ocn"\n')
    with pytest.raises(ConfigError, match=r"ipip\.update_url: .*only \{ipv6\}"):
        parse(IPIP + 'update_url = "https://u.example/{secret}"\n')
    with pytest.raises(ConfigError, match=r"ipip\.update_password: and update_user go together"):
        parse(IPIP + 'update_url = "https://u.example/"\nupdate_user = "me"\n')
    # With HB46PP on, the answer may give what the file leaves out: said as the reason, not refused.
    cfg = parse(BASE + '[isp]\nmethod = "ds-lite"\n')
    with pytest.raises(NoParameters, match="no AFTR"):
        map_address(cfg, SLAAC)


def test_ds_lite_routes_the_lan_into_the_tunnel_without_nat_of_ours():
    cfg = parse(DSLITE)
    want = desired.build(cfg, map_address(cfg, SLAAC), ("ppp0",), native=True)
    (t,) = want.tunnels
    assert (t.local, t.remote, t.mode) == ("2400:4050:1234:5600::b4", "2001:db8:aa::1", "ipip6")
    assert want.addresses == {Address("wan0", "2400:4050:1234:5600::b4", 128), Address("ip6tnl1", str(B4_IPV4), 32)}
    assert not want.guards and "snat" not in want.nft and "masquerade" in want.nft  # PPPoE's, not ours
    assert "maxseg" in want.nft and any(r.table == 10 for r in want.rules)  # MSS clamp, PPPoE beside it
    ipt = desired.build(cfg, map_address(cfg, SLAAC), ("ppp0",), native=False)
    assert not any(c.name.startswith("MAPE-SNAT") for c in ipt.chains)


def test_ipip_nats_the_lan_to_the_fixed_ipv4_over_every_port():
    cfg = parse(IPIP)
    want = desired.build(cfg, map_address(cfg, SLAAC), ("ppp0",), native=True)
    (t,) = want.tunnels
    assert (t.local, t.remote) == ("2400:4050:1234:5600::feed", "2001:db8:bb::1")
    assert Address("ip6tnl1", "198.18.0.77", 32) in want.addresses
    assert "snat ip to numgen inc mod 1 map { 0 : 198.18.0.77 . 1-65535 }" in want.nft
    assert "ip saddr != 198.18.0.77 counter drop" in want.nft and want.guards  # both guards, every port


def kernel_with_line() -> FakeKernel:
    k = FakeKernel(("wan0", "lan0", "ppp0"))
    k.slaac(SLAAC)
    return k


def held(k: FakeKernel) -> tuple:
    """The kernel's state; our jumps into a built-in chain in any order (each is inserted first)."""
    *rest, builtin = k.snapshot()
    return (*rest, [(chain, sorted(rules)) for chain, rules in builtin])


def test_switching_method_on_a_reload_leaves_nothing_of_the_old_one(tmp_path):
    k = kernel_with_line()
    records = RecordFile(tmp_path)
    r = Reconciler(parse(BASE), k, records)
    fresh = {}
    for text in (BASE, DSLITE, IPIP, BASE):
        r.config = parse(text)
        result = r.sync()
        assert result.ok, result.error
        assert not r.sync().plan.actions  # converged: a second sync writes nothing
        # What a router that only ever ran this method would hold.
        other = FakeKernel(("wan0", "lan0", "ppp0"))
        other.slaac(SLAAC)
        assert Reconciler(parse(text), other, RecordFile(tmp_path / f"fresh{len(fresh)}")).sync().ok
        fresh[text] = other
        assert held(k) == held(other), text
    assert k.nft is not None and "153.240.72.209" in k.nft  # back on MAP-E: its set again


def test_a_moved_method_forgets_the_old_mappings_connections(tmp_path):
    k = kernel_with_line()
    r = Reconciler(parse(BASE), k, RecordFile(tmp_path))
    assert r.sync().ok
    r.config = parse(IPIP)
    result = r.sync()
    (c,) = [a for a in result.plan.actions if a.kind == "conntrack"]
    assert c.drop_ipv4 == ("153.240.72.209",) and c.ipv4 == "198.18.0.77"
    r.config = parse(DSLITE)
    (c,) = [a for a in r.sync().plan.actions if a.kind == "conntrack"]
    assert c.drop_ipv4 == ("198.18.0.77",) and c.ipv4 is None  # nothing of ours to NAT to
    r.config = parse(BASE)
    (c,) = [a for a in r.sync().plan.actions if a.kind == "conntrack"]
    # From DS-Lite: the flows the tunnel carried un-NATed would go on un-NATed, and be dropped.
    assert c.ipv4 == "153.240.72.209" and c.unnated_via == "ip6tnl1" and not c.drop_ipv4


TUNNEL = {"ipv6_local": "2001:db8:1:2345::feed", "ipv6_remote": "2001:db8:cc::1", "ipv4": "198.18.5.5/32"}
ANSWER = {**SPEC_EXAMPLE, "order": ["dslite", "ipip", "map_e"], "dslite": {"aftr": "aftr.example.jp"}, "ipip": [TUNNEL]}


def offer(**changes) -> Access:
    o = hb46pp.parse_offer(json.dumps({**ANSWER, **changes}).encode())
    return Access(Outcome.OK, o, "offers " + ", ".join(o.order))


class Wire:
    """The line's resolvers and server, faked: answers in turn; the AFTR's address by name."""

    def __init__(self, *answers: Access, aftr: dict[str, str] | None = None):
        self.answers, self.aftr, self.lookups = list(answers), aftr or {}, []

    def ask(self, resolvers, capability, token, cafile, credentials=None) -> Access:
        return self.answers.pop(0)

    def resolve(self, name: str, resolvers: list[str]) -> str:
        self.lookups.append((name, tuple(resolvers)))
        if name not in self.aftr:
            raise LookupError(f"{name}: no AAAA on the line's resolvers (NXDOMAIN)")
        return self.aftr[name]


def service(tmp_path, text: str, wire: Wire) -> tuple[Service, FakeKernel]:
    k = kernel_with_line()
    (tmp_path / "mape.toml").write_text(text)
    prov = Provisioner(tmp_path / "lib", wire.ask, resolve=wire.resolve)
    return Service(str(tmp_path / "mape.toml"), parse(text), RecordFile(tmp_path / "run"), lambda cfg: k,
                   tmp_path / "run", provisioner=prov), k  # fmt: skip


def loop_until(svc: Service, done) -> None:
    async def go():
        config = lambda: svc.configs.pending or svc.config  # noqa: E731
        task = asyncio.create_task(svc.provisioner.run(config, svc._wan_addresses, svc._provisioned, svc._resolved))
        for _ in range(500):
            if done() or task.done():
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(go())


HB46PP = BASE + '[isp]\nresolvers = ["2001:db8::53"]\n'


def test_hb46pp_picks_ds_lite_first_and_its_aftr_name_is_looked_up_on_the_lines_resolvers(tmp_path):
    wire = Wire(offer(), aftr={"aftr.example.jp": "2001:db8:aa::7"})
    svc, k = service(tmp_path, HB46PP, wire)
    loop_until(svc, lambda: svc.provisioner.aftr is not None)
    assert wire.lookups == [("aftr.example.jp", ("2001:db8::53",))]
    assert asyncio.run(svc.sync_once("provisioning"))
    p = svc.last.params
    assert isinstance(p, DsLite) and p.aftr == IPv6Address("2001:db8:aa::7")
    assert {t.remote for t in k.tunnels.values()} == {"2001:db8:aa::7"}
    state = svc._status(svc.last)
    assert (state.method, state.remote) == ("ds-lite", "2001:db8:aa::7") and "DS-Lite via AFTR" in state.summary


def test_an_aftr_name_that_does_not_resolve_leaves_ds_lite_waiting_and_says_why(tmp_path, caplog):
    wire = Wire(offer())
    svc, k = service(tmp_path, HB46PP, wire)
    with caplog.at_level("WARNING", "mape-daemon"):
        loop_until(svc, lambda: svc.provisioner.aftr_problem is not None)
    assert "DS-Lite: the AFTR aftr.example.jp: no AAAA" in caplog.text
    asyncio.run(svc.sync_once("provisioning"))
    assert svc.last.params is None and "the AFTR aftr.example.jp has no address yet" in svc.last.selection.reason
    assert not k.tunnels  # fail closed: no tunnel to a guessed end


def test_a_user_fixed_method_wins_over_the_answers_order(tmp_path):
    wire = Wire(offer())
    svc, _ = service(tmp_path, HB46PP.replace("[isp]\n", '[isp]\nmethod = "ipip"\n'), wire)
    loop_until(svc, lambda: svc.provisioner.table is not None)
    assert asyncio.run(svc.sync_once("provisioning"))
    p = svc.last.params
    # The offered interface identifier (::feed), in our own prefix; the offered fixed IPv4 and end.
    assert isinstance(p, FixedIpv4) and p.ce_ipv6 == IPv6Address("2400:4050:1234:5600::feed")
    assert (str(p.ipv4), str(p.remote)) == ("198.18.5.5", "2001:db8:cc::1") and not wire.lookups


def test_after_a_reloads_teardown_of_ds_lite_the_nat_method_forgets_its_unnated_flows(tmp_path):
    """A reload that changes [isp] removes our state first: the DS-Lite mapping is gone when IPIP
    comes up, and the record remembers that DS-Lite's flows may still be tracked."""
    k = kernel_with_line()
    r = Reconciler(parse(DSLITE), k, RecordFile(tmp_path))
    assert r.sync().ok
    assert r.sync(teardown=True).ok and r.record.unnated
    r.config = parse(IPIP)
    (c,) = [a for a in r.sync().plan.actions if a.kind == "conntrack"]
    assert c.unnated_via == "ip6tnl1" and c.ipv4 == "198.18.0.77"
    assert not r.record.unnated and not [a for a in r.sync().plan.actions if a.kind == "conntrack"]
    assert RecordFile(tmp_path).record.unnated is False  # saved


def test_an_answers_aftr_that_is_no_address_or_name_is_a_bad_answer():
    for bad in ("2001:db8::zz", "aftr..example", "-aftr.example"):
        with pytest.raises(hb46pp.ProvisioningError, match=r"dslite\.aftr"):
            hb46pp.parse_offer(json.dumps({**ANSWER, "dslite": {"aftr": bad}}).encode())
    with pytest.raises(ConfigError, match=r"dslite\.aftr: '2001:db8::zz' is not an IPv6 address"):
        parse(DSLITE.replace("2001:db8:aa::1", "2001:db8::zz"))


def test_an_ipip_tunnel_given_with_prefix_lengths_is_read_as_its_addresses():
    tunnel = {**TUNNEL, "ipv6_local": "2001:db8:1:2345::feed/64", "ipv6_remote": "2001:db8:cc::1/128"}
    o = hb46pp.parse_offer(json.dumps({**ANSWER, "ipip": [tunnel]}).encode())
    assert (str(o.ipip[0].local), str(o.ipip[0].remote)) == ("2001:db8:1:2345::feed", "2001:db8:cc::1")


def test_ipip_status_and_metrics_follow_the_update_endpoint(tmp_path):
    """After a sync the new address is told (a fake endpoint that first refuses); status and
    /metrics (a real scrape, checked by promtool) say how the last call ended, never the secret."""
    import subprocess

    from mape_daemon.ipip_update import Updater
    from tests.test_metrics import free_port, scrape

    answers = ["answered HTTP 401", None]
    sent = []

    def send(req, source):
        sent.append((req.url, source))
        return answers.pop(0)

    text = IPIP + ('update_url = "https://u.example/up?a={ipv6}&p={password}"\nupdate_user = "u"\n'
                   f'update_password = "pw-9"\n[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')  # fmt: skip
    k = kernel_with_line()
    (tmp_path / "mape.toml").write_text(text)
    svc = Service(str(tmp_path / "mape.toml"), parse(text), RecordFile(tmp_path / "run"), lambda cfg: k,
                  tmp_path / "run", updater=Updater(tmp_path / "lib", send))  # fmt: skip
    assert asyncio.run(svc.sync_once("start"))
    svc._serve_metrics()
    try:

        async def turns():
            task = asyncio.create_task(svc.updater.run(lambda: svc.config.ipip))
            for _ in range(300):
                if svc.updater.report.state == "ok":
                    break
                svc.updater.wake.set()  # the back-off's wait, cut short
                await asyncio.sleep(0.01)
            task.cancel()

        assert scrape(svc)[1][("mape_ipip_update_state", (("state", "waiting"),))] == 1
        asyncio.run(turns())
        assert sent == [("https://u.example/up?a=2400%3A4050%3A1234%3A5600%3A%3Afeed&p=pw-9",
                         "2400:4050:1234:5600::feed")] * 2  # fmt: skip
        state = svc._status(svc.last)
        assert state.update["state"] == "ok" and "pw-9" not in json.dumps(state.update)
        out, m = scrape(svc)
        assert m[("mape_ipip_update_state", (("state", "ok"),))] == 1
        r = subprocess.run(["promtool", "check", "metrics"], input=out, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        svc.metrics.stop()


def test_on_ds_lite_a_reload_with_a_forward_is_taken_and_the_forward_said_disabled(tmp_path):
    forward = '[[forward]]\nprotocol = "tcp"\nport = 8080\nto = "192.168.1.20"\n'
    k = kernel_with_line()
    (tmp_path / "mape.toml").write_text(DSLITE)
    svc = Service(str(tmp_path / "mape.toml"), parse(DSLITE), RecordFile(tmp_path / "run"), lambda cfg: k,
                  tmp_path / "run", provisioner=Provisioner(tmp_path / "lib"))  # fmt: skip
    assert asyncio.run(svc.sync_once("start"))
    (tmp_path / "mape.toml").write_text(DSLITE + forward)
    svc.reload()
    assert svc.pending is not None  # taken, not refused as outside a port set
    assert asyncio.run(svc.sync_once("reload"))
    (said,) = svc._status(svc.last).forwards["unavailable"]
    assert "no ports of ours (DS-Lite: the AFTR owns them)" in said and "dnat to" not in (k.nft or "")
