"""miniupnpd's config in step with the mapping: the rules (pure), the file and the restart (real
files and a real command), what the service says (fake kernel). tests/kernel/systemd/test_upnp.py runs
the real miniupnpd and upnpc through the lab's strict BR."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from ipaddress import IPv4Address, IPv6Address

import pytest

from mape_daemon import maprules, upnp
from mape_daemon.config import ConfigError, parse
from mape_daemon.mapcalc import compute
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from tests.fake_kernel import FakeKernel

SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"  # OCN 153.240.72.209 psid 22
OCN = compute(maprules.bundled().match(IPv6Address(SLAAC)), IPv6Address(SLAAC))
MOVED = compute(maprules.bundled().match(IPv6Address("2400:4050:1234:9a00::1")), IPv6Address("2400:4050:1234:9a00::1"))
FORWARD = '[[forward]]\nprotocol = "tcp"\nport = 25952\nto = "192.168.1.20"\n'
USER_CONF = """# the user's own miniupnpd.conf
ext_ifname=eth0
ext_ip=203.0.113.9
listening_ip=lan0
uuid=3e2a1a3c-0000-4000-8000-000000000001
allow 1024-65535 192.168.1.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def config(tmp_path, extra: str = "", restart: str | None = None, start: str | None = None, check: str = "true") -> str:
    (tmp_path / "base.conf").write_text(USER_CONF)
    restart = restart or f"sh -c 'echo restarted >> {tmp_path / 'restarts'}'"
    start = start or restart.replace("restarted", "started")
    return (f'[wan]\ninterface = "wan0"\n[upnp]\nenabled = true\nbase = "{tmp_path / "base.conf"}"\n'
            f'file = "{tmp_path / "run" / "miniupnpd.conf"}"\nrestart = "{restart}"\nstart = "{start}"\n'
            f'check = "{check}"\n{extra}')  # fmt: skip


def ran(log) -> int:
    """How many starts and restarts the commands logged."""
    return len(log.read_text().splitlines())


def verdict(conf: str, port: int, host: str = "192.168.1.10", iport: int = 8080) -> str:
    """What miniupnpd decides for a request (the first permission rule that matches; none: allow)."""
    for line in conf.splitlines():
        words = line.split()
        if len(words) != 4 or words[0] not in ("allow", "deny"):
            continue
        ext, net, internal = words[1:]
        lo, _, hi = ext.partition("-")
        ilo, _, ihi = internal.partition("-")
        addr, _, bits = net.partition("/")
        mask = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
        if (int(lo) <= port <= int(hi or lo) and int(ilo) <= iport <= int(ihi or ilo)
                and int(IPv4Address(host)) & mask == int(IPv4Address(addr)) & mask):  # fmt: skip
            return words[0]
    return "allow"


def test_only_ports_of_the_set_minus_forwarded_and_reserved_are_left_to_the_users_rules(tmp_path):
    cfg = parse(config(tmp_path, '[snat]\nreserved_ports = ["2400-2403"]\n' + FORWARD))
    conf = upnp.render(USER_CONF, tmp_path / "base.conf", OCN, cfg)
    in_set = {p for lo, hi in OCN.port_ranges for p in range(lo, hi + 1)} - {25952, 2400, 2401, 2402, 2403}
    for port in range(65536):  # the whole port space, against the rules as miniupnpd reads them
        assert verdict(conf, port) == ("allow" if port in in_set else "deny"), port
    assert verdict(conf, 25953, host="10.0.0.5") == "deny"  # the user's own rules still narrow it


def test_the_users_settings_stay_and_the_keys_we_set_are_commented_out(tmp_path):
    cfg = parse(config(tmp_path))
    conf = upnp.render(USER_CONF, tmp_path / "base.conf", OCN, cfg)
    lines = conf.splitlines()
    assert "ext_ip=153.240.72.209" in lines and "ext_ifname=ip6tnl1" in lines
    assert "ext_ifname6=eth0" in lines  # IPv6 pinholes stay on the user's own WAN
    assert "# (set by mape-daemon above) ext_ip=203.0.113.9" in lines and "ext_ip=203.0.113.9" not in lines
    assert "listening_ip=lan0" in lines and "uuid=3e2a1a3c-0000-4000-8000-000000000001" in lines
    assert "upnp_table_name=miniupnpd" in lines and "upnp_nat_table_name=miniupnpd" in lines
    ours = lines.index("deny 0-1375 0.0.0.0/0 0-65535")
    assert ours < lines.index("allow 1024-65535 192.168.1.0/24 1024-65535")  # first match wins: ours first
    own_table = upnp.render(USER_CONF + "upnp_table_name=fw\n", tmp_path / "b", OCN, cfg)
    assert "upnp_table_name=miniupnpd" not in own_table.splitlines()  # the user's table wins
    bare = upnp.render("listening_ip=lan0\n", tmp_path / "b", OCN, cfg)
    assert "ext_ifname6=wan0" in bare.splitlines()


