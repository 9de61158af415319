"""Control-plane benchmarks that need ip6tnl: run inside the lab VM (TCG, so absolute times are
inflated many times over; the ratios to the baselines measured in the same run are what count).

Usage (inside the VM): python -m bench.lab_bench OUT.json
"""

from __future__ import annotations

import fcntl
import json
import re
import resource
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

from mape_daemon.actions import Action, FirewallChange, NetAction, NftChange, RpFilterChange
from mape_daemon.config import parse
from mape_daemon.kernel import make_kernel
from mape_daemon.kernel.netfilter_restore import restore_script
from mape_daemon.kernel.nftables import FAMILY, TABLE, digest, libnftables
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.state import Address, EgressGuard, Route, RoutingRule, Tunnel
from tests.hostns import inside
from tests.lab.daemon import Daemon
from tests.lab.netns import popen, sh
from tests.lab.topo import SERVER, Lab, wait_for

WHERE = "lab VM (TCG)"
CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.55/32"]\n'
BACKENDS = ("iptables-nft", "nftables")
GOAL_CONVERGE, GOAL_NOOP = 1.5, 0.1  # issue 12: x the floor, x the blind re-apply's CPU
GOAL_RSS_MIB = 40
# Issue 19: a host busy with others' routes and rules must cost us little. A route table of
# another program is filtered out by the kernel, so a no-op sync beside 100,000 of its routes may
# cost at most 10 % more than without them; a commit of another program to its own nf_tables
# table is decoded and dropped, at most a tenth of the no-op sync it used to set off.
GOAL_FOREIGN_ROUTES, GOAL_FOREIGN_COMMIT = 1.1, 0.1
GOAL_GUARD_THROUGHPUT = 0.98  # the egress guard: at least 98 % of the tunnel's throughput without it
GOAL_SCRAPE = 0.25  # issue 22: a scrape of /metrics costs at most a quarter of a no-op sync
METRICS = "127.0.0.1:9849"


def cpu() -> float:
    """CPU seconds of this process and of the children it waited for: the scheduler's own count
    (what schedstat sums, nanoseconds), not clock ticks, so the idle row and the no-op row that
    is its baseline read one clock."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


_started = [0]  # child processes this process has started


def _count_children() -> None:
    """Every fork of ours goes through subprocess.Popen (iptables-restore/-save, tc, conntrack):
    counted here, so a row's fork count is this process's own, not the machine's."""
    start = subprocess.Popen.__init__

    def counting(self, *args, **kw):
        _started[0] += 1
        start(self, *args, **kw)

    subprocess.Popen.__init__ = counting  # type: ignore[method-assign]


def forks() -> int:
    return _started[0]


