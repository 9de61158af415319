"""`mape-daemon calc` as a user runs it: a real process, its output and exit code."""

import json
import subprocess
import sys

import pytest


def calc(*args):
    return subprocess.run(
        [sys.executable, "-m", "mape_daemon", "calc", *args], capture_output=True, text=True, timeout=60
    )


def test_ocn_json_is_one_object_with_the_documented_fields():
    r = calc("2400:4050:1234:5600::/56", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["isp"] == "ocn"
    assert out["rule"] == {
        "ipv6_prefix": "2400:4050::/34",
        "ipv4_prefix": "153.240.0.0/16",
        "ea_len": 22,
        "psid_offset": 6,
        "psid_len": 6,
    }
    assert (out["ipv4"], out["psid"], out["psid_offset"], out["psid_len"]) == ("153.240.72.209", 22, 6, 6)
    assert out["ce_ipv6"] == "2400:4050:1234:5600:99:f048:d100:1600"
    assert out["br"] == "2001:380:a120::9"
    assert len(out["port_ranges"]) == 63 and out["ports"] == 1008
    assert out["port_ranges"] == sorted(out["port_ranges"])
    assert sum(hi - lo + 1 for lo, hi in out["port_ranges"]) == 1008


@pytest.mark.parametrize("wan", ["2400:4050:1234:5678::1", "2400:4050:1234:5678::/64", "2400:4050:1234:56ff::1/64"])
def test_address_or_64_gives_the_same_answer_as_the_56(wan):
    r = calc(wan, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["ipv4"], out["ce_ipv6"]) == ("153.240.72.209", "2400:4050:1234:5600:99:f048:d100:1600")


def test_human_output_summarises():
    r = calc("2400:4050:1234:5600::/56")
    assert r.returncode == 0
    assert "OCN Virtual Connect" in r.stdout
    assert "153.240.72.209" in r.stdout and "2400:4050:1234:5600:99:f048:d100:1600" in r.stdout
    assert "1008 in 63 block(s) of 16" in r.stdout
    assert "1376-1391, 2400-2415, 3424-3439, ..., 64864-64879" in r.stdout


def test_explicit_rule_and_layout():
    r = calc("2001:db8:12:3400::/56", "--rule", "2001:db8::/40,192.0.2.0/24,16,6,2001:db8:ffff::1", "--json")
    out = json.loads(r.stdout)
    assert (out["ipv4"], out["psid"], out["ports"]) == ("192.0.2.18", 52, 252)
    assert out["ce_ipv6"] == "2001:db8:12:3400:0:c000:212:34" and out["iid"] == "rfc7597"
    assert out["br"] == "2001:db8:ffff::1" and out["isp"] is None
    r = calc("2001:db8:12:3400::/56", "--rule", "2001:db8::/40,192.0.2.0/24,16,6", "--iid", "draft03", "--json")
    assert json.loads(r.stdout)["ce_ipv6"] == "2001:db8:12:3400:c0:2:1200:3400"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["2409:10:1234:5600::/56"], "not served by OCN Virtual Connect"),
        (["2001:db8::/56"], "matches no bundled MAP-E rule"),
        (["2400:4050:1234:5600::/56", "--isp", "v6plus"], "matches no v6plus"),
        (["not-an-address"], "'not-an-address' is not an IPv6 address or prefix"),
        (["2400:4050:1234::/48"], "shorter than the end-user prefix length /56"),
        (["2001:db8::/56", "--rule", "2001:db8::/40,192.0.2.0/24,16"], "expected IPV6PREFIX,IPV4PREFIX"),
        (["2001:db8::/56", "--rule", "2001:db8::/40,192.0.2.0/24,x,6"], "--rule"),
        (["2001:db8::/56", "--rule", "2001:db8::/40,192.0.2.0/24,16,12"], "PSID offset 12 + PSID length 8"),
        (["2001:db8::/56", "--rule", "2001:db8::/40,192.0.2.0/24,16,6", "--isp", "ocn"], "not both"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    r = calc(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bad_option_is_a_usage_error():
    r = calc("2400:4050:1234:5600::/56", "--isp", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_run_with_a_bad_config_exits_78_before_touching_anything(tmp_path):
    bad = tmp_path / "mape.toml"
    bad.write_text('[wan]\ninterface = "eth0"\nsurprise = true\n')
    r = subprocess.run([sys.executable, "-m", "mape_daemon", "run", "-c", str(bad)], capture_output=True, text=True)
    assert r.returncode == 78
    assert "wan.surprise: unknown key" in r.stderr and "Traceback" not in r.stderr
