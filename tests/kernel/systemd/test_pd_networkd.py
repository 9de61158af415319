"""systemd-networkd (252) as the router's DHCPv6-PD client (issue 20): Kea in the ISP delegates a
/56, networkd asks for it and numbers the LAN from it, the WAN has no global address of it; the
packaged service maps from the delegation and follows a new one."""

from __future__ import annotations

import json

from tests.kernel.conftest import running_lab
from tests.kernel.systemd.conftest import CONF, run, use_namespace
from tests.kernel.systemd.test_managers import NETWORK, stop_service
from tests.lab import checks
from tests.lab.netns import sh
from tests.lab.topo import wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n'
ACCESS = "2001:db8:ff:1::/64"
PD_A, PD_B = "2400:4050:1234:5600::/56", "2400:4050:1234:9a00::/56"


def status() -> dict:
    return json.loads(run("mape-daemon", "status", "--json", check=False))  # exit 1 until a good sync


def delegated(prefix: str) -> bool:
    return f"unreachable {prefix}" in sh(None, "ip", "-6", "route", "show", "proto", "dhcp")


def test_networkd_delegation_is_mapped_and_followed(package, tmp_path, request):
    NETWORK.mkdir(parents=True, exist_ok=True)
    # As the README gives it.
    (NETWORK / "10-wan.network").write_text("[Match]\nName=wan0\n[Network]\nDHCP=ipv6\nIPv6AcceptRA=yes\n"
                                            "[DHCPv6]\nPrefixDelegationHint=::/56\nWithoutRA=solicit\n")  # fmt: skip
    (NETWORK / "11-lan.network").write_text("[Match]\nName=lan0\n[Network]\nAddress=192.168.1.1/24\n"
                                            "DHCPPrefixDelegation=yes\nIPv6SendRA=no\n"
                                            "[DHCPPrefixDelegation]\nSubnetId=1\nAnnounce=no\n")  # fmt: skip
    with running_lab(tmp_path, request, root=True, wan_prefix=ACCESS, delegate=PD_A, slaac=False) as lab:
        try:
            run("systemctl", "unmask", "systemd-networkd.service", "systemd-networkd.socket")
            run("systemctl", "start", "systemd-networkd.service")
            wait_for(lambda: delegated(PD_A), 120, "networkd's delegation")
            assert "2400:4050:1234:5601:" in sh(None, "ip", "-6", "addr", "show", "dev", "lan0")
            assert not [a for a in lab.wan_addresses() if a["address"].startswith("2400:")]
            ce = lab.ce_params(PD_A)
            chain = lab.br_add_ce(ce)
            CONF.write_text(CONFIG)
            use_namespace(None)
            run("systemctl", "start", "mape-daemon")
            wait_for(lambda: status().get("ipv4") == ce.ipv4 and status().get("ok"), 60, "the mapping")
            assert status()["prefix_from"] == f"the delegated prefix {PD_A} (DHCPv6-PD)"
            checks.data_path(lab, ce, chain)

            lab.redelegate(PD_B)  # networkd's next renewal (5 s) brings the new prefix
            moved = lab.ce_params(PD_B)
            chain = lab.br_add_ce(moved)
            wait_for(lambda: status().get("ipv4") == moved.ipv4 and status().get("ok"), 120, "the new mapping")
            checks.data_path(lab, moved, chain)
        finally:
            stop_service()
            run("systemctl", "stop", "systemd-networkd.service", "systemd-networkd.socket", check=False)
            for f in ("10-wan.network", "11-lan.network"):
                (NETWORK / f).unlink(missing_ok=True)
