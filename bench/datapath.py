"""Data path, on this machine's kernel in network namespaces (no tunnel needed for NAT cost).

client (10.77.0.2) -- router (SNAT) -- server (198.51.100.2:80)

- new-connection rate through our MAPE-SNAT chains (189 rules, OCN) against one MASQUERADE rule;
- port capacity: concurrent connections to one server address and port before the first
  failure, against the size of the port set, and how evenly the blocks filled; the baseline is
  what OpenWrt's fw4 does (every connection in the first 16-port block).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from ipaddress import IPv6Address

from mape_daemon import desired, rules
from mape_daemon.config import parse
from mape_daemon.kernel.netfilter_restore import restore_script
from mape_daemon.mapcalc import compute
from mape_daemon.plan import diff_firewall
from mape_daemon.state import NOTHING, State
from tests.lab import traffic
from tests.lab.netns import call, sh, spawn

WHERE = "host kernel, namespaces"


def params(address: str):
    a = IPv6Address(address)
    return compute(rules.bundled().match(a), a)


class Topology:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.client, self.router, self.server = f"bc{tag}", f"br{tag}", f"bs{tag}"
        self.pids: list[int] = []

    def __enter__(self) -> Topology:
        for ns in (self.client, self.router, self.server):
            sh(None, "ip", "netns", "add", ns)
            sh(ns, "ip", "link", "set", "lo", "up")
        sh(None, "ip", "link", "add", "c0", "netns", self.client, "type", "veth", "peer", "r0", "netns", self.router)
        sh(None, "ip", "link", "add", "r1", "netns", self.router, "type", "veth", "peer", "s0", "netns", self.server)
        addresses = [(self.client, "c0", "10.77.0.2/24"), (self.router, "r0", "10.77.0.1/24"),
                     (self.router, "r1", "198.51.100.1/24"), (self.server, "s0", "198.51.100.2/24")]  # fmt: skip
        for ns, dev, addr in addresses:
            sh(ns, "ip", "addr", "add", addr, "dev", dev)
            sh(ns, "ip", "link", "set", dev, "up")
        sh(self.client, "ip", "route", "add", "default", "via", "10.77.0.1")
        sh(self.server, "ip", "route", "add", "default", "via", "198.51.100.1")
        call(self.router, _forwarding_on)
        self.pids.append(spawn(self.server, traffic.serve, f"/tmp/{self.server}.jsonl", "198.51.100.2"))
        time.sleep(0.3)  # the server's listen socket (a benchmark, not a test)
        return self

    def __exit__(self, *exc) -> None:
        import os
        import signal

        for pid in self.pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for ns in (self.client, self.router, self.server):
            sh(None, "ip", "netns", "del", ns, check=False)

    def nat(self, restore_text: str) -> None:
        sh(self.router, "iptables-nft-restore", input=restore_text)  # replaces the nat table


def _forwarding_on() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


def snat_table(p, out_dev: str = "r1") -> str:
    """Our nat chains for `p`, as one iptables-restore of the whole nat table."""
    cfg = parse('[wan]\ninterface = "wan0"\n[tunnel]\nname = "' + out_dev + '"\n')
    want = desired.build(cfg, p)
    nat = State(chains=frozenset(c for c in want.chains if c.table == "nat"),
                jumps=tuple(j for j in want.jumps if j.table == "nat"))  # fmt: skip
    (change,) = diff_firewall(nat, NOTHING)
    return restore_script(change)


def masquerade_table() -> str:
    return "*nat\n-A POSTROUTING -o r1 -j MASQUERADE\nCOMMIT\n"


def first_block_table(p) -> str:
    lo, hi = p.port_ranges[0]
    rules = "".join(f"-A POSTROUTING -o r1 -p {proto} -j SNAT --to-source {p.ipv4}:{lo}-{hi}\n"
                    for proto in ("tcp", "udp", "icmp"))  # fmt: skip
    return f"*nat\n{rules}COMMIT\n"


def rates(topo: Topology, tables: dict[str, str], n: int = 400, rounds: int = 5) -> dict[str, float]:
    """New TCP connections per second for each nat table, rounds interleaved so that load from
    elsewhere on the machine hits both alike; the median of the rounds."""
    out: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(rounds):
        for name, table in tables.items():
            topo.nat(table)
            sh(topo.router, "conntrack", "-F", check=False)
            t0 = time.perf_counter()
            answers = call(topo.client, traffic.tcp_sequential, "198.51.100.2", n)
            dt = time.perf_counter() - t0
            assert all(not a.startswith("error") for a in answers), answers[:3]
            out[name].append(n / dt)
    return {name: statistics.median(v) for name, v in out.items()}


def capacity(topo: Topology, p, tries: int) -> tuple[int, dict]:
    answers = call(topo.client, traffic.tcp_concurrent, "198.51.100.2", tries, 80, 8)
    ok = [int(a.split()[1]) for a in answers if not a.startswith("error")]
    blocks = Counter(next(i for i, (lo, hi) in enumerate(p.port_ranges) if lo <= port <= hi) for port in ok)
    sh(topo.router, "conntrack", "-F", check=False)
    return len(ok), {"blocks_used": len(blocks), "min_per_block": min(blocks.values(), default=0),
                     "max_per_block": max(blocks.values(), default=0)}  # fmt: skip


def run() -> list[dict]:
    ocn, v6plus = params("2400:4050:1234:5600::1"), params("240b:10:1234:5600::1")
    rows = []
    with Topology() as topo:
        sh(topo.router, "ip", "addr", "add", f"{ocn.ipv4}/32", "dev", "r1")
        sh(topo.router, "ip", "addr", "add", f"{v6plus.ipv4}/32", "dev", "r1")
        sh(topo.server, "ip", "route", "add", f"{ocn.ipv4}/32", "via", "198.51.100.1")
        sh(topo.server, "ip", "route", "add", f"{v6plus.ipv4}/32", "via", "198.51.100.1")
        r = rates(topo, {"masquerade": masquerade_table(), "ours": snat_table(ocn)})
        ours, base = r["ours"], r["masquerade"]
        rows.append({"name": "new TCP connections/s through MAPE-SNAT (189 rules)", "where": WHERE,
                     "value": ours, "unit": "conn/s", "baseline": base,
                     "baseline_name": "one MASQUERADE rule", "ratio_to_baseline": ours / base})  # fmt: skip
        for name, p in (("OCN", ocn), ("v6plus", v6plus)):
            topo.nat(snat_table(p))
            n, spread = capacity(topo, p, p.ports + 40)
            topo.nat(first_block_table(p))
            n_fw4, _ = capacity(topo, p, 60)
            rows.append({"name": f"concurrent connections to one server port, {name}", "where": WHERE,
                         "value": n, "unit": "conn", "set_size": p.ports, **spread,
                         "baseline": n_fw4, "baseline_name": "first block only (OpenWrt fw4)",
                         "ratio_to_baseline": n / max(1, n_fw4)})  # fmt: skip
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
