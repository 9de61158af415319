"""/metrics: what a scrape reads (served on a real loopback socket), the port-exhaustion episodes
and their journal lines, over the fake kernel. A real Prometheus scrapes the daemon in the lab."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mape_daemon.config import ConfigError, parse
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from mape_daemon.state import Flow
from tests.fake_kernel import FakeKernel

SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"
LAN_A, LAN_B = "192.168.1.10", "192.168.1.20"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service(tmp_path, extra: str = "") -> tuple[Service, FakeKernel]:
    k = FakeKernel(("wan0", "lan0"))
    k.slaac(SLAAC)
    text = f'[wan]\ninterface = "wan0"\n[metrics]\nlisten = "127.0.0.1:{free_port()}"\n{extra}'
    (tmp_path / "mape.toml").write_text(text)
    return Service(str(tmp_path / "mape.toml"), parse(text), RecordFile(tmp_path / "run"), lambda cfg: k,
                   tmp_path / "run"), k  # fmt: skip


def scrape(svc: Service) -> tuple[str, dict]:
    host, port = svc.config.metrics.address()
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def test_a_scrape_reads_the_mapping_ports_syncs_and_repairs(tmp_path):
    svc, k = service(tmp_path)
    try:
        svc._serve_metrics()
        assert asyncio.run(svc.sync_once("start"))
        p = svc.last.params
        lo = p.port_ranges[0][0]
        k.flows = [Flow("tcp", lo + i, LAN_A) for i in range(16)] + [Flow("udp", p.port_ranges[1][0], LAN_B)]
        asyncio.run(svc.check_ports())
        k.apply_del_tunnel("ip6tnl1")  # someone deletes the tunnel: the next sync puts it back
        assert asyncio.run(svc.sync_once("event", ("netlink",)))
        text, m = scrape(svc)
        assert m[("mape_up", ())] == 1 and m[("mape_mapped", ())] == 1
        info = next(labels for name, labels in m if name == "mape_mapping_info")
        assert dict(info) == {"method": "map-e", "isp": "ocn", "ipv4": "153.240.72.209", "psid": "22",
                              "rule": "2400:4050::/34", "prefix": "2400:4050:1234:5600::/56",
                              "source": "slaac"}  # fmt: skip
        assert m[("mape_ports", (("protocol", "tcp"),))] == 1008
        assert m[("mape_ports_in_use", (("protocol", "tcp"),))] == 16
        assert m[("mape_ports_in_use", (("protocol", "udp"),))] == 1
        assert m[("mape_ports_fullest_block_in_use", (("protocol", "tcp"),))] == 16
        assert m[("mape_ports_exhausted", (("protocol", "tcp"),))] == 1  # a full block
        assert m[("mape_ports_exhausted", (("protocol", "udp"),))] == 0
        assert m[("mape_syncs_total", (("cause", "start"), ("result", "ok")))] == 1
        assert m[("mape_syncs_total", (("cause", "event"), ("result", "ok")))] == 1
        assert m[("mape_repairs_total", (("object", "tunnel"), ("trigger", "netlink")))] == 1
        assert m[("mape_prefix_changes_total", ())] == 0  # the start's mapping is no change
        assert m[("mape_sync_duration_seconds_count", ())] == 2
        assert 0 <= m[("mape_seconds_since_last_successful_sync", ())] < 60
        assert m[("mape_conflicts", ())] == 0
        assert m[("mape_forwards", (("state", "active"),))] == 0
        assert ("mape_miniupnpd", (("state", "offering"),)) not in m  # not enabled: not said
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr  # Prometheus' own linter on what we serve

        k.slaac(SLAAC, deprecated=True)  # the ISP renumbers
        k.slaac("2400:4050:1234:9a00:5054:ff:fe12:3456")
        assert asyncio.run(svc.sync_once("event", ("netlink",)))
        _, m = scrape(svc)
        assert m[("mape_prefix_changes_total", ())] == 1
        assert dict(next(labels for name, labels in m if name == "mape_mapping_info"))["ipv4"] == "153.240.72.210"
    finally:
        svc.metrics.stop()


def test_running_out_is_one_line_per_episode_with_the_busiest_hosts(tmp_path, caplog):
    svc, k = service(tmp_path, "[ports]\nwarn_percent = 50\n")
    assert asyncio.run(svc.sync_once("start"))
    ports = sorted(q for lo, hi in svc.last.params.port_ranges for q in range(lo, hi + 1))
    with caplog.at_level(logging.INFO, "mape-daemon"):
        k.flows = [Flow("tcp", q, LAN_A if i % 3 else LAN_B) for i, q in enumerate(ports[:503])]
        asyncio.run(svc.check_ports())  # 49.9 %, and every block of the first 31 full
        k.flows = [Flow("tcp", q, LAN_A if i % 3 else LAN_B) for i, q in enumerate(ports[:600])]
        asyncio.run(svc.check_ports())  # still running out: no second line
        said = [r for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "ports"]
        assert [r.levelname for r in said] == ["WARNING"]
        assert said[0].getMessage() == ("tcp ports running out: block 1376-1391 full; most by 192.168.1.10 (335), "
                                        "192.168.1.20 (168)")  # fmt: skip
        assert svc.metrics.snapshot.exhausted == {"tcp"}
        assert "RUNNING OUT: tcp" in __import__("mape_daemon.status", fromlist=["to_text"]).to_text(
            {**svc._status(svc.last).__dict__, "tunnel": {"name": "ip6tnl1", "present": True, "up": True}}
        )
        k.flows = [Flow("tcp", q, LAN_A) for q in ports[1:601:16]]  # no block full, 4 %
        asyncio.run(svc.check_ports())
        said = [r for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "ports"]
        assert [r.levelname for r in said] == ["WARNING", "INFO"]
        assert said[1].getMessage() == "tcp ports no longer running out: 38 of 1008 in use"
    assert svc.metrics.snapshot.exhausted == frozenset()


def test_a_port_it_cannot_have_is_said_once_and_the_daemon_goes_on(tmp_path, caplog):
    svc, _ = service(tmp_path)
    holder = socket.socket()
    holder.bind(svc.config.metrics.address())
    holder.listen()
    try:
        with caplog.at_level(logging.ERROR, "mape-daemon"):
            svc._serve_metrics()
            svc._serve_metrics()
            assert asyncio.run(svc.sync_once("start"))
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "metrics: cannot listen on 127.0.0.1:" in errors[0], errors
    finally:
        holder.close()
        svc.metrics.stop()


@pytest.mark.parametrize("listen", ["localhost:9849", "127.0.0.1", "127.0.0.1:0", "[::1]:70000", "::1:9849x"])
def test_a_bad_listen_address_names_the_key(listen):
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse(f'[wan]\ninterface = "wan0"\n[metrics]\nlisten = "{listen}"\n')


def test_the_shipped_alerts_pass_promtool_and_fire_on_their_series():
    here = Path(__file__).parent
    rules = here.parent / "packaging" / "prometheus" / "mape-daemon.rules.yml"
    for cmd in (["promtool", "check", "rules", str(rules)], ["promtool", "test", "rules", "rules_test.yml"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=here / "prometheus")
        assert r.returncode == 0, r.stdout + r.stderr
    json.loads((rules.parent / "mape-daemon-dashboard.json").read_text())  # the dashboard is JSON
