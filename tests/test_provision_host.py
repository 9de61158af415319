"""One HB46PP access on the wire (spec section 3.6), on this machine's kernel: real dnsmasq
resolvers in an ISP namespace answering (or not) the 4over6.info TXT record, and a real HTTPS
server with a lab CA, reached over IPv6 only. Each of the spec's failure cases ends in the outcome
that decides the next wait.

    router (2001:db8:1::2) --r0/i0-- isp (resolvers ::11-::16, provisioning server ::80)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from ipaddress import IPv6Network
from pathlib import Path

import pytest

from mape_daemon import provisioning
from mape_daemon.hb46pp import Outcome
from mape_daemon.kernel import provision
from tests.hostns import inside
from tests.lab import hb46pp_server, pki
from tests.lab.netns import popen, sh, spawn
from tests.test_hb46pp import SPEC_EXAMPLE

HOST = "prov.lab.example"
SERVER = "2001:db8:1::80"
# One resolver per behaviour of the line's DNS (dnsmasq, authoritative for its names).
OK, NXDOMAIN, NODATA, REFUSED, SILENT, WRONG_CA, SERVFAIL = (f"2001:db8:1::{n}" for n in (11, 12, 13, 14, 16, 17, 18))


def servfail(address: str) -> None:
    """A resolver whose every answer is SERVFAIL (a line's DNS with its upstream broken)."""
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((address, 53))
        while True:
            query, peer = s.recvfrom(512)
            flags = 0x8000 | 0x0100 | 0x0080 | 2  # a response, RD and RA echoed, rcode 2
            s.sendto(query[:2] + flags.to_bytes(2, "big") + query[4:6] + b"\0\0\0\0\0\0" + query[12:], peer)


def _dnsmasq(ns: str, listen: str, *args: str):
    return popen(ns, *hb46pp_server.dnsmasq(listen, *args))


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    tag = uuid.uuid4().hex[:6]
    router, isp = f"pr{tag}", f"pi{tag}"
    d = tmp_path_factory.mktemp("hb46pp")
    procs, pids = [], []
    try:
        for ns in (router, isp):
            sh(None, "ip", "netns", "add", ns)
            sh(ns, "ip", "link", "set", "lo", "up")
        sh(None, "ip", "link", "add", "r0", "netns", router, "type", "veth", "peer", "i0", "netns", isp)
        sh(router, "ip", "addr", "add", "2001:db8:1::2/64", "dev", "r0", "nodad")
        for n in (1, 11, 12, 13, 14, 15, 16, 17, 18, 80):
            sh(isp, "ip", "addr", "add", f"2001:db8:1::{n}/64", "dev", "i0", "nodad")
        for ns, dev in ((router, "r0"), (isp, "i0")):
            sh(ns, "ip", "link", "set", dev, "up")
        # The silent resolver: its queries vanish (a timeout, not a refusal).
        sh(isp, "nft", "add table ip6 t; add chain ip6 t in { type filter hook input priority 0; }; "
                       f"add rule ip6 t in ip6 daddr {SILENT} udp dport 53 drop")  # fmt: skip
        ca = pki.ca(d)
        cert, key = pki.server_cert(ca, HOST)
        other_ca = pki.ca(d, "other-ca")
        record = f"--txt-record=4over6.info,v=v6mig-1 url=https://{HOST}/config t=b"
        names = [f"--host-record={HOST},{SERVER}", "--local=/lab.example/", "--local=/4over6.info/"]
        procs += [
            _dnsmasq(isp, OK, record, *names),
            _dnsmasq(isp, NXDOMAIN, *names),
            _dnsmasq(isp, NODATA, *names, "--host-record=4over6.info,2001:db8::9"),
            _dnsmasq(isp, REFUSED, "--server=/4over6.info/2001:db8:1::15"),  # forwards to one that refuses
            _dnsmasq(isp, "2001:db8:1::15"),
            _dnsmasq(isp, SILENT, record, *names),
        ]
        pids.append(spawn(isp, servfail, SERVFAIL))
        answers, log = d / "answers.json", d / "requests.jsonl"
        answers.write_text("{}")
        pids.append(spawn(isp, hb46pp_server.serve, SERVER, 443, str(answers), str(log), str(cert), str(key)))
        sh(isp, "sh", "-c", f"for i in $(seq 100); do ss -Htln | grep -q '{SERVER}]:443' && exit; sleep 0.1; done")
        yield router, answers, log, ca, other_ca
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for ns in (router, isp):
            sh(None, "ip", "netns", "del", ns, check=False)


def serve(answers: Path, table: dict) -> None:
    answers.write_text(json.dumps({path: {"status": 200, **a} for path, a in table.items()}))


def requests(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def access(router: str, resolvers: list[str], ca: Path, token: str | None = None) -> provisioning.Access:
    with inside(router):
        return provisioning.access(resolvers, ("map_e", "dslite"), token, str(ca))


def test_a_line_that_provisions_answers_over_https_with_its_ca(line):
    router, answers, log, ca, _ = line
    serve(answers, {"/config": {"body": json.dumps(SPEC_EXAMPLE)}})
    before = len(requests(log))
    a = access(router, [OK], ca, token="ab" * 32)
    assert a.outcome is Outcome.OK and a.offer is not None and a.offer.order == ("464xlat", "map_e", "dslite"), a
    assert a.offer.token == SPEC_EXAMPLE["token"] and a.pointer is not None and a.pointer.verify
    (req,) = requests(log)[before:]
    assert req["host"] == HOST and "capability=map_e%2Cdslite" in req["path"] and f"token={'ab' * 32}" in req["path"]
    assert "ab" * 32 not in a.detail  # a credential is never in what we log


def test_the_first_resolver_failing_the_next_one_answers(line):
    router, answers, _, ca, _ = line
    serve(answers, {"/config": {"body": json.dumps(SPEC_EXAMPLE)}})
    assert access(router, [REFUSED, OK], ca).outcome is Outcome.OK


@pytest.mark.parametrize(
    ("resolver", "outcome", "said"),
    [
        (NXDOMAIN, Outcome.NO_RECORD, "NXDOMAIN"),
        (NODATA, Outcome.NO_RECORD, "NODATA"),
        (REFUSED, Outcome.DNS_FAILED, "REFUSED"),
        (SERVFAIL, Outcome.DNS_FAILED, "SERVFAIL"),
        (SILENT, Outcome.DNS_FAILED, "timed out"),
    ],
)
def test_the_txt_lookups_failures_are_told_apart(line, resolver, outcome, said):
    router, _, _, ca, _ = line
    a = access(router, [resolver], ca)
    assert a.outcome is outcome and said in a.detail, a


@pytest.mark.parametrize(
    ("table", "outcome", "said"),
    [
        ({}, Outcome.BAD_REPLY, "HTTP 404"),
        ({"/config": {"status": 403, "body": ""}}, Outcome.BAD_REPLY, "HTTP 403"),
        ({"/config": {"body": "{not json"}}, Outcome.BAD_REPLY, "not JSON"),
        ({"/config": {"body": '{"order": []}'}}, Outcome.OK, "offers nothing"),
        (
            {"/config": {"status": 307, "location": "/v2/config"}, "/v2/config": {"body": json.dumps(SPEC_EXAMPLE)}},
            Outcome.OK,
            "v2/config offers 464xlat, map_e, dslite",
        ),
        ({"/config": {"status": 307, "location": f"http://{HOST}/config"}}, Outcome.BAD_REPLY, "to plain http"),
        ({"/config": {"status": 307, "location": "/config"}}, Outcome.BAD_REPLY, "more than 3 redirects"),
    ],
)
def test_the_servers_answers_end_as_the_spec_says(line, table, outcome, said):
    router, answers, _, ca, _ = line
    serve(answers, table)
    a = access(router, [OK], ca)
    assert a.outcome is outcome and said in a.detail, a
    assert (a.offer is not None) == (outcome is Outcome.OK)


def test_a_certificate_of_another_ca_is_no_answer(line):
    router, answers, _, _, other_ca = line
    serve(answers, {"/config": {"body": json.dumps(SPEC_EXAMPLE)}})
    a = access(router, [OK], other_ca)
    assert a.outcome is Outcome.NO_REPLY and "CERTIFICATE_VERIFY_FAILED" in a.detail, a


def test_doctor_asks_as_the_daemon_would_and_maps_with_the_answer(line, tmp_path, monkeypatch):
    from mape_daemon import doctor, provisioning
    from mape_daemon.config import parse

    router, answers, _, ca, _ = line
    monkeypatch.setattr(provisioning, "LIB_DIR", tmp_path)  # no cache of a daemon here
    serve(answers, {"/config": {"body": json.dumps(SPEC_EXAMPLE)}})
    base = f'[wan]\ninterface = "wan0"\n[isp]\nca_file = "{ca}"\nresolvers = '
    with inside(router):
        cfg, said = doctor.provision(parse(base + f'["{OK}"]\n'))
        assert said is not None and said[0] == "ok" and cfg.isp.provisioned is not None
        assert cfg.isp.match(IPv6Network("2001:db8:1:2345::/64")).isp == "hb46pp"
        cfg, said = doctor.provision(parse(base + f'["{NXDOMAIN}"]\n'))
        assert said is not None and said[0] == "no record" and cfg.isp.provisioned is None


@contextlib.contextmanager
def access_link(tmp_path, radvd_extra: str = "", *isp_daemons: list[str]):
    """A router's wan0 and the ISP's i0 on one wire, radvd announcing 2001:db8:1::/64 (RAs a minute
    apart, `radvd_extra` in its interface block) and `isp_daemons` run in the ISP; yields the
    router's namespace once radvd listens."""
    tag = uuid.uuid4().hex[:6]
    router, isp = f"rr{tag}", f"ri{tag}"
    procs = []
    try:
        for ns in (router, isp):
            sh(None, "ip", "netns", "add", ns)
            sh(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.forwarding=1")
        sh(None, "ip", "link", "add", "wan0", "netns", router, "type", "veth", "peer", "i0", "netns", isp)
        for ns, dev in ((router, "wan0"), (isp, "i0")):
            sh(ns, "ip", "link", "set", dev, "up")
        conf = tmp_path / "radvd.conf"
        conf.write_text(f"interface i0 {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 60;\n  MaxRtrAdvInterval 90;\n"
                        f"  prefix 2001:db8:1::/64 {{ }};\n{radvd_extra}}};\n")  # fmt: skip
        procs.append(popen(isp, "radvd", "-n", "-C", str(conf), "-p", str(tmp_path / "radvd.pid"), "-m", "stderr"))
        procs += [popen(isp, *argv) for argv in isp_daemons]
        # Listening, and past its set-up (it writes the pid file last): an RS before it goes unanswered.
        pid = tmp_path / "radvd.pid"
        ready = f"ss -Hlwp | grep -q radvd && [ -s {pid} ]"
        sh(isp, "sh", "-c", f"for i in $(seq 100); do {ready} && exit; sleep 0.05; done")
        yield router, isp
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (router, isp):
            sh(None, "ip", "netns", "del", ns, check=False)


@pytest.mark.parametrize("announced", [[OK], []])
def test_the_routers_rdnss_is_learned_by_a_solicitation(tmp_path, announced):
    """A Router Solicitation on the WAN, answered by a real radvd whose RAs (otherwise a minute
    apart) carry RDNSS, or none: the first RA decides at once."""
    with access_link(tmp_path, "".join(f"  RDNSS {a} {{ }};\n" for a in announced)) as (router, _), inside(router):
        started = time.monotonic()
        assert provision.router_dns("wan0", timeout=10) == (announced, False)
        assert time.monotonic() - started < 5  # answered, not timed out


def test_credentials_reach_the_named_server_and_are_never_in_what_is_said(line):
    from mape_daemon.hb46pp import Credentials

    router, answers, log, ca, _ = line
    serve(
        answers,
        {"/config": {"status": 307, "location": "/v2/config"}, "/v2/config": {"body": json.dumps(SPEC_EXAMPLE)}},
    )
    for server, sent in ((None, True), (HOST, True), ("elsewhere.example", False)):
        before = len(requests(log))
        with inside(router):
            a = provisioning.access([OK], ("map_e",), None, str(ca), Credentials("me", "s3cret", server))
        assert a.outcome is Outcome.OK and "s3cret" not in repr(a), a
        hops = requests(log)[before:]
        assert len(hops) == 2 and all(("pass=s3cret" in h["path"]) == sent for h in hops), (server, hops)


# --- IPIP: the provider's update endpoint (issue 23), on the same line's HTTPS server ----------
def test_the_ipip_update_endpoint_is_told_each_new_address_once_from_it_with_credentials_never_said(
    line, tmp_path, caplog
):
    from mape_daemon.config import IpipConfig
    from mape_daemon.ipip_update import BACKOFF, Target, Updater, call

    router, answers, log, ca, _ = line
    ip_cert, ip_key = pki.server_cert(ca, SERVER)  # the endpoint by address: its certificate names it
    pid = spawn(router.replace("pr", "pi", 1), hb46pp_server.serve, SERVER, 8443, str(answers), str(log),
                str(ip_cert), str(ip_key))  # fmt: skip
    try:
        sh(router.replace("pr", "pi", 1), "sh", "-c",
           f"for i in $(seq 100); do ss -Htln | grep -q '{SERVER}]:8443' && exit; sleep 0.1; done")  # fmt: skip
        cfg = IpipConfig(update_url=f"https://[{SERVER}]:8443/update?addr={{ipv6}}&v4={{ipv4}}&u={{user}}",
                         update_user="me", update_password="s3cret", update_ca_file=ca)  # fmt: skip
        clock = {"now": 1000.0}

        def send(req, source):
            with inside(router):
                return call(req, source)

        u = Updater(tmp_path, send, clock=lambda: clock["now"])
        serve(answers, {"/update": {"status": 401, "body": "badauth"}})
        before = len(requests(log))

        async def turn(target):
            u.seen(target)
            task = asyncio.create_task(u.run(lambda: cfg))
            for _ in range(300):
                if u.report.state != "waiting" and not u.wake.is_set():
                    break
                await asyncio.sleep(0.01)
            task.cancel()

        with caplog.at_level(logging.INFO, "mape-daemon"):
            first = Target("2001:db8:1::2", "198.18.0.77")
            asyncio.run(turn(first))
            assert u.report.state == "failed" and "answered HTTP 401" in u.report.detail
            assert u.report.next_at == clock["now"] + BACKOFF[0]  # retried with back-off
            serve(answers, {"/update": {"body": "ok"}})
            u.report = type(u.report)()
            asyncio.run(turn(first))
            assert u.report.state == "ok" and u.told == first
            u.report = type(u.report)()
            asyncio.run(turn(first))  # the same address again: nothing sent
        sent = requests(log)[before:]
        assert len(sent) == 2, sent
        assert sent[-1]["path"] == "/update?addr=2001%3Adb8%3A1%3A%3A2&v4=198.18.0.77&u=me", sent[-1]
        assert sent[-1]["auth"] == "Basic " + base64.b64encode(b"me:s3cret").decode()
        assert sent[-1]["from"] == first.ipv6  # from the tunnel address itself
        assert "s3cret" not in caplog.text and "u=me" not in caplog.text and "/update" in caplog.text
        assert Updater(tmp_path).told == first  # a restart does not tell it again
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("other_config", [True, False])
def test_without_rdnss_the_lines_dns_comes_by_dhcpv6_as_on_ntt_ngn(tmp_path, other_config):
    """NGN announces no RDNSS: a stateless DHCPv6 Information-Request, answered by a real dnsmasq,
    gives the resolvers; the RA (radvd, no RDNSS) is asked first and says nothing. Only an RA
    whose O flag says so sends us to DHCPv6 (a line without DHCPv6 costs no wait)."""
    dnsmasq = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--port=0", "--interface=i0",
               "--user=root", "--leasefile-ro", "--dhcp-range=::,static",
               "--dhcp-option=option6:dns-server,[2001:db8:1::53],[2001:db8:2::53]"]  # fmt: skip
    flag = f"  AdvOtherConfigFlag {'on' if other_config else 'off'};\n"
    with access_link(tmp_path, flag, dnsmasq) as (router, isp):
        sh(isp, "sh", "-c", "for i in $(seq 100); do ss -Hlun | grep -q ':547 ' && exit; sleep 0.05; done")
        with inside(router):
            assert provision.router_dns("wan0", timeout=10) == ([], other_config)
            want = ["2001:db8:1::53", "2001:db8:2::53"] if other_config else []
            assert provisioning.learn_resolvers("wan0") == want
