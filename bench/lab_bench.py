"""Control-plane benchmarks that need ip6tnl: run inside the lab VM (TCG, so absolute times are
inflated many times over; the ratios to the baselines measured in the same run are what count).

Usage (inside the VM): python -m bench.lab_bench OUT.json
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mape_daemon.config import parse
from mape_daemon.kernel import LinuxKernel, make_iptables
from mape_daemon.kernel.netfilter_restore import restore_script
from mape_daemon.plan import FirewallChange, RpFilterChange
from mape_daemon.reconciler import Reconciler
from mape_daemon.record import RecordFile
from mape_daemon.state import State
from tests.hostns import inside
from tests.lab.netns import popen, sh
from tests.lab.topo import Lab, wait_for

WHERE = "lab VM (TCG)"
CONFIG = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.55/32"]\n'


def ip_commands(d: State) -> list[str]:
    """The desired netlink state as `ip` command lines (the blog recipes' commands, by hand)."""
    t = d.tunnel
    assert t is not None
    lines = [
        f"link add {t.name} type ip6tnl mode ipip6 local {t.local} remote {t.remote} dev {t.link} "
        f"encaplimit none hoplimit {t.hop_limit}",
        f"link set {t.name} mtu {t.mtu} up",
    ]
    for a in sorted(d.addresses):
        extra = " nodad noprefixroute" if a.family == 6 else ""
        lines.append(f"addr add {a.address}/{a.prefixlen} dev {a.ifname}{extra}")
    for r in sorted(d.routes):
        where = "unreachable " if r.kind == "unreachable" else ""
        dev = f" dev {r.dev}" if r.dev else ""
        lines.append(f"route add {where}{r.dst}{dev} table {r.table} metric {r.metric} proto 203")
    for r in sorted(d.rules):
        table = "main" if r.table == 254 else r.table
        sup = f" suppress_prefixlength {r.suppress_prefixlength}" if r.suppress_prefixlength >= 0 else ""
        lines.append(f"rule add fwmark {r.fwmark:#x}/{r.mask:#x} lookup {table}{sup} priority {r.priority} proto 203")
    return lines


def iptables_commands(restore: str) -> list[list[str]]:
    """One `iptables` invocation per line of a restore script (how the shell loops do it)."""
    out, table = [], ""
    for line in restore.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            out.append(["iptables", "-t", table, "-N", line[1:].split()[0]])
        elif line.startswith("-"):
            out.append(["iptables", "-t", table, *shlex.split(line)])
    return out


def run_quiet(argv: list[str], text: str | None = None) -> None:
    subprocess.run(argv, input=text, check=True, capture_output=True, text=True)


def converge_rows(lab: Lab) -> list[dict]:
    sh(lab.ce, "ip", "link", "add", "ppp0", "type", "dummy")  # the PPPoE routing needs a ppp0
    sh(lab.ce, "ip", "link", "set", "ppp0", "up")
    rows = []
    with inside(lab.ce):
        # The iptables-nft backend, against its floor (rows for the nftables backend: issue 12).
        r = Reconciler(parse(CONFIG), LinuxKernel(make_iptables("iptables-nft")), RecordFile(lab.dir / "state"))
        with r.kernel.session():
            computed = r.compute()
        desired, plan = computed.desired, computed.plan
        restore = "".join(restore_script(a) for a in plan.actions if isinstance(a, FirewallChange))
        sysctls = [f"net.ipv4.conf.{a.ifname}.rp_filter={a.value}" for a in plan.actions
                   if isinstance(a, RpFilterChange)]  # fmt: skip
        t = desired.tunnel

        def ours() -> None:
            assert r.sync().ok

        def adopt() -> None:
            """What a script makes by hand is ours to compare and remove afterwards."""
            r.record.tunnels, r.record.addresses = [t.name], [(t.link, t.local)]

        def floor() -> None:  # one ip -batch, one sysctl, one iptables-restore, one nft -f
            adopt()
            run_quiet(["ip", "-batch", "-"], "\n".join(ip_commands(desired)) + "\n")
            if sysctls:
                run_quiet(["sysctl", "-qw", *sysctls])
            run_quiet(["iptables-restore", "--noflush", "-w"], restore)
            run_quiet(["nft", "-f", "-"], desired.nft)

        def per_command() -> None:  # one command per object and per rule
            adopt()
            for line in ip_commands(desired):
                run_quiet(["ip", *shlex.split(line)])
            for s in sysctls:
                run_quiet(["sysctl", "-qw", s])
            for argv in iptables_commands(restore):
                run_quiet(argv)
            run_quiet(["nft", "-f", "-"], desired.nft)

        times: dict[str, list[float]] = {"ours": [], "floor": [], "per_command": []}
        for _ in range(3):
            for name, fn in (("ours", ours), ("floor", floor), ("per_command", per_command)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                with r.kernel.session():
                    assert not r.compute().plan, f"{name} did not reach the daemon's state"
                assert r.sync(teardown=True).ok
        med = {k: statistics.median(v) for k, v in times.items()}
        nat_rules = sum(len(c.rules) for c in desired.chains if c.name.startswith("MAPE-SNAT-"))
        rows.append({"name": f"converge from nothing (tunnel, routes, {nat_rules} SNAT rules, MSS, PPPoE)",
                     "where": WHERE, "value": med["ours"], "unit": "s",
                     "baseline": med["floor"], "baseline_name": "one ip -batch + iptables-restore + nft -f (floor)",
                     "ratio_to_baseline": med["ours"] / med["floor"],
                     "per_command_s": med["per_command"],
                     "per_command_ratio": med["per_command"] / med["ours"]})  # fmt: skip

        assert r.sync().ok
        cpu, writes = [], []
        for _ in range(5):
            c0, t0 = os.times(), time.process_time()
            result = r.sync()
            c1 = os.times()
            cpu.append(time.process_time() - t0 + (c1.children_user - c0.children_user)
                       + (c1.children_system - c0.children_system))  # fmt: skip
            writes.append(result.writes)
        full = len(ip_commands(desired)) + len(sysctls) + len(iptables_commands(restore)) + 1
        rows.append({"name": "no-op sync: kernel writes", "where": WHERE, "value": max(writes), "unit": "writes",
                     "cpu_s": statistics.median(cpu), "baseline": full,
                     "baseline_name": "a blind re-apply, the scripts' only way",
                     "ratio_to_baseline": max(writes) / full})  # fmt: skip
        assert r.sync(teardown=True).ok
    sh(lab.ce, "ip", "link", "del", "ppp0")
    return rows


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def daemon_rows(lab: Lab, tmp: Path, n: int = 20) -> list[dict]:
    cfg = tmp / "mape.toml"
    cfg.write_text('[wan]\ninterface = "wan0"\n')
    log = tmp / "daemon.log"
    env = {**os.environ, "MAPE_STATE_DIR": str(tmp / "run")}
    with open(log, "wb") as f:
        proc = popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg), stdout=f,
                     stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        tunnel = lambda: sh(lab.ce, "ip", "-d", "link", "show", "ip6tnl1", check=False)  # noqa: E731
        wait_for(lambda: lab.ce_params().ce_draft03 in tunnel(), 120, "the first sync", every=0.05)
        latencies = []
        for i in range(1, n + 1):
            lab.renumber(f"2400:4050:12{i:02x}:5600::/64")
            prefix = f"2400:4050:12{i:02x}:5600:"
            t0 = wait_for(lambda p=prefix: any(a["address"].startswith(p) for a in lab.wan_addresses())
                          and time.perf_counter(), 60, "the new address", every=0.02)  # fmt: skip
            ce = lab.ce_params()
            t1 = wait_for(lambda c=ce: c.ce_draft03 in tunnel() and time.perf_counter(), 60, "re-convergence",
                          every=0.02)  # fmt: skip
            latencies.append(t1 - t0)
        own = [float(m) for m in re.findall(r"; \d+ change\(s\), \d+ write\(s\) in (\d+) ms", log.read_text())][1:]
        own = [ms / 1000 for ms in own]
        # Idle: one minute without events (one periodic sync falls into it).
        stat = Path(f"/proc/{proc.pid}/stat")
        ticks = lambda: sum(int(x) for x in stat.read_text().rsplit(")", 1)[1].split()[11:13])  # noqa: E731
        c0, t0 = ticks(), time.monotonic()
        time.sleep(60)
        cpu = (ticks() - c0) / os.sysconf("SC_CLK_TCK")
        hours = (time.monotonic() - t0) / 3600
        rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text()).group(1)) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return [
        {"name": f"renumbering: new address seen to converged ({n} renumberings)", "where": WHERE,
         "value": statistics.median(latencies), "p95": percentile(latencies, 0.95), "unit": "s",
         "daemon_share_median": statistics.median(own) if own else None,
         "daemon_share_p95": percentile(own, 0.95) if own else None},
        {"name": "idle mape-daemon run: CPU per hour (RAs every 3-4 s)", "where": WHERE, "value": cpu / hours,
         "unit": "s/h", "rss_mib": rss},
    ]  # fmt: skip


def main() -> int:
    out = Path(sys.argv[1])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.up()
            print("bench: converge from nothing, floor and per-command baselines, no-op sync", flush=True)
            rows += converge_rows(lab)
            print("bench: 20 renumberings with the daemon, then a minute idle", flush=True)
            rows += daemon_rows(lab, Path(tmp))
        finally:
            lab.down()
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