def test_the_file_is_written_and_miniupnpd_restarted_only_when_something_changed(tmp_path, monkeypatch):
    cfg = parse(config(tmp_path))
    m, restarts = upnp.Miniupnpd(), tmp_path / "restarts"
    said = m.update(cfg, OCN)
    assert said.startswith(f"miniupnpd config written to {tmp_path / 'run' / 'miniupnpd.conf'} (153.240.72.209)")
    conf = tmp_path / "run" / "miniupnpd.conf"
    assert "ext_ip=153.240.72.209" in conf.read_text() and conf.stat().st_mode & 0o777 == 0o644
    assert m.update(cfg, OCN) is None
    assert restarts.read_text() == "started\n"  # the file is new: miniupnpd was skipped for want of it
    successor = upnp.Miniupnpd()  # the daemon restarted (a crash, the watchdog): the same file and tunnel
    assert successor.update(cfg, OCN) is None and successor.offering == "153.240.72.209"
    assert ran(restarts) == 1  # nobody loses their mappings
    (tmp_path / "run" / "miniupnpd.conf.applied").unlink()  # as if it died between the write and the restart
    assert upnp.Miniupnpd().update(cfg, OCN) is not None and ran(restarts) == 2

    said = m.update(cfg, MOVED)
    assert said == f"miniupnpd restarted, its config changed ({MOVED.ipv4}): {cfg.upnp.restart}"
    assert f"ext_ip={MOVED.ipv4}" in conf.read_text() and ran(restarts) == 3
    with_forward = parse(config(tmp_path, FORWARD.replace("25952", str(MOVED.port_ranges[3][0]))))
    assert m.update(with_forward, MOVED) is not None  # a port left the pool

    monkeypatch.setattr(upnp.commands, "ifindex", lambda name: 99)  # the tunnel recreated: miniupnpd's rules name index
    said = m.update(with_forward, MOVED)
    assert said.startswith("miniupnpd restarted, the tunnel was recreated")

    said = m.update(with_forward, None)  # MAP-E off: miniupnpd stays up (to be restarted) and grants nothing
    assert said == f"miniupnpd refuses every request now (no MAP-E mapping); ran: {cfg.upnp.restart}"
    assert conf.read_text().startswith(upnp.CLOSED) and m.offering is None
    assert verdict(conf.read_text(), MOVED.port_ranges[0][0]) == "deny"  # a port of the set, refused
    assert m.update(with_forward, None) is None and ran(restarts) == 6
    assert m.update(with_forward, MOVED) is not None  # back: in step again
    assert not conf.read_text().startswith(upnp.CLOSED) and m.offering == str(MOVED.ipv4)

    off = parse(config(tmp_path, FORWARD).replace("enabled = true", "enabled = false"))
    assert m.update(off, None) == f"miniupnpd config {conf} removed (upnp.enabled is false); ran: {off.upnp.restart}"
    assert not conf.exists() and not (tmp_path / "run" / "miniupnpd.conf.applied").exists()
    assert ran(restarts) == 8
    assert m.update(off, None) is None
    assert upnp.Miniupnpd().update(cfg, None) is None  # never written: nothing to close


def test_a_failing_restart_or_a_missing_base_is_an_error_and_is_tried_again(tmp_path):
    cfg = parse(config(tmp_path, restart="sh -c 'echo no such unit >&2; exit 5'"))
    m = upnp.Miniupnpd()
    with pytest.raises(upnp.UpnpError, match=re.escape("upnp.start `sh -c 'echo no such unit >&2; exit 5'` "
                                                       "exited 5: no such unit")):  # fmt: skip
        m.update(cfg, OCN)
    with pytest.raises(upnp.UpnpError):  # nothing remembered: tried again
        m.update(cfg, OCN)
    good = parse(config(tmp_path))
    assert m.update(good, OCN) is not None
    (tmp_path / "base.conf").unlink()
    with pytest.raises(upnp.UpnpError, match=f"cannot read upnp.base {tmp_path / 'base.conf'}: No such file"):
        m.update(good, MOVED)
    assert any("does not exist: install miniupnpd" in w for w in good.warnings())


