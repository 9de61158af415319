"""Port usage for `mape-daemon status`, and its text."""

from mape_daemon.mapcalc import port_ranges
from mape_daemon.portuse import usage
from mape_daemon.state import Flow
from mape_daemon.status import to_text

A, B = "192.168.1.10", "192.168.1.20"
FLOWS = [Flow("tcp", 1383, A), Flow("tcp", 1384, B), Flow("tcp", 2415, A), Flow("udp", 3430, A),
         Flow("icmp", 64870, B)]  # fmt: skip


def test_usage_per_protocol_fullest_block_and_hosts():
    u = {proto: x.as_dict() for proto, x in usage(FLOWS, list(port_ranges(22, 6, 6))).items()}
    assert u["tcp"] == {"in_use": 3, "of": 1008, "fullest_block": {"range": [1376, 1391], "in_use": 2, "size": 16},
                        "hosts": [[A, 2], [B, 1]]}  # fmt: skip
    assert u["udp"]["in_use"] == 1 and u["udp"]["fullest_block"]["range"] == [3424, 3439]
    assert u["icmp"]["fullest_block"]["range"] == [64864, 64879]


def test_text_shows_conflicts_repairs_upnp_and_the_last_changes():
    state = {
        "last_sync": 0, "ok": True, "error": None, "changes": 0, "reason": "", "prefix": "2400:4050:1234:5600::/56",
        "isp": "ocn", "rule": "2400:4050::/34", "ipv4": "153.240.72.209", "psid": 22, "ce_ipv6": "x",
        "tunnel": {"name": "ip6tnl1", "present": True, "up": True}, "backend": "iptables-nft",
        "conflicts": ["route slot taken: default dev ppp0 table main metric 0 ..."],
        "repairs": {"event": 2, "periodic": 1},
        "upnp": {"file": "/run/mape-daemon/miniupnpd.conf", "offering": None, "problem": "upnp.restart `false` exited 1"},
        "history": [{"time": 0, "cause": "event", "event": "repair", "text": "tunnel ip6tnl1 recreated: it was missing"}],
    }  # fmt: skip
    text = to_text(state)
    assert "CONFLICT:   route slot taken" in text
    assert "firewall:   iptables-nft" in text
    assert "repairs:    2 by event, 1 by periodic" in text
    assert "UPnP:       miniupnpd FAILING: upnp.restart `false` exited 1" in text
    state["upnp"] |= {"offering": "153.240.72.209", "problem": None}
    assert "UPnP:       miniupnpd grants ports of 153.240.72.209's set (/run/mape-daemon/miniupnpd.conf)" in to_text(
        state
    )
    assert "[event] tunnel ip6tnl1 recreated: it was missing" in text
