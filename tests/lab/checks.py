"""What every coexistence test ends with: the data path through the strict BR, and every object of
another program unchanged."""

from __future__ import annotations

import re

from . import traffic
from .mapping import LabCE
from .netns import call, sh
from .topo import SERVER, Lab

COUNTERS = re.compile(r"\[\d+:\d+\]")
BUILTIN = (":PREROUTING", ":INPUT", ":FORWARD", ":OUTPUT", ":POSTROUTING")


def data_path(lab: Lab, ce: LabCE, chain: str, n: int = 3) -> None:
    """TCP, UDP and ICMP from the LAN reach the server from the MAP IPv4, each on a port or id of
    the set, and the BR dropped nothing. At once: a caller first waits for what says the path is
    back (the daemon's repair, firewalld's binding), so an outage after a repair is not waited out."""
    answers = call(lab.lan, traffic.tcp_sequential, SERVER, n, 80, 3)
    assert all(a.split()[0] == ce.ipv4 and int(a.split()[1]) in ce.ports() for a in answers), answers
    udp = call(lab.lan, traffic.udp_query, SERVER)
    assert udp.split()[0] == ce.ipv4 and int(udp.split()[1]) in ce.ports(), udp
    assert call(lab.lan, traffic.ping_once, SERVER, 7777, 1, 3)
    icmp = [e for e in traffic.read_log(lab.server_log) if e["proto"] == "icmp"]
    assert icmp and icmp[-1]["src"] == ce.ipv4 and icmp[-1]["sport"] in ce.ports(), icmp[-1:]
    assert lab.br_counters(chain) == {"wrong-source": 0, "out-of-set": 0}


# Ours, and the iptables-nft tables (compared rule by rule through iptables-save, ours left out).
SKIPPED_TABLES = ("ip mape", "ip filter", "ip nat", "ip mangle", "ip raw", "ip security")


def _without_tables(ruleset: str) -> str:
    blocks = re.split(r"(?m)^(?=table )", ruleset)
    return "".join(b for b in blocks if not b.startswith(tuple(f"table {t} " for t in SKIPPED_TABLES)))


def foreign(ns: str | None, iptables: str = "iptables-nft") -> dict[str, list[str] | str]:
    """Every object another program made: iptables rules and chains but ours, the nftables ruleset
    but our table, routing rules and routes but ours (and the kernel's, which come and go with
    addresses, and RA routes, whose lifetime counts down)."""
    save = [COUNTERS.sub("", line) for line in sh(ns, f"{iptables}-save").splitlines()
            if line.startswith(("-A", ":")) and "MAPE-" not in line and not line.startswith(BUILTIN)]  # fmt: skip
    routes = [line for line in sh(ns, "ip", "route", "show", "table", "all").splitlines()
              if not any(f"proto {p} " in line for p in ("203", "kernel", "ra"))]  # fmt: skip
    rules = [line for line in sh(ns, "ip", "rule", "show").splitlines() if "proto 203" not in line]
    nft = _without_tables(sh(ns, "nft", "-s", "list", "ruleset"))
    return {"iptables": save, "routes": routes, "rules": rules, "nft": nft}
