"""Data path, on this machine's kernel in network namespaces (no tunnel needed for NAT cost).

client (10.77.0.2) -- router (SNAT) -- server (198.51.100.2:80)

- new TCP connections/s from parallel clients (one process per CPU) through each backend's SNAT,
  against one MASQUERADE rule; every connection's source address and port is checked at the
  server (inside the set for ours);
- port capacity: concurrent connections to one server address and port before the first
  failure, against the size of the port set, and how evenly the blocks filled, for each backend;
  baselines: stock OpenWrt fw4 (every connection in the first 16-port block) and the community
  fix posted for it (a `numgen inc` map over the blocks, TCP and UDP only).
"""

from __future__ import annotations

import os
import pickle
import statistics
import time
import uuid
from collections import Counter
from ipaddress import IPv6Address
from pathlib import Path

from mape_daemon import desired, maprules
from mape_daemon.config import parse
from mape_daemon.kernel.netfilter_restore import restore_script
from mape_daemon.mapcalc import compute
from mape_daemon.plan import diff_firewall
from mape_daemon.state import NOTHING
from tests.lab import traffic
from tests.lab.netns import call, setns, sh, spawn

WHERE = "host kernel, namespaces"


def params(address: str):
    a = IPv6Address(address)
    return compute(maprules.bundled().match(a), a)


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

    def nat(self, text: str | tuple[str, str]) -> None:
        """Only this NAT on the router: an iptables restore text, an nft script, or both (the
        iptables-nft backend's whole state: its chains in every table and its companion table)."""
        for table in ("nat", "mangle", "filter"):
            sh(self.router, "iptables-nft-restore", input=f"*{table}\nCOMMIT\n")
        sh(self.router, "nft", "delete", "table", "ip", "mape", check=False)
        for part in (text,) if isinstance(text, str) else text:
            if part.startswith("*"):
                sh(self.router, "iptables-nft-restore", input=part)
            elif part:
                sh(self.router, "nft", "-f", "-", input=part)

    def served_since(self, mark: int) -> list[dict]:
        return traffic.read_log(Path(f"/tmp/{self.server}.jsonl"))[mark:]


def _forwarding_on() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


PER_CONNECTION = '[snat]\nudp_mapping = "per-connection"\n'


def bench_config(extra: str = ""):
    return parse('[wan]\ninterface = "wan0"\n[tunnel]\nname = "r1"\n' + extra)


def snat_table(p, extra: str = "") -> tuple[str, str]:
    """Everything the iptables-nft backend writes for `p`: its chains in every table (one
    iptables-restore text) and its companion nft table (guard, inbound policy), as the daemon
    writes them: the same rule set as the nftables backend's one table."""
    want = desired.build(bench_config(extra), p)
    return "".join(restore_script(change) for change in diff_firewall(want, NOTHING)), want.nft or ""


def native_table(p, extra: str = "") -> str:
    """Our table for `p` (nftables backend), SNAT and guard, as the daemon writes it."""
    return desired.build(bench_config(extra), p, native=True).nft or ""


def community_fix(p) -> str:
    """The fix OpenWrt users post for fw4's first-block SNAT: a numgen map over every block."""
    entries = ", ".join(f"{i} : {p.ipv4} . {lo}-{hi}" for i, (lo, hi) in enumerate(p.port_ranges))
    return ("table ip mape {\n\tchain srcnat {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f'\t\toifname "r1" meta l4proto {{ tcp, udp }} snat ip to numgen inc mod {len(p.port_ranges)} '
            f"map {{ {entries} }}\n\t}}\n}}\n")  # fmt: skip


def masquerade_table() -> str:
    return "*nat\n-A POSTROUTING -o r1 -j MASQUERADE\nCOMMIT\n"


def first_block_table(p) -> str:
    lo, hi = p.port_ranges[0]
    rules = "".join(f"-A POSTROUTING -o r1 -p {proto} -j SNAT --to-source {p.ipv4}:{lo}-{hi}\n"
                    for proto in ("tcp", "udp", "icmp"))  # fmt: skip
    return f"*nat\n{rules}COMMIT\n"