@pytest.mark.parametrize(("text", "says"), [
    ('[upnp]\nrestart = "systemctl \'try-restart"\n', "upnp.restart: \"systemctl 'try-restart\" is not a command"),
    ('[upnp]\nrestart = "  "\n', "upnp.restart: empty command"),
    ('[upnp]\nfile = "miniupnpd.conf"\n', "upnp.file: 'miniupnpd.conf' is not an absolute path"),
    ('[upnp]\nfile = "/etc/miniupnpd/miniupnpd.conf"\n',
     "upnp.file: '/etc/miniupnpd/miniupnpd.conf' is also upnp.base"),
])  # fmt: skip
def test_bad_upnp_settings_name_the_key(text, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse('[wan]\ninterface = "wan0"\n' + text)


def test_the_service_keeps_miniupnpd_in_step_and_says_a_failure_once(tmp_path, caplog):
    k = FakeKernel(("wan0", "lan0"))
    k.slaac(SLAAC)
    path = tmp_path / "mape.toml"
    path.write_text(config(tmp_path, restart="false"))
    s = Service(str(path), parse(path.read_text()), RecordFile(tmp_path / "state"), lambda cfg: k, tmp_path / "state")
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(s.sync_once("start"))
        assert asyncio.run(s.sync_once("event"))
    failed = [r for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "upnp"]
    assert len(failed) == 1 and failed[0].getMessage() == "upnp.start `false` exited 1 (retrying)"
    assert s.runner.schedule.wake_at - s.runner.clock() == pytest.approx(60, abs=5)  # retried in a minute
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["upnp"]["problem"] == "upnp.start `false` exited 1"

    path.write_text(config(tmp_path))
    s.reload()
    caplog.clear()
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(s.sync_once("reload"))
    said = [r.getMessage() for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "upnp"]
    assert said == [f"miniupnpd config written to {tmp_path / 'run' / 'miniupnpd.conf'} (153.240.72.209); ran: "
                    f"{s.config.upnp.start}"]  # fmt: skip
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    conf = tmp_path / "run" / "miniupnpd.conf"
    assert state["upnp"] == {"file": str(conf), "offering": "153.240.72.209", "problem": None}

    # An edit of the user's own miniupnpd settings, applied by a reload (or the next sync).
    base = tmp_path / "base.conf"
    base.write_text(USER_CONF.replace("listening_ip=lan0", "listening_ip=br0"))
    s.reload()
    caplog.clear()
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(s.sync_once("reload"))
    said = [r.getMessage() for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "upnp"]
    assert said == [f"miniupnpd restarted, its config changed (153.240.72.209): {s.config.upnp.restart}"], said
    assert "listening_ip=br0" in conf.read_text() and "listening_ip=lan0" not in conf.read_text()
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(s.sync_once("periodic"))  # nothing changed since: no restart
    assert said == [r.getMessage() for r in caplog.records if getattr(r, "MAPE_EVENT", "") == "upnp"]
    assert asyncio.run(s.stop()) == 0
    assert conf.read_text().startswith(upnp.CLOSED)  # the mapping gone with the tunnel: nothing granted


def test_miniupnpd_is_started_when_the_first_mapping_comes_late_and_a_failed_start_is_noticed(tmp_path):
    """Before: at boot without a prefix no file was written, systemd skipped miniupnpd (the drop-in's
    ConditionPathExists), and the try-restart that followed the late prefix never started it: UPnP
    stayed off after a power cut with a slow ONU. A miniupnpd that failed to start went unnoticed."""
    now = [0.0]
    m, log = upnp.Miniupnpd(clock=lambda: now[0]), tmp_path / "restarts"
    cfg = parse(config(tmp_path, check=f"sh -c 'grep -q running {tmp_path / 'state'}'"))
    assert m.update(cfg, None) is None and not (tmp_path / "run" / "miniupnpd.conf").exists()  # boot, no prefix
    assert m.update(cfg, OCN).endswith(f"ran: {cfg.upnp.start}") and log.read_text() == "started\n"
    now[0] += upnp.CHECK_AFTER
    with pytest.raises(upnp.UpnpError, match="miniupnpd is not running after its start or restart"):
        m.update(cfg, OCN)  # it failed to start: said (and shown by status) ...
    (tmp_path / "state").write_text("running\n")
    assert m.update(cfg, OCN).endswith(f"ran: {cfg.upnp.start}")  # ... and started again at the next try
    now[0] += upnp.CHECK_AFTER
    assert m.update(cfg, OCN) is None and log.read_text() == "started\nstarted\n"
    assert m.update(cfg, MOVED).endswith(f": {cfg.upnp.restart}")  # running: later changes restart it


def test_cleanup_removes_our_miniupnpd_file_and_stops_miniupnpd(tmp_path, monkeypatch, capsys):
    """Before: `mape-daemon cleanup` left the file granting ports of a mapping that is gone."""
    from mape_daemon import cli

    path = tmp_path / "mape.toml"
    path.write_text(config(tmp_path))
    upnp.Miniupnpd().update(parse(path.read_text()), OCN)
    monkeypatch.setattr(cli, "_apply", lambda args, config, teardown: 0)  # the kernel part: tested elsewhere
    assert cli.main(["cleanup", "-c", str(path)]) == 0
    assert not (tmp_path / "run" / "miniupnpd.conf").exists()
    assert (tmp_path / "restarts").read_text() == "started\nrestarted\n"  # the restart finds no file: it stays down
    assert "removed (mape-daemon cleanup)" in capsys.readouterr().out
