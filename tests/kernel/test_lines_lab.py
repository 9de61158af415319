"""DS-Lite and IPIP on the lab line (issue 23), both provisioned by HB46PP, beside PPPoE.

The line's resolver (dnsmasq, announced in the RAs) has the 4over6.info record and the AFTR's
name; the provisioning server offers DS-Lite first, then IPIP. The AFTR in the ISP decapsulates
only from the B4 address we expect (the prefix's /64 and ::b4) and NATs onto its own pool; the
IPIP provider's end only from ours (::feed, the interface identifier its answer gives), and its
update endpoint records each call. Computed here, never read from the daemon: the addresses the
far ends accept.
"""

from __future__ import annotations

import json
import signal
from ipaddress import IPv6Network

from tests.kernel.conftest import running_lab
from tests.lab import traffic
from tests.lab.daemon import Daemon
from tests.lab.netns import call
from tests.lab.topo import AFTR, AFTR_NAME, AFTR_POOL, FIXED_IPV4, IPIP_END, LAN_CONSOLE, PPP_REMOTE, SERVER, wait_for

FIRST, SECOND, THIRD = "2400:4050:1234:5600::/64", "2400:4050:1234:5700::/64", "2400:4050:1234:5800::/64"
ANSWER = {
    "enabler_name": "Lab VNE",
    "ttl": 3600,
    "order": ["dslite", "ipip"],
    "dslite": {"aftr": AFTR_NAME},
    "ipip": [{"ipv6_local": "2001:db8:9::feed", "ipv6_remote": IPIP_END, "ipv4": f"{FIXED_IPV4}/32"}],
}


def host(prefix: str, iid: str) -> str:
    return str(IPv6Network(prefix)[int(iid, 16)])


def crosses(lab, source_ip: str) -> None:
    """TCP, UDP and ICMP from the LAN client reach the server from `source_ip`; the console, one
    of pppoe.hosts, from PPPoE's address."""
    answers = call(lab.lan, traffic.tcp_sequential, SERVER, 2, 80, 3)
    assert all(a.split()[0] == source_ip for a in answers), answers
    assert call(lab.lan, traffic.udp_query, SERVER).split()[0] == source_ip
    assert call(lab.lan, traffic.ping_once, SERVER, 4242, 1, 3)
    pings = [e for e in traffic.read_log(lab.server_log) if e["proto"] == "icmp"]
    assert pings[-1]["src"] == source_ip, pings[-1:]
    (console,) = call(lab.lan, traffic.tcp_sequential, SERVER, 1, 80, 3, LAN_CONSOLE)
    assert console.split()[0] == PPP_REMOTE, console


def updates(lab) -> list[dict]:
    log = lab.dir / "update-requests.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_ds_lite_then_ipip_by_hb46pp_beside_pppoe_across_renumbering(tmp_path, request):
    with running_lab(tmp_path, request, wan_prefix=FIRST) as lab:
        _, ca = lab.start_hb46pp(ANSWER, f"--host-record={AFTR_NAME},{AFTR}")
        lab.start_aftr(host(FIRST, "b4"))
        url = lab.start_ipip_end(host(FIRST, "feed"), ca)
        lab.start_pppoe()
        wait_for(lab.ppp_up, 60, "ppp0")
        base = (f'[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["{LAN_CONSOLE}/32"]\n'
                f'[isp]\nprovisioning = "hb46pp"\nca_file = "{ca}"\n')  # fmt: skip
        d = Daemon(lab, tmp_path, base).start()
        try:
            # DS-Lite, the answer's first method, to the AFTR its name resolves to on the line's resolver.
            wait_for(lambda: d.synced_by_me() and d.state().get("method") == "ds-lite", 120, "DS-Lite")
            s = d.state()
            assert (s["remote"], s["ce_ipv6"]) == (AFTR, host(FIRST, "b4")), s
            assert f"DS-Lite: the AFTR {AFTR_NAME} is {AFTR}" in d.text()
            crosses(lab, AFTR_POOL)  # NATed by the AFTR, not by us

            lab.renumber(SECOND)
            lab.follow("aftr1", host(SECOND, "b4"))  # the AFTR serves the new B4 (any of the line's)
            d.wait_state("ce_ipv6", host(SECOND, "b4"), 60)
            crosses(lab, AFTR_POOL)

            # A reload fixes the method to IPIP: the same answer's tunnel, nothing of DS-Lite left.
            d.cfg.write_text(base.replace("[isp]\n", '[isp]\nmethod = "ipip"\n') + (
                f'[ipip]\nupdate_url = "{url}/update?addr={{ipv6}}&ip={{ipv4}}"\nupdate_user = "lab"\n'
                f'update_password = "pw-lab-9"\nupdate_ca_file = "{ca}"\n'))  # fmt: skip
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: d.state().get("method") == "ipip" and d.state().get("ok"), 90, "IPIP")
            local = host(SECOND, "feed")
            assert d.state()["ce_ipv6"] == local and d.state()["remote"] == IPIP_END
            wait_for(lambda: updates(lab), 60, "the update endpoint called")
            (told,) = updates(lab)
            assert told["path"] == f"/update?addr={local.replace(':', '%3A')}&ip={FIXED_IPV4}" and told["from"] == local
            lab.follow("ipip1", local)  # the provider's end follows what it was told
            crosses(lab, FIXED_IPV4)
            assert "192.0.0.2" not in lab_addresses(lab) and host(SECOND, "b4") not in lab_addresses(lab)

            lab.renumber(THIRD)
            local = host(THIRD, "feed")
            wait_for(lambda: len(updates(lab)) == 2, 60, "the update endpoint told the new address")
            assert updates(lab)[-1]["from"] == local and d.state()["update"]["state"] == "ok"
            lab.follow("ipip1", local)
            crosses(lab, FIXED_IPV4)
            assert len(updates(lab)) == 2  # once per address change
            assert "pw-lab-9" not in d.text() and "ip=" not in d.text()  # credentials and query never logged
        finally:
            assert d.stop() == 0, d.text()


def lab_addresses(lab) -> str:
    from tests.lab.netns import sh

    return sh(lab.ce, "ip", "addr", "show")