def in_parallel(ns: str, k: int, fn, *args) -> list:
    """fn(*args) in k forked processes at once inside `ns`; their results, concatenated."""
    children = []
    for _ in range(k):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                setns(ns)
                result = fn(*args)
            except BaseException as e:
                result, code = [f"error: {e}"], 1
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    out = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            out += pickle.load(f)
        os.waitpid(pid, 0)
    return out


def rates(topo: Topology, tables: dict[str, tuple[str, object]], per_client: int = 300, rounds: int = 3,
          flow=traffic.tcp_sequential, proto: str = "tcp") -> dict:  # fmt: skip
    """New TCP connections (or UDP flows) per second for each NAT, from one client process per
    CPU, rounds interleaved so that load from elsewhere on the machine hits all alike; the median
    of the rounds. `tables` maps a name to (the NAT, a check of each (source, port) the server saw)."""
    clients = os.cpu_count() or 2
    out: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(rounds):
        for name, (table, natted) in tables.items():
            topo.nat(table)
            sh(topo.router, "conntrack", "-F", check=False)
            mark = len(topo.served_since(0))
            t0 = time.perf_counter()
            answers = in_parallel(topo.client, clients, flow, "198.51.100.2", per_client)
            dt = time.perf_counter() - t0
            assert all(not a.startswith("error") for a in answers), (name, [a for a in answers if "error" in a][:3])
            seen = [(e["src"], e["sport"]) for e in topo.served_since(mark) if e["proto"] == proto]
            assert len(seen) == len(answers) and all(natted(*s) for s in seen), f"{name}: not NATed as expected"
            out[name].append(len(answers) / dt)
    return {name: statistics.median(v) for name, v in out.items()}


def capacity(topo: Topology, p, tries: int) -> tuple[int, dict]:
    answers = call(topo.client, traffic.tcp_concurrent, "198.51.100.2", tries, 80, 8)
    ok = [int(a.split()[1]) for a in answers if not a.startswith("error")]
    blocks = Counter(next(i for i, (lo, hi) in enumerate(p.port_ranges) if lo <= port <= hi) for port in ok)
    sh(topo.router, "conntrack", "-F", check=False)
    return len(ok), {"blocks_used": len(blocks), "min_per_block": min(blocks.values(), default=0),
                     "max_per_block": max(blocks.values(), default=0)}  # fmt: skip


def udp_sockets(topo: Topology, p, n: int) -> dict:
    """n LAN sockets to one server port at once: how many got through at the first datagram, at
    the second, not at all; and whether every port the server saw is in the set."""
    answers = call(topo.client, traffic.udp_concurrent, "198.51.100.2", n, timeout=600)
    sh(topo.router, "conntrack", "-F", check=False)
    ports = [int(a.split()[-1]) for a in answers if not a.startswith("error")]
    assert all(any(lo <= q <= hi for lo, hi in p.port_ranges) for q in ports), "a UDP port outside the set"
    lost = sum(a.startswith("error") for a in answers)
    retry = sum(a.startswith("retry") for a in answers)
    return {"first": n - lost - retry, "retry": retry, "lost": lost}


