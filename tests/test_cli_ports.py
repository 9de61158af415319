"""`mape-daemon ports`: the port set compactly, and the usable ports nearest a wanted one."""

from __future__ import annotations

import json

import pytest

from mape_daemon import cli
from mape_daemon.mapcalc import nearest, port_ranges
from mape_daemon.statefile import DaemonState

OCN = "2400:4050:1234:5600::/56"  # 153.240.72.209 psid 22: 63 blocks of 16 from 1376-1391


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_nearest_holds_or_brackets_the_port():
    ranges = port_ranges(22, 6, 6)
    assert nearest(ranges, 1380).holding == (1376, 1391)
    n = nearest(ranges, 25565)
    assert (n.holding, n.below, n.above) == (None, (24928, 24943), (25952, 25967))
    assert nearest(ranges, 80).below is None and nearest(ranges, 80).above == (1376, 1391)
    assert nearest(ranges, 65535).above is None and nearest(ranges, 65535).below == (64864, 64879)


def test_the_whole_set_six_blocks_a_line_and_the_nearest_usable(capsys):
    code, out, _ = run(capsys, "ports", OCN, "--near", "25565")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "OCN Virtual Connect 153.240.72.209 psid 22: 1008 ports in 63 block(s) of 16"
    assert lines[1].split() == ["1376-1391", "2400-2415", "3424-3439", "4448-4463", "5472-5487", "6496-6511"]
    assert len(lines) == 1 + 11 + 1 and lines[11].split() == ["62816-62831", "63840-63855", "64864-64879"]
    assert lines[-1] == "port 25565: not in the set; nearest usable: 24928-24943 (below) and 25952-25967 (above)"


def test_json_names_the_block_holding_the_port(capsys):
    code, out, _ = run(capsys, "ports", "240b:10:1234:5600::1", "--near", "5480", "--json")
    data = json.loads(out)
    assert code == 0 and data["ports"] == 240 and len(data["port_ranges"]) == 15
    assert data["near"] == {"port": 5480, "in_set": True, "holding": [5472, 5487], "below": None, "above": None}


def running_state(**kw) -> DaemonState:
    return DaemonState(pid=1, last_sync=0.0, ok=True, error=None, changes=0, reason=kw.pop("reason", ""),
                       tunnel_name="ip6tnl1", wan="wan0", **kw)  # fmt: skip


def test_without_a_prefix_the_running_daemons_mapping(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "state_dir", lambda: tmp_path)
    code, _, err = run(capsys, "ports")
    assert code == cli.EXIT_USAGE and "no PREFIX given and no daemon state" in err
    running_state(isp="ocn", ipv4="153.240.72.209", psid=22, port_ranges=list(port_ranges(22, 6, 6))).write(tmp_path)
    code, out, _ = run(capsys, "ports", "--near", "1391")
    assert code == 0 and out.splitlines()[-1] == "port 1391: in the set (block 1376-1391)"
    running_state(reason="no global IPv6 address on wan0").write(tmp_path)
    code, _, err = run(capsys, "ports")
    assert code == cli.EXIT_USAGE and "no mapping now: no global IPv6 address on wan0" in err
    running_state(method="ds-lite", ipv4="192.0.0.2", port_ranges=[]).write(tmp_path)
    code, _, err = run(capsys, "ports")
    assert code == cli.EXIT_USAGE and "DS-Lite: its AFTR owns the ports" in err
    running_state(method="ipip", ipv4="198.18.0.77", psid=0, port_ranges=[(1, 65535)]).write(tmp_path)
    code, out, _ = run(capsys, "ports", "--near", "80")
    assert code == 0 and out.startswith("fixed IPv4 (IPIP) 198.18.0.77") and "port 80: in the set" in out


@pytest.mark.parametrize(("argv", "says"), [
    (["ports", OCN, "--near", "70000"], "--near 70000: a port is 1 to 65535"),
    (["ports", "2001:db8::1"], "matches no bundled MAP-E rule"),
    (["ports", "not-a-prefix"], "is not an IPv6 address or prefix"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    code, out, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE and out == "" and says in err and len(err.splitlines()) == 1
