"""Port usage for `mape-daemon status`, from conntrack's own output format."""

from mape_daemon.kernel.conntrack import parse_nat_ports
from mape_daemon.mapcalc import port_ranges
from mape_daemon.status import port_usage

CONNTRACK = """\
tcp      6 431999 ESTABLISHED src=192.168.1.10 dst=203.0.113.10 sport=51000 dport=80 src=203.0.113.10 dst=153.240.72.209 sport=80 dport=1383 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=192.168.1.10 dst=203.0.113.10 sport=51002 dport=80 src=203.0.113.10 dst=153.240.72.209 sport=80 dport=1384 [ASSURED] mark=0 use=1
tcp      6 117 TIME_WAIT src=192.168.1.10 dst=203.0.113.10 sport=51004 dport=80 src=203.0.113.10 dst=153.240.72.209 sport=80 dport=2415 [ASSURED] mark=0 use=1
udp      17 29 src=192.168.1.10 dst=203.0.113.10 sport=40000 dport=7 src=203.0.113.10 dst=153.240.72.209 sport=7 dport=3430 mark=0 use=1
icmp     1 29 src=192.168.1.10 dst=203.0.113.10 type=8 code=0 id=7 src=203.0.113.10 dst=153.240.72.209 type=0 code=0 id=64870 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.
"""


def test_parse_reply_ports_and_icmp_ids():
    assert parse_nat_ports(CONNTRACK) == [("tcp", 1383), ("tcp", 1384), ("tcp", 2415), ("udp", 3430), ("icmp", 64870)]


def test_usage_per_protocol_and_fullest_block():
    usage = port_usage(parse_nat_ports(CONNTRACK), list(port_ranges(22, 6, 6)))
    assert usage["tcp"] == {"in_use": 3, "of": 1008, "fullest_block": {"range": [1376, 1391], "in_use": 2, "size": 16}}
    assert usage["udp"]["in_use"] == 1 and usage["udp"]["fullest_block"]["range"] == [3424, 3439]
    assert usage["icmp"]["fullest_block"]["range"] == [64864, 64879]
