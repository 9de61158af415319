"""The command line as a person uses it: every command takes -c FILE, `apply` is once by default,
each --help ends with an example, and errors name the key. Commands that read the kernel run in a
fresh network namespace of this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mape_daemon.cli import EXAMPLES, build_parser
from tests.hostns import fresh_netns

GOOD = '[wan]\ninterface = "wan0"\n[firewall]\nbackend = "iptables-nft"\n'
COMMANDS = ["calc", "check-config", "plan", "apply", "run", "status", "cleanup", "ports"]


def mape(*args: str, ns: str | None = None, state=None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "mape_daemon", *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    env = {**os.environ, "MAPE_STATE_DIR": str(state)} if state else None
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_c_and_its_help_gives_an_example(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    assert "-c" in sub.format_help() and f"example: {EXAMPLES[command]}" in sub.format_help()
    r = mape(command, "--help")
    assert r.returncode == 0 and r.stdout.rstrip().splitlines()[-1] == f"example: {EXAMPLES[command]}"


@pytest.mark.parametrize("command", ["check-config", "plan", "apply", "run"])
def test_a_bad_config_given_by_c_exits_78_naming_file_and_key(command, tmp_path):
    bad = tmp_path / "mape.toml"
    bad.write_text('[wan]\ninterface = "eth0"\n[pppoe]\nfwmark = 0x11170\n')
    r = mape(command, "-c", str(bad), state=tmp_path / "run")
    assert r.returncode == 78, r.stderr
    assert f"{bad}: pppoe.fwmark: 0x11170 has bits outside pppoe.mask 0xffff" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_takes_the_file_either_way(tmp_path):
    good = tmp_path / "mape.toml"
    good.write_text(GOOD)
    for args in (["check-config", str(good)], ["check-config", "-c", str(good)]):
        r = mape(*args)
        assert r.returncode == 0 and f"{good}: ok (WAN wan0" in r.stdout, r.stderr
        assert "0 forward(s), UPnP off)" in r.stdout


def test_a_wan_name_no_link_can_ever_have_is_a_config_error(tmp_path):
    bad = tmp_path / "mape.toml"
    bad.write_text('[wan]\ninterface = "enp0s31f6.1000.1"\n')  # 16 bytes: the kernel allows 15
    r = mape("run", "-c", str(bad))
    assert r.returncode == 78 and "wan.interface: interface name 'enp0s31f6.1000.1' is 16 bytes" in r.stderr


def test_apply_runs_once_without_once_and_cleanup_works_without_a_config(tmp_path):
    good = tmp_path / "mape.toml"
    good.write_text(GOOD)
    with fresh_netns() as ns:
        r = mape("apply", "-c", str(good), ns=ns, state=tmp_path / "run")
        assert r.returncode == 0, r.stderr
        assert "no parameters: no global IPv6 address on wan0" in r.stdout
        assert "0 change(s), 0 kernel write(s)" in r.stdout
        r = mape("cleanup", "-c", str(tmp_path / "missing.toml"), ns=ns, state=tmp_path / "run")
        assert r.returncode == 0 and "removing what the record" in r.stderr and "nothing to change" in r.stdout


def test_calc_maps_by_the_config_given_with_c(tmp_path):
    explicit = tmp_path / "mape.toml"
    explicit.write_text(
        '[wan]\ninterface = "wan0"\n[isp]\nname = "explicit"\n[isp.rule]\nipv6_prefix = "2001:db8::/40"\n'
        'ipv4_prefix = "192.0.2.0/24"\nea_len = 16\nbr = "2001:db8:ffff::1"\niid = "rfc7597"\n'
    )
    r = mape("calc", "2001:db8:12:3400::/56", "-c", str(explicit), "--json")
    assert r.returncode == 0, r.stderr
    assert '"ipv4": "192.0.2.18"' in r.stdout and '"ce_ipv6": "2001:db8:12:3400:0:c000:212:34"' in r.stdout


def test_status_without_a_running_daemon_says_so(tmp_path):
    r = mape("status", state=tmp_path / "run")
    assert r.returncode == 1 and "is mape-daemon running?" in r.stdout
