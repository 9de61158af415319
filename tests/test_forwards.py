"""Port forwards against the port set (pure), and what the service says of them (fake kernel)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from ipaddress import IPv6Address

import pytest

from mape_daemon import cli, desired, forwards, maprules
from mape_daemon.config import ConfigError, parse
from mape_daemon.mapcalc import compute
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from mape_daemon.statefile import DaemonState
from tests.fake_kernel import FakeKernel

BASE = '[wan]\ninterface = "wan0"\n'
SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"  # OCN 153.240.72.209 psid 22: 1376-1391, 2400-2415, ...
OCN = compute(maprules.bundled().match(IPv6Address(SLAAC)), IPv6Address(SLAAC))


def fwd(protocol: str, port, to: str = "192.168.1.20", **extra) -> str:
    text = f'[[forward]]\nprotocol = "{protocol}"\nport = {json.dumps(port)}\nto = "{to}"\n'
    return text + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())


@pytest.mark.parametrize(("text", "says"), [
    (fwd("tcp", 25952) + fwd("tcp", "25950-25960", "192.168.1.21"),
     "forward.1.port: tcp port 25952 is also forwarded by forward.0 (tcp 25952 -> 192.168.1.20)"),
    (fwd("tcp", "25952-25967", to_port=80), "forward.0.to_port: a range (25952-25967) is forwarded to the same ports"),
    (fwd("tcp", 25952, "224.0.0.1"), "forward.0.to: 224.0.0.1 is not a LAN host"),
    (fwd("tcp", 0), "forward.0.port: bad port or range 0"),
    (fwd("icmp", 25952), "forward.0.protocol"),
])  # fmt: skip
def test_bad_forwards_name_the_key(text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse(BASE + text)


def test_the_same_port_under_two_protocols_is_two_forwards():
    cfg = parse(BASE + fwd("tcp", 25952) + fwd("udp", 25952, "192.168.1.21"))
    assert [f.describe() for f in cfg.forward] == ["tcp 25952 -> 192.168.1.20", "udp 25952 -> 192.168.1.21"]


def test_only_forwards_inside_the_set_are_usable_and_the_others_say_the_nearest_ports():
    cfg = parse(BASE + fwd("tcp", 25952, name="mc", to_port=25565) + fwd("udp", 25565) + fwd("tcp", "1380-1400"))
    active, unavailable = forwards.split(cfg, OCN.port_ranges)
    assert [f.describe() for f in active] == ["mc tcp 25952 -> 192.168.1.20:25565"]
    assert unavailable == [
        "forward udp 25565 -> 192.168.1.20: udp 25565 is outside this line's port set; nearest usable: "
        "24928-24943 (below) and 25952-25967 (above)",
        "forward tcp 1380-1400 -> 192.168.1.20: tcp 1392 is outside this line's port set; nearest usable: "
        "1376-1391 (below) and 2400-2415 (above)",
    ]
    assert forwards.check(cfg, OCN.port_ranges, "x").startswith("forward.1.port: udp 25565 is outside")


@pytest.mark.parametrize("native", [True, False])
def test_dnat_for_usable_forwards_and_their_ports_never_in_the_snat_pool(native):
    cfg = parse(BASE + fwd("tcp", 25952, to_port=25565) + fwd("udp", "2400-2415", "192.168.1.21") + fwd("tcp", 80))
    state = desired.build(cfg, OCN, native=native)
    assert 'iifname "ip6tnl1" ip daddr 153.240.72.209 tcp dport 25952 counter dnat to 192.168.1.20:25565' in state.nft
    assert 'iifname "ip6tnl1" ip daddr 153.240.72.209 udp dport 2400-2415 counter dnat to 192.168.1.21' in state.nft
    assert "dport 80 " not in state.nft  # outside the set: no DNAT that could never work
    pool = desired.pool_ranges(OCN, desired.reserved(cfg))
    assert (25953, 25967) in pool and not any(lo <= 25952 <= hi or lo <= 2400 <= hi for lo, hi in pool)
    snat = "\n".join([line for line in state.nft.splitlines() if " snat ip to " in line] if native
                      else [r for c in state.chains for r in c.rules])  # fmt: skip
    assert "25952-25967" not in snat and "2400-2415" not in snat and "25953-25967" in snat


def test_inbound_closed_by_default_and_open_when_asked():
    closed = desired.build(parse(BASE), OCN, native=True).nft
    assert "chain in-closed {\n\t\ttype filter hook input priority filter;" in closed
    rules = (
        '\t\tiifname "ip6tnl1" ct state established,related accept\n\t\tiifname "ip6tnl1" ct status dnat accept\n'
        '\t\tiifname "ip6tnl1" counter drop\n'
    )  # forwards pass, to the LAN or to the router itself
    assert closed.count(rules) == 2 and "chain fwd-in {\n\t\ttype filter hook forward priority filter;" in closed
    assert closed.startswith("table ip mape {")  # IPv4 only: native IPv6 is never touched
    opened = desired.build(parse(BASE + "[inbound]\nclosed = false\n"), OCN, native=True).nft
    assert "in-closed" not in opened and "fwd-in" not in opened
    no_guard = parse(BASE + '[firewall]\nguard = false\nbackend = "iptables-nft"\n')
    assert "chain in-closed" in desired.build(no_guard, OCN).nft  # the inbound policy needs no guard


@pytest.fixture
def svc(tmp_path):
    k = FakeKernel(("wan0", "lan0"))
    k.slaac(SLAAC)
    path = tmp_path / "mape.toml"
    path.write_text(BASE + fwd("tcp", 25952, name="mc"))
    s = Service(str(path), parse(path.read_text()), RecordFile(tmp_path / "run"), lambda cfg: k, tmp_path / "run")
    s.kernel = k
    return s


def test_a_reload_with_a_forward_outside_the_set_is_refused_naming_the_nearest(svc, tmp_path, caplog):
    assert asyncio.run(svc.sync_once("start"))
    (tmp_path / "mape.toml").write_text(BASE + fwd("tcp", 25565))
    with caplog.at_level(logging.ERROR, "mape-daemon"):
        svc.reload()
    assert "forward.0.port: tcp 25565 is outside this line's port set; nearest usable: 24928-24943 (below) and " \
           "25952-25967 (above) (the set of 153.240.72.209 psid 22); nothing changes" in caplog.text  # fmt: skip
    assert svc.pending is None and [f.port for f in svc.config.forward] == [25952]


def test_a_renumbering_that_loses_a_forward_says_so_once_and_status_lists_it(svc, tmp_path, caplog):
    assert asyncio.run(svc.sync_once("start"))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["forwards"] == {"active": ["mc tcp 25952 -> 192.168.1.20"], "unavailable": []}
    svc.kernel.deprecate_all()
    svc.kernel.slaac("2400:4050:1234:9a00:5054:ff:fe12:3456")  # another PSID: none of the old blocks
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(svc.sync_once("event"))
        assert asyncio.run(svc.sync_once("event"))
    lost = [r for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "forward-unavailable"]
    assert len(lost) == 1 and lost[0].getMessage().startswith("forward mc tcp 25952 -> 192.168.1.20: tcp 25952 is")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["forwards"]["active"] == [] and state["forwards"]["unavailable"][0].startswith("forward mc tcp")


def test_check_config_refuses_a_forward_outside_the_running_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "state_dir", lambda: tmp_path)
    DaemonState(pid=1, last_sync=0.0, ok=True, error=None, changes=0, reason="", tunnel_name="ip6tnl1", wan="wan0",
                ipv4="153.240.72.209", psid=22, port_ranges=list(OCN.port_ranges)).write(tmp_path)  # fmt: skip
    cfg = tmp_path / "mape.toml"
    cfg.write_text(BASE + fwd("udp", 25565))
    assert cli.main(["check-config", str(cfg)]) == cli.EXIT_CONFIG
    assert "nearest usable: 24928-24943 (below) and 25952-25967 (above)" in capsys.readouterr().err
    cfg.write_text(BASE + fwd("udp", 25960))
    assert cli.main(["check-config", str(cfg)]) == 0


def test_a_forward_comes_back_by_itself_when_the_set_holds_it_again(svc, tmp_path, caplog):
    assert asyncio.run(svc.sync_once("start"))
    k = svc.kernel
    k.deprecate_all()
    k.slaac("2400:4050:1234:9a00:5054:ff:fe12:3456")  # another PSID: the forward is out
    assert asyncio.run(svc.sync_once("event"))
    k.deprecate_all()
    k.slaac(SLAAC)  # the old prefix announced again: PSID 22, the forward's port is back in the set
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(svc.sync_once("event"))
    back = [r.getMessage() for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "forward"]
    assert back == ["forward mc tcp 25952 -> 192.168.1.20: usable again"]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["forwards"] == {"active": ["mc tcp 25952 -> 192.168.1.20"], "unavailable": []}
    assert "dport 25952 counter dnat to 192.168.1.20:25952" in k.nft