def measured(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


def ip_lines(action: NetAction) -> list[str]:
    """One plan action as `ip -batch` lines (what the blog recipes type by hand)."""
    obj, op = action.obj, action.op
    if isinstance(obj, Tunnel):
        if op == "del":
            return [f"link del {obj.name}"]
        up = [f"link set {obj.name} mtu {obj.mtu} up"]
        if op == "set":
            return up
        return [f"link add {obj.name} type ip6tnl mode ipip6 local {obj.local} remote {obj.remote} dev {obj.link} "
                f"encaplimit none hoplimit {obj.hop_limit}", *up]  # fmt: skip
    if isinstance(obj, Address):
        extra = " nodad noprefixroute" if obj.family == 6 and op == "add" else ""
        return [f"addr {op} {obj.address}/{obj.prefixlen} dev {obj.ifname}{extra}"]
    if isinstance(obj, Route):
        where = "unreachable " if obj.kind == "unreachable" else ""
        dev = f" dev {obj.dev}" if obj.dev and obj.kind != "unreachable" else ""
        return [f"route {op} {where}{obj.dst}{dev} table {obj.table} metric {obj.metric} proto 203"]
    assert isinstance(obj, RoutingRule), obj
    table = "main" if obj.table == 254 else obj.table
    sup = f" suppress_prefixlength {obj.suppress_prefixlength}" if obj.suppress_prefixlength >= 0 else ""
    return [f"rule {op} fwmark {obj.fwmark:#x}/{obj.mask:#x} lookup {table}{sup} priority {obj.priority} proto 203"]


@dataclass
class Floor:
    """The same changes as a plan, applied the cheapest way a script can: one `ip -batch`, one
    `sysctl`, one `iptables-restore` per table, one `nft -f` (the same atomic batch we send)."""

    ip: list[str] = field(default_factory=list)
    tc: list[str] = field(default_factory=list)
    sysctls: list[str] = field(default_factory=list)
    restores: list[str] = field(default_factory=list)
    nft: str | None = None

    @classmethod
    def of(cls, actions: tuple[Action, ...]) -> Floor:
        f = cls()
        for a in actions:
            if isinstance(a, NetAction) and isinstance(a.obj, EgressGuard):
                dev, program = a.obj.ifname, a.obj.program
                f.tc += [f"qdisc add dev {dev} clsact",
                         f'filter replace dev {dev} egress pref 1 handle 1 bpf da bytecode "{program}"']  # fmt: skip
            elif isinstance(a, NetAction):
                f.ip += ip_lines(a)
            elif isinstance(a, RpFilterChange):
                f.sysctls.append(f"net.ipv4.conf.{a.ifname}.rp_filter={a.value}")
            elif isinstance(a, FirewallChange):
                f.restores.append(restore_script(a))
            elif isinstance(a, NftChange):
                f.nft = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + (a.script or "")
        return f

    def apply(self) -> None:
        run = lambda argv, text=None: subprocess.run(argv, input=text, check=True, capture_output=True, text=True)  # noqa: E731
        if self.ip:
            run(["ip", "-batch", "-"], "\n".join(self.ip) + "\n")
        if self.tc:
            run(["tc", "-batch", "-"], "\n".join(self.tc) + "\n")
        if self.sysctls:
            run(["sysctl", "-qw", *self.sysctls])
        for text in self.restores:
            run(["iptables-restore", "--noflush", "-w"], text)
        if self.nft is not None:
            run(["nft", "-f", "-"], self.nft)

    def per_command(self) -> None:
        """One command per object and per rule (the firewall-cmd loops)."""
        for line in self.ip:
            subprocess.run(["ip", *shlex.split(line)], check=True, capture_output=True)
        for line in self.tc:
            subprocess.run(["tc", *shlex.split(line)], check=True, capture_output=True)
        for s in self.sysctls:
            subprocess.run(["sysctl", "-qw", s], check=True, capture_output=True)
        for text in self.restores:
            table = ""
            for line in text.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith(":"):
                    subprocess.run(["iptables", "-t", table, "-N", line[1:].split()[0]], check=True)
                elif line.startswith("-"):
                    subprocess.run(["iptables", "-t", table, *shlex.split(line)], check=True, capture_output=True)
        if self.nft is not None:
            subprocess.run(["nft", "-f", "-"], input=self.nft, check=True, capture_output=True, text=True)

    @property
    def commands(self) -> int:
        return (
            len(self.ip)
            + len(self.tc)
            + len(self.sysctls)
            + sum(t.count("\n-") + t.count("\n:") for t in self.restores)
            + 1
        )


def adopt(r: Reconciler, actions: tuple[Action, ...]) -> None:
    """What a script makes by hand is ours to compare and to remove afterwards."""
    for a in actions:
        if isinstance(a, NetAction) and a.op == "add" and isinstance(a.obj, Tunnel):
            r.record.tunnels = sorted({*r.record.tunnels, a.obj.name})
        elif isinstance(a, NetAction) and a.op == "add" and isinstance(a.obj, Address) and a.obj.family == 6:
            r.record.addresses = sorted({*r.record.addresses, (a.obj.ifname, a.obj.address)})


def learn(r: Reconciler, actions: tuple[Action, ...]) -> None:
    """nft lists a table in its own form; the daemon learns it when it writes one, and must learn
    it too for a table the floor wrote (untimed)."""
    for a in actions:
        if isinstance(a, NftChange) and a.script:
            r.kernel.nft.canonical[digest(a.script)] = r.kernel.nft.observe() or ""


def settled(r: Reconciler) -> bool:
    """Nothing but bookkeeping left (a conntrack cleanup, which a script does not do)."""
    with r.kernel.session():
        left = [a for a in r.compute().plan.actions
                if isinstance(a, (NetAction, RpFilterChange, FirewallChange, NftChange))]  # fmt: skip
    if left:
        print("bench: still to do:", *left, sep="\n  ", flush=True)
    return not left


def row(name: str, value: float, unit: str, baseline: float | None = None, baseline_name: str = "", **notes) -> dict:
    out = {"name": name, "where": WHERE, "value": value, "unit": unit, **notes}
    if baseline is not None:
        out |= {"baseline": baseline, "baseline_name": baseline_name, "ratio_to_baseline": value / baseline}
    return out


def goal(ratio: float, limit: float, why_missed: str = "") -> str:
    return f"met (<= {limit:g})" if ratio <= limit else f"missed by {ratio / limit:.2f}x (<= {limit:g}): {why_missed}"


def converge_rows(lab: Lab, backend: str, rounds: int = 3) -> tuple[list[dict], float]:
    """Converge from nothing and a no-op sync, against the floor; returns the rows and the median
    CPU of one no-op sync."""
    r = Reconciler(parse(CONFIG), make_kernel(backend), RecordFile(lab.dir / f"state-{backend}"))
    with r.kernel.session():
        plan = r.compute().plan
    floor = Floor.of(plan.actions)

    def by(fn):
        def run() -> None:
            adopt(r, plan.actions)
            fn()

        return run

    ways = {"ours": lambda: r.sync(), "floor": by(floor.apply)}
    if backend != "nftables":
        ways["per_command"] = by(floor.per_command)
    times: dict[str, list[float]] = {k: [] for k in ways}
    floor_cpu = []
    for _ in range(rounds):
        for name, fn in ways.items():
            wall, used = measured(fn)
            times[name].append(wall)
            if name == "floor":
                floor_cpu.append(used)
            learn(r, plan.actions)
            assert settled(r), f"{name} did not reach the daemon's state"
            assert r.sync(teardown=True).ok
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["floor"]
    what = f"{sum(isinstance(a, NetAction) for a in plan.actions)} netlink objects, " + (
        "our whole nftables table" if backend == "nftables" else f"{floor.commands} commands' worth of chains"
    )
    rows = [row(f"converge from nothing, {backend} ({what})", med["ours"], "s", med["floor"],
                "one ip -batch + sysctl + " + ("nft -f (floor)" if backend == "nftables"
                                               else "iptables-restore per table + nft -f (floor)"),
                goal=goal(ratio, GOAL_CONVERGE, "each netlink object is one request, and the floor batches them"),
                **({"per_command_s": med["per_command"]} if "per_command" in med else {}))]  # fmt: skip

    assert r.sync().ok
    # The sync right after one that wrote: our commits moved the nf_tables generation, and the
    # reading kept up with them (kernel._own_commit); counted apart, it should fork nothing either.
    first = forks()
    assert r.sync().ok and not r.sync().plan
    first = forks() - first
    writes, forked = r.kernel.writes, forks()
    noop_cpu = noop_cpu_of(r)
    writes, forked = r.kernel.writes - writes, forks() - forked  # counted, over the no-op syncs measured
    assert writes == 0 and forked == 0, f"a no-op sync wrote {writes} times and started {forked} processes"
    blind = statistics.median(floor_cpu)
    rows.append(row(f"no-op sync, {backend}: CPU", noop_cpu, "s", blind, "a blind re-apply (the floor's CPU)",
                    writes=writes, forks=forked, forks_in_the_first_after_a_write=first,
                    goal=goal(noop_cpu / blind, GOAL_NOOP,
                                                 "a no-op still reads the kernel and computes what it wants, in "
                                                 "Python; the blind re-apply is as cheap as one ip -batch + one nft "
                                                 "-f")))  # fmt: skip
    assert r.sync(teardown=True).ok
    return rows, noop_cpu


def noop_cpu_of(r: Reconciler, n: int = 5) -> float:
    """The median CPU of `n` no-op syncs (each asserted to be one)."""
    used = []
    for _ in range(n):
        result = None

        def once() -> None:
            nonlocal result
            result = r.sync()

        used.append(measured(once)[1])
        assert result is not None and result.ok and not result.plan and result.writes == 0
    return statistics.median(used)


def foreign_routes_rows(lab: Lab, routes: int = 100_000) -> list[dict]:
    """A no-op sync (nftables) beside another program's large routing table (a BGP feed in table
    100), against the same sync without it, in the same run."""
    r = Reconciler(parse(CONFIG), make_kernel("nftables"), RecordFile(lab.dir / "state-busy"))
    assert r.sync().ok and r.sync().ok
    without = noop_cpu_of(r)
    batch = "".join(f"route add 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32 dev lan0 table 100 proto bird\n"
                    for i in range(routes))  # fmt: skip
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    try:
        beside = noop_cpu_of(r)
    finally:
        subprocess.run(["ip", "route", "flush", "table", "100"], check=True)
        assert r.sync(teardown=True).ok
    ratio = beside / without
    return [row(f"no-op sync, nftables, beside {routes:,} routes of another program (table 100): CPU", beside, "s",
                without, "the same no-op sync without them",
                goal=f"met (<= {GOAL_FOREIGN_ROUTES:g})" if ratio <= GOAL_FOREIGN_ROUTES else
                f"missed by {ratio / GOAL_FOREIGN_ROUTES:.2f}x (<= {GOAL_FOREIGN_ROUTES:g})",
                why="the kernel filters route dumps by table and protocol (strict checking)")]  # fmt: skip


def renumber_rows(lab: Lab, rounds: int = 6) -> list[dict]:
    """The daemon's share of a renumbering against the floor for changes of the same size. Rounds
    alternate (ours, floor), each to a fresh prefix under the same rule."""
    r = Reconciler(parse(CONFIG), make_kernel("nftables"), RecordFile(lab.dir / "state-renumber"))
    assert r.sync().ok
    ours, floor, sizes = [], [], set()
    for i in range(2 * rounds):
        new = f"2400:4050:13{i:02x}:5600::/64"
        lab.renumber(new)
        prefix = new.split("::")[0] + ":"
        wait_for(lambda p=prefix: any(a["address"].startswith(p) for a in lab.wan_addresses()), 60, "the address")
        with r.kernel.session():
            plan = r.compute().plan
        changes = tuple(a for a in plan.actions if not type(a).__name__.startswith("Conntrack"))
        sizes.add(len(changes))
        if i % 2 == 0:
            wall, _ = measured(lambda: r.sync())
            ours.append(wall)
        else:
            adopt(r, changes)
            wall, _ = measured(Floor.of(changes).apply)
            floor.append(wall)
            learn(r, changes)
            assert settled(r), "the floor did not reach the daemon's state"
            assert r.sync().ok  # the record learns the new mapping
    assert r.sync(teardown=True).ok
    med_ours, med_floor = statistics.median(ours), statistics.median(floor)
    return [row(f"renumbering: the sync itself ({rounds} each, {'/'.join(map(str, sorted(sizes)))} changes)",
                med_ours, "s", med_floor, "the same changes by ip -batch + nft -f (floor)",
                p95=percentile(ours, 0.95),
                goal=goal(med_ours / med_floor, GOAL_CONVERGE, "a netlink request per object"))]  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


ETH_P_ALL, SO_TIMESTAMPNS = 0x0003, 35


class Capture:
    """Packets on the router's WAN with the kernel's timestamps: when an RA arrived, and when the
    first packet from a given source left (a tcpdump, in Python)."""

    def __init__(self, ns: str, ifname: str):
        with inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.packets: list[tuple[float, bytes]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping:
            try:
                data, anc, _, _ = self.sock.recvmsg(2048, 64)
            except TimeoutError:
                continue
            stamp = next((struct.unpack("=qq", d[:16]) for lvl, kind, d in anc if kind == SO_TIMESTAMPNS), None)
            if stamp and len(data) > 54 and data[12:14] == b"\x86\xdd":
                self.packets.append((stamp[0] + stamp[1] / 1e9, data[14:]))

    def ra_with(self, prefix: IPv6Network, after: float) -> float | None:
        """When the first RA announcing `prefix` arrived."""
        want = prefix.network_address.packed[:8]
        return next((t for t, p in list(self.packets) if t >= after and p[6] == 58 and p[40] == 134
                     and want in p[40:]), None)  # fmt: skip

    def first_from(self, prefix: IPv6Network, proto: int, after: float) -> float | None:
        """When the first packet from an address in `prefix`, carrying `proto`, left."""
        return next((t for t, p in list(self.packets) if t >= after and p[6] == proto
                     and IPv6Address(p[8:24]) in prefix), None)  # fmt: skip

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


def daemon_rows(lab: Lab, tmp: Path, noop_cpu: float, n: int = 12) -> list[dict]:
    """`mape-daemon run` as installed (auto: nftables here) with a LAN host pinging the internet:
    renumberings from RA to the first packet of the new mapping, repairs, an idle hour, RSS."""
    d = Daemon(lab, tmp, f'[wan]\ninterface = "wan0"\n[metrics]\nlisten = "{METRICS}"\n').start()
    sender = ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              f"while True:\n    s.sendto(b'x', ('{SERVER}', 9))\n    time.sleep(0.02)\n")  # fmt: skip
    ping = popen(lab.lan, sys.executable, "-c", sender)  # a LAN host's steady flow (50 packets/s)
    cap = Capture(lab.ce, "wan0")
    try:
        wait_for(d.synced_by_me, 180, "the first sync", every=0.05)
        rows = guard_rows(lab) + foreign_commit_rows(lab, d, noop_cpu) + scrape_rows(lab, d, noop_cpu)
        total, share = [], []
        for i in range(1, n + 1):
            new = IPv6Network(f"2400:4050:14{i:02x}:5600::/64")
            start = time.time()
            lab.renumber(str(new))
            ipv4 = lab.ce_params(str(new)).ipv4
            wait_for(lambda v=ipv4: d.state().get("ipv4") == v, 60, "the new mapping", every=0.05)
            ra = wait_for(lambda p=new, s=start: cap.ra_with(p, s), 30, "the RA in the capture", every=0.05)
            first = wait_for(lambda p=new, s=ra: cap.first_from(p, 4, s), 30, "a packet of the new mapping",
                             every=0.05)  # fmt: skip
            total.append(first - ra)
            share.append(d.state()["last_change_seconds"])
        rows += [row(f"renumbering: RA received to first packet of the new mapping out of the tunnel ({n})",
                    statistics.median(total), "s", p95=percentile(total, 0.95),
                    daemon_share_median=statistics.median(share), daemon_share_p95=percentile(share, 0.95),
                    includes="SLAAC (the kernel's address), the 0.5 s coalescing of events, the sync")]  # fmt: skip
        rows += repair_rows(lab, d)
        lab.prefixes, lab.lifetimes = lab.prefixes[-1:], {}  # as an ISP does: one prefix in every RA
        (lab.dir / "radvd.conf").write_text(lab._radvd_conf())
        lab.procs["radvd"].send_signal(signal.SIGHUP)
        rows += idle_rows(d, noop_cpu)
    finally:
        cap.close()
        ping.kill()
        ping.wait()
        d.stop()
    return rows


def tunnel_back() -> bool:
    """The tunnel up with its IPv4 address and the default route through it: IPv4 works again."""
    routes = Path("/proc/thread-self/net/route").read_text().splitlines()[1:]
    default = any(r.split()[0] == "ip6tnl1" and r.split()[1] == "00000000" for r in routes)
    return default and is_up("ip6tnl1") and has_ipv4("ip6tnl1")


def has_ipv4(ifname: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, 0x8915, struct.pack("256s", ifname.encode()))  # SIOCGIFADDR
        except OSError:
            return False
    return True


def is_up(ifname: str) -> bool:
    """SIOCGIFFLAGS in this thread's namespace: polling without a fork per look."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            ifr = fcntl.ioctl(s, 0x8913, struct.pack("256s", ifname.encode()))
        except OSError:
            return False
    return bool(struct.unpack_from("H", ifr, 16)[0] & 1)


def repair_rows(lab: Lab, d: Daemon, n: int = 5) -> list[dict]:
    """Another program breaks our state; how long until the daemon has put it back."""
    nft = lambda cmd: libnftables().run(cmd)  # noqa: E731
    has_snat = lambda: "snat ip to" in nft(f"list chain {FAMILY} {TABLE} nat-out")[1]  # noqa: E731
    breaks = {
        "tunnel deleted (ip link del), until up with its address and default route": (
            lambda: sh(lab.ce, "ip", "link", "del", "ip6tnl1"),
            tunnel_back,
        ),
        "our SNAT flushed (nft flush chain)": (lambda: nft(f"flush chain {FAMILY} {TABLE} nat-out"), has_snat),
    }
    rows = []
    with inside(lab.ce):
        for name, (breaking, repaired) in breaks.items():
            times = []
            for _ in range(n):
                wait_for(repaired, 30, "our state")
                time.sleep(1)  # past the coalescing window of the last repair's own echo
                t0 = time.perf_counter()
                breaking()
                done = wait_for(lambda r=repaired: r() and time.perf_counter(), 30, "the repair", every=0.01)
                times.append(done - t0)
            rows.append(row(f"repair: {name}, event to repaired ({n})", statistics.median(times), "s",
                            max=max(times), backend="nftables"))  # fmt: skip
    return rows


def firewalld_rows(lab: Lab, tmp: Path, n: int = 3) -> list[dict]:
    """firewalld (iptables backend) flushes the iptables tables on reload: with our iptables-nft
    backend that is our SNAT chains; with the nftables backend it is nothing of ours."""
    from tests.lab.firewalld import Firewalld

    fw = Firewalld(lab.ce, tmp, backend="iptables").start()
    rows = []
    try:
        for backend in BACKENDS:
            work = tmp / f"fw-{backend}"
            work.mkdir()
            d = Daemon(lab, work, f'[wan]\ninterface = "wan0"\n[firewall]\nbackend = "{backend}"\n', fw.env).start()
            try:
                wait_for(d.synced_by_me, 180, "the first sync")
                nat = ["nft", "list", "table", "ip", "mape"]
                look = ["iptables-nft-save", "-t", "nat"] if backend != "nftables" else nat
                mark = "MAPE-SNAT-TCP" if backend != "nftables" else "snat ip to"
                ours = lambda look=look, mark=mark: mark in sh(lab.ce, *look)  # noqa: E731
                times, took = [], []
                repairs = lambda d=d: sum(d.state().get("repairs", {}).values())  # noqa: E731
                before = repairs()
                for _ in range(n):
                    wait_for(ours, 60, "our SNAT")
                    time.sleep(1)
                    t0 = time.monotonic()
                    done = fw.reload()
                    back = wait_for(lambda o=ours: o() and time.monotonic(), 60, "the repair", every=0.05)
                    times.append(back - t0)
                    took.append(done - t0)
                    time.sleep(1)
                rows.append(row(f"repair: firewalld reload, {backend}: reload asked to our SNAT in place ({n})",
                                statistics.median(times), "s", firewalld_reload_s=statistics.median(took),
                                syncs_that_repaired=repairs() - before,
                                why="firewalld flushes the iptables tables" if backend != "nftables"
                                else "nothing to repair: firewalld leaves table ip mape alone"))  # fmt: skip
            finally:
                d.stop()
    finally:
        fw.close()
    return rows


def daemon_cpu_ns(d: Daemon) -> int:
    """The daemon's CPU, from the scheduler's own count (schedstat, nanoseconds, every thread)."""
    return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{d.proc.pid}/task").iterdir())


COMMITTER = """import sys, time
from mape_daemon.kernel.nftables import libnftables
nft = libnftables()
nft.run("add table inet f2b; add chain inet f2b input { type filter hook input priority 10; }")
for i in range(int(sys.argv[1])):
    nft.run(f"add rule inet f2b input ip saddr 198.18.{i // 250}.{i % 250 + 1} counter drop")
    time.sleep(0.1)
nft.run("delete table inet f2b")
"""


def foreign_commit_rows(lab: Lab, d: Daemon, noop_cpu: float, commits: int = 300) -> list[dict]:
    """Another program (fail2ban's shape) committing to its own table 10 times a second: the
    daemon's CPU per commit, against the no-op sync each commit used to set off."""
    time.sleep(3)  # the first sync's echo
    c0 = daemon_cpu_ns(d)
    proc = popen(lab.ce, sys.executable, "-c", COMMITTER, str(commits))
    assert proc.wait(600) == 0
    per_commit = (daemon_cpu_ns(d) - c0) / 1e9 / (commits + 3)
    return [row(f"busy host: daemon CPU per nf_tables commit of another program to its own table ({commits} at 10/s)",
                per_commit, "s", noop_cpu, "one no-op sync (nftables): what each commit set off before",
                goal=goal(per_commit / noop_cpu, GOAL_FOREIGN_COMMIT, "decoding the commit's messages"),
                repairs=d.state().get("repairs"))]  # fmt: skip


SCRAPER = """import sys, urllib.request
for _ in range(int(sys.argv[2])):
    urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=10).read()
"""


def scrape_rows(lab: Lab, d: Daemon, noop_cpu: float, scrapes: int = 200) -> list[dict]:
    """The daemon's CPU per scrape of /metrics (one Prometheus every 0 s: back to back)."""
    time.sleep(1)
    c0 = daemon_cpu_ns(d)
    assert popen(lab.ce, sys.executable, "-c", SCRAPER, METRICS, str(scrapes)).wait(600) == 0
    per_scrape = (daemon_cpu_ns(d) - c0) / 1e9 / scrapes
    return [row(f"a scrape of /metrics: daemon CPU ({scrapes} back to back)", per_scrape, "s", noop_cpu,
                "one no-op sync (nftables)", goal=goal(per_scrape / noop_cpu, GOAL_SCRAPE,
                                                        "prometheus_client's text exposition"))]  # fmt: skip


def iperf(lab: Lab, seconds: int = 4) -> float:
    out = subprocess.run(["ip", "netns", "exec", lab.lan, "iperf3", "-c", SERVER, "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6


def guard_rows(lab: Lab, rounds: int = 3) -> list[dict]:
    """TCP through the tunnel (iperf3 from the LAN to the internet host, through the strict BR)
    with the egress guard and without it, alternating, in the same run."""
    from mape_daemon.kernel import tc
    from mape_daemon.kernel.rtnl import Reader

    lab.br_add_ce(lab.ce_params())
    server = popen(lab.inet, "iperf3", "-s", "-B", SERVER)
    with inside(lab.ce):
        reader = Reader()
        guard = tc.observe(reader, "ip6tnl1", socket.if_nametoindex("ip6tnl1"))
        reader.close()
    assert guard is not None, "no egress guard on the tunnel"
    speeds: dict[str, list[float]] = {"with": [], "without": []}
    try:
        time.sleep(1)
        for _ in range(rounds):
            speeds["with"].append(iperf(lab))
            sh(lab.ce, "tc", "filter", "del", "dev", "ip6tnl1", "egress", "pref", "1")
            speeds["without"].append(iperf(lab))
            with inside(lab.ce):
                tc.put(guard)
    finally:
        server.kill()
        server.wait()
    w, wo = statistics.median(speeds["with"]), statistics.median(speeds["without"])
    return [row(f"tunnel throughput with the egress guard, TCP (iperf3, {rounds} x 4 s each way)", w, "Mbit/s", wo,
                "the same without the guard, alternating",
                goal=f"met (>= {GOAL_GUARD_THROUGHPUT:g})" if w / wo >= GOAL_GUARD_THROUGHPUT else
                f"missed: {w / wo:.3f} (>= {GOAL_GUARD_THROUGHPUT:g})",
                runs_with=speeds["with"], runs_without=speeds["without"])]  # fmt: skip


def vm_rss_floor() -> float:
    """The libraries the daemon cannot run without, imported and nothing else."""
    # pyroute2 as the daemon imports it: its light registration (kernel/_pyroute2.py) first, loaded
    # by path so that nothing else of ours comes with it.
    light = Path(__file__).resolve().parents[1] / "mape_daemon" / "kernel" / "_pyroute2.py"
    code = ("import importlib.util, pydantic, re\n"
            f"spec = importlib.util.spec_from_file_location('light', {str(light)!r})\n"
            "light = importlib.util.module_from_spec(spec); spec.loader.exec_module(light); light.register_light()\n"
            "from pyroute2.iproute.linux import IPRoute\n"
            "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")  # fmt: skip
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout) / 1024


RSS_STAGES = (  # what `mape-daemon run` imports, in the order it does, and what each step adds
    ("python", ""),
    ("pydantic", "import pydantic"),
    ("our config models (pydantic's schema machinery) and rule tables",
     "import mape_daemon.config, mape_daemon.maprules; mape_daemon.maprules.bundled()"),
    ("asyncio", "import asyncio"),
    ("pyroute2's IPRoute and conntrack, with ssl", "import mape_daemon.kernel"),
    ("the rest of mape-daemon (service, cli, jeepney, systemd)",
     "import mape_daemon.cli, mape_daemon.service, mape_daemon.kernel.firewalld, systemd.journal"),
)  # fmt: skip


def rss_breakdown() -> dict[str, float]:
    """MiB each import step adds, measured in one interpreter, in the daemon's order."""
    code = "import re\nrss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    for i, (_, stmt) in enumerate(RSS_STAGES):
        code += f"{stmt}\nprint({i}, rss())\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    kib = [int(v) for v in out[1::2]]
    return {name: round((kib[i] - (kib[i - 1] if i else 0)) / 1024, 1) for i, (name, _) in enumerate(RSS_STAGES)}


def idle_rows(d: Daemon, noop_cpu: float, seconds: float = 180) -> list[dict]:
    """CPU over a quiet spell (RAs every 3-4 s, nothing else), scaled to an hour; RSS at its end.
    CPU from the scheduler's own count (schedstat, nanoseconds, every thread): clock ticks are
    too coarse for a daemon this quiet."""

    def cpu_ns() -> int:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{d.proc.pid}/task").iterdir())

    time.sleep(5)  # the last repair's echo
    c0, t0 = cpu_ns(), time.monotonic()
    time.sleep(seconds)
    # The full sync (every 15 minutes on nftables) does not fall in the window: counted, four an hour.
    per_hour = (cpu_ns() - c0) / 1e9 * 3600 / (time.monotonic() - t0) + 4 * noop_cpu
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{d.proc.pid}/status").read_text()).group(1)) / 1024
    floor = vm_rss_floor()
    return [
        row("idle mape-daemon run: CPU per hour (RAs every 3-4 s; the 15-minute full sync added)", per_hour, "s/h",
            10 * noop_cpu,
            "10 no-op syncs (nftables)", goal=goal(per_hour / (10 * noop_cpu), 1.0, "wakeups for RAs")),
        row("RSS of mape-daemon run (after renumberings and repairs)", rss, "MiB", floor,
            "python + pydantic + pyroute2's IPRoute, imported, nothing else", imports_mib=rss_breakdown(),
            goal="met (<= 40 MiB)" if rss <= GOAL_RSS_MIB else
            f"missed by {rss - GOAL_RSS_MIB:.1f} MiB: the required libraries alone take {floor:.1f} MiB"),
    ]  # fmt: skip


def main() -> int:
    _count_children()
    out = Path(sys.argv[1])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.up()
            sh(lab.ce, "ip", "link", "add", "ppp0", "type", "dummy")  # the PPPoE routing needs a ppp0 that
            sh(lab.ce, "ip", "addr", "add", "100.64.0.2/32", "dev", "ppp0")  # can carry IPv4: up, an address
            sh(lab.ce, "ip", "link", "set", "ppp0", "up")
            noop = {}
            with inside(lab.ce):
                for backend in BACKENDS:
                    print(f"bench: converge from nothing and a no-op sync against the floor, {backend}", flush=True)
                    more, noop[backend] = converge_rows(lab, backend)
                    rows += more
                print("bench: renumberings, the sync against the floor for the same changes", flush=True)
                rows += renumber_rows(lab)
                print("bench: a no-op sync beside 100,000 routes of another program", flush=True)
                rows += foreign_routes_rows(lab)
            sh(lab.ce, "ip", "link", "del", "ppp0")
            print("bench: the daemon: renumberings RA to packet, repairs, two idle minutes", flush=True)
            rows += daemon_rows(lab, Path(tmp), noop["nftables"])
            print("bench: firewalld reloads under each backend", flush=True)
            rows += firewalld_rows(lab, Path(tmp))
        finally:
            lab.down()
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