def udp_rows(topo: Topology, ocn, in_set) -> list[dict]:
    """Issue 21: endpoint-independent UDP mapping against per-connection spreading, same run."""
    rows = []
    tables = {}
    for backend, make in (("iptables-nft", snat_table), ("nftables", native_table)):
        tables[f"{backend} eim"] = (make(ocn), in_set)
        tables[f"{backend} per-connection"] = (make(ocn, PER_CONNECTION), in_set)
    # 150 flows per client: every flow's entry lives 30 s, so a run holds them all at once, fewer
    # than one range's 16 ports per server port on average (the collisions are the next rows').
    r = rates(topo, tables, per_client=150, flow=traffic.udp_sequential, proto="udp")
    for backend in ("iptables-nft", "nftables"):
        ratio = r[f"{backend} eim"] / r[f"{backend} per-connection"]
        rows.append({"name": f"new UDP flows/s, {backend}, endpoint-independent mapping, {os.cpu_count()} parallel "
                     "clients", "where": WHERE, "value": r[f"{backend} eim"], "unit": "flows/s",
                     "baseline": r[f"{backend} per-connection"], "baseline_name": "per-connection mapping",
                     "ratio_to_baseline": ratio, "goal": goal_text(ratio, 0.95),
                     "checked": "every source address and port at the server"})  # fmt: skip
    for n in (100, 500, 1000):
        for backend, make in (("nftables", native_table), ("iptables-nft", snat_table)):
            topo.nat(make(ocn))
            eim = udp_sockets(topo, ocn, n)
            topo.nat(make(ocn, PER_CONNECTION))
            per = udp_sockets(topo, ocn, n)
            ratio = (eim["first"] + eim["retry"]) / max(1, per["first"] + per["retry"])
            rows.append({"name": f"UDP sockets to one server port at once: {n}, OCN (1008 ports), {backend}, "
                         "endpoint-independent", "where": WHERE, "value": eim["first"] + eim["retry"], "unit": "flows",
                         "baseline": per["first"] + per["retry"], "baseline_name": "per-connection mapping",
                         "ratio_to_baseline": ratio, "goal": goal_text(ratio, 0.95),
                         "collisions": n - eim["first"], "collision_rate": (n - eim["first"]) / n,
                         "through_at_retry": eim["retry"], "lost": eim["lost"],
                         "baseline_collisions": n - per["first"]})  # fmt: skip
    return rows


def goal_text(ratio: float, limit: float) -> str:
    return f">= {limit}: {'met' if ratio >= limit else 'MISSED'}"


def run() -> list[dict]:
    ocn, v6plus = params("2400:4050:1234:5600::1"), params("240b:10:1234:5600::1")
    rows = []
    with Topology() as topo:
        sh(topo.router, "ip", "addr", "add", f"{ocn.ipv4}/32", "dev", "r1")
        sh(topo.router, "ip", "addr", "add", f"{v6plus.ipv4}/32", "dev", "r1")
        sh(topo.server, "ip", "route", "add", f"{ocn.ipv4}/32", "via", "198.51.100.1")
        sh(topo.server, "ip", "route", "add", f"{v6plus.ipv4}/32", "via", "198.51.100.1")
        in_set = lambda src, port: src == str(ocn.ipv4) and any(lo <= port <= hi for lo, hi in ocn.port_ranges)  # noqa: E731
        r = rates(topo, {
            "masquerade": (masquerade_table(), lambda src, port: src == "198.51.100.1"),
            "iptables-nft": (snat_table(ocn), in_set),
            "nftables": (native_table(ocn), in_set),
        })  # fmt: skip
        for backend, what in (
            ("iptables-nft", "MAPE-* chains in every table, 252 SNAT rules, and the guard's table"),
            ("nftables", "our whole table, one numgen map rule"),
        ):
            rows.append({"name": f"new TCP connections/s, {backend} ({what}), {os.cpu_count()} parallel clients",
                         "where": WHERE, "value": r[backend], "unit": "conn/s", "baseline": r["masquerade"],
                         "baseline_name": "one MASQUERADE rule", "ratio_to_baseline": r[backend] / r["masquerade"],
                         "checked": "every source address and port at the server",
                         "bound_by": "the Python client and server processes, not the NAT"})  # fmt: skip
        rows += udp_rows(topo, ocn, in_set)
        for name, p in (("OCN", ocn), ("v6plus", v6plus)):
            topo.nat(first_block_table(p))
            n_fw4, _ = capacity(topo, p, 60)
            topo.nat(community_fix(p))
            n_fix, _ = capacity(topo, p, p.ports + 40)
            for backend, table in (("iptables-nft", snat_table(p)), ("nftables", native_table(p))):
                topo.nat(table)
                n, spread = capacity(topo, p, p.ports + 40)
                rows.append({"name": f"concurrent connections to one server port, {name}, {backend}", "where": WHERE,
                             "value": n, "unit": "conn", "set_size": p.ports, "share_of_set": n / p.ports, **spread,
                             "baseline": n_fw4, "baseline_name": "first block only (OpenWrt fw4)",
                             "ratio_to_baseline": n / max(1, n_fw4), "community_fix": n_fix})  # fmt: skip
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
