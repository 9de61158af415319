"""Debian's Prometheus scrapes the daemon inside the lab router; what its HTTP API answers (PromQL)
is what we check: the MAP IPv4 in the info metric, ports in use rising while LAN connections are
open and the running-out episode said once, a repair counted after the tunnel is deleted."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request

from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call, popen, running, sh
from tests.lab.topo import SERVER, wait_for

METRICS, PROMETHEUS = "127.0.0.1:9849", "127.0.0.1:9090"
CONFIG = (f'[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[firewall]\nbackend = "nftables"\n'
          f'[metrics]\nlisten = "{METRICS}"\n[ports]\ncheck_every = 5\nwarn_percent = 5\n')  # fmt: skip


def query(expr: str) -> list[dict]:
    url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]["result"]
    except OSError:
        return []


def value(lab, expr: str) -> float | None:
    result = call(lab.ce, query, expr)
    return float(result[0]["value"][1]) if result else None


def start_prometheus(lab, tmp_path) -> None:
    conf = tmp_path / "prometheus.yml"
    conf.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mape\n"
                    f"    static_configs:\n      - targets: ['{METRICS}']\n")  # fmt: skip
    log = open(tmp_path / "prometheus.log", "ab")  # noqa: SIM115 - the process keeps it
    lab.procs["prometheus"] = popen(lab.ce, "prometheus", f"--config.file={conf}",
                                    f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={PROMETHEUS}",
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def test_prometheus_scrapes_the_mapping_ports_in_use_the_episode_and_a_repair(lab, tmp_path):
    ce = lab.ce_params()
    chain = lab.br_add_ce(ce)
    d = Daemon(lab, tmp_path, CONFIG).start()
    try:
        wait_for(d.synced_by_me, 120, "the first sync")
        start_prometheus(lab, tmp_path)
        info = lambda: call(lab.ce, query, "mape_mapping_info")  # noqa: E731
        wait_for(info, 120, "Prometheus' first scrape")
        assert info()[0]["metric"]["ipv4"] == ce.ipv4 and info()[0]["metric"]["psid"] == str(ce.psid)
        assert value(lab, "mape_up") == 1 and value(lab, 'mape_ports{protocol="tcp"}') == 1008
        assert (value(lab, 'mape_ports_in_use{protocol="tcp"}') or 0) < 50

        # 60 connections held from a LAN host: more than 5 % of 1008.
        with running(lab.lan, traffic.hold_many, SERVER, 60, stop=tmp_path / "stop"):
            wait_for(lambda: (value(lab, 'mape_ports_in_use{protocol="tcp"}') or 0) >= 60, 90, "ports in use seen")
            wait_for(lambda: value(lab, 'mape_ports_exhausted{protocol="tcp"}') == 1, 60, "the episode")
            assert d.text().count("tcp ports running out: ") == 1
            assert "most by 192.168.1.10 (6" in d.text()  # the LAN host holding them
            # Closed, they hold their ports in TIME_WAIT for 2 minutes: the lab lets them go in 5 s.
            sh(lab.ce, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=5")
        wait_for(lambda: "tcp ports no longer running out" in d.text(), 90, "the episode's end")

        sh(lab.ce, "ip", "link", "del", "ip6tnl1")
        wait_for(lambda: (value(lab, 'sum(mape_repairs_total{object="tunnel"})') or 0) >= 1, 60, "the repair counted")
        assert value(lab, 'mape_syncs_total{cause="start",result="ok"}') == 1
        assert lab.br_dropped(chain) == 0
    finally:
        assert d.stop() == 0, d.text()
