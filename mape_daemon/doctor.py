"""`mape-daemon doctor`: when IPv4 does not work, which known cause it is. Each check passes or
fails with its fix; a check whose precondition failed is not tried. Nothing is changed.

`gather` reads the facts (the kernel through the reconciler's read-only `compute`, sysctls, an
ICMPv6 echo to the BR from the CE address, a TCP connection through the tunnel with the tunnel's
packet counters around it, the daemon's state file); `checks` turns them into verdicts (pure).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import Config
from .mapcalc import MapParams
from .prefix import source_text
from .reconciler import Computed
from .runner import full_check_period
from .state import MAIN_TABLE
from .statefile import DaemonState

WATCHDOG_SLACK = 10.0  # seconds beyond 2 x sync_interval, as the watchdog counts
CONNECT_TRIES = 3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not tried, what it needs failed first
    says: str
    fix: str = ""


@dataclass
class Facts:
    config: Config
    computed: Computed | None
    read_error: str = ""  # the kernel could not be read
    sysctl: dict[str, str | None] = field(default_factory=dict)  # "ip_forward", "forwarding6", "accept_ra"
    wan_mtu: int | None = None
    tunnel_mtu: int | None = None
    echo_br: float | None = None  # seconds; None: no answer (or not tried)
    target: str = ""
    connect_error: str | None = None  # None: not tried; "": connected
    tunnel_delta: tuple[int, int] | None = None  # (tx, rx) packets during the connection
    state: DaemonState | None = None
    period: float = 900.0  # the daemon's full-sync period (runner.full_check_period)
    now: float = field(default_factory=time.time)
    managers: dict[str, Any] = field(default_factory=dict)
    rp_filter: dict[str, int] = field(default_factory=dict)  # "all" and the PPPoE interface, where they exist
    provisioning: tuple[str, str] | None = None  # HB46PP: (outcome, what happened) of one access; None: not asked


def checks(f: Facts) -> list[Check]:
    cfg, out = f.config, []
    wan = cfg.wan.interface
    out.append(_forwarding(f))
    if cfg.wan.prefix_from != "pd" and f.sysctl.get("forwarding6") == "1":
        ra = f.sysctl.get("accept_ra")
        why = "" if ra == "2" else (": with forwarding on, Linux ignores router advertisements unless it is 2, so "
                                    "no SLAAC address and no default route come")  # fmt: skip
        fix = f"sysctl -w net.ipv6.conf.{wan}.accept_ra=2 (and in /etc/sysctl.d/)"
        out.append(Check("router advertisements", ra == "2", f"net.ipv6.conf.{wan}.accept_ra = {ra}{why}", fix))
    if f.provisioning is not None:
        out.append(_provisioning(cfg, *f.provisioning))
    if f.computed is None:
        out.append(Check("reading the kernel", False, f.read_error, "run doctor as root"))
        return out + _daemon(f)
    sel, obs = f.computed.selection, f.computed.observed
    p = sel.params
    if p is None:
        out.append(Check("prefix", False, f"no MAP-E parameters: {sel.reason}",
                         "the WAN needs a prefix some rule maps: by router advertisements (see above) or "
                         "DHCPv6-PD (wan.prefix_from); a prefix of another ISP needs [isp]"))  # fmt: skip
        return out + _not_tried("CE address", "tunnel", "BR", "traffic") + _daemon(f)
    if (rule := p.rule) is not None:
        mapped = (f"rule {rule.ipv6_prefix} -> {rule.ipv4_prefix} ({rule.isp or 'explicit'}): {p.ipv4} psid {p.psid}, "
                  f"{p.ports} ports")  # fmt: skip
    else:
        mapped = p.describe()
    out.append(Check("prefix", True, f"{p.end_user_prefix} from {source_text(sel)}; {mapped}"))
    ce = str(p.ce_ipv6)
    on_wan = any(w.address == ce for w in obs.wan)
    out.append(Check("CE address", on_wan, f"{ce} {'is' if on_wan else 'is NOT'} on {wan}",
                     "" if on_wan else "start mape-daemon (or `mape-daemon apply`); if it keeps going, a network "
                     "manager removes it: see the README on NetworkManager and networkd"))  # fmt: skip
    out.append(_tunnel(cfg, obs, p))
    out += _routes(f)
    if not on_wan:
        return out + _not_tried("BR", "traffic") + _rest(f)
    br, far = str(p.br), p.far_end
    out.append(Check(far, f.echo_br is not None,
                     f"{br} answers ICMPv6 echo from {ce} in {f.echo_br * 1000:.0f} ms" if f.echo_br is not None
                     else f"{br} does not answer ICMPv6 echo from {ce}",
                     "" if f.echo_br is not None else "check the WAN's IPv6 default route (RAs) and that this "
                     f"{far} is the line's ({FAR_KEY[p.method]})"))  # fmt: skip
    out.append(_traffic(f))
    return out + _rest(f)


FAR_KEY = {"map-e": "isp, or isp.rule.br", "ds-lite": "dslite.aftr, or HB46PP's", "ipip": "ipip.remote, or HB46PP's"}

PROVISIONING_FIXES = {
    "dns failed": "isp.resolvers must be the line's own DNS servers (the WAN's DHCPv6 or RA gives them), "
    "reachable from this router",
    "no reply": "the server must be reachable over IPv6 from the WAN; with t=b its certificate must verify "
    "(isp.ca_file for a private CA)",
    "bad reply": "the provisioning server's answer is not usable: ask the line's provider",
    "no record": 'this line does not provision: set isp.provisioning = "auto" (the bundled tables) or give the rule',
    "no resolver": "set isp.resolvers to the line's own DNS servers",
}


def _provisioning(cfg: Config, outcome: str, detail: str) -> Check:
    """One HB46PP access. A line without the record is fine unless provisioning = "hb46pp"."""
    ok = outcome == "ok" or (outcome in ("no record", "no resolver") and cfg.isp.provisioning == "auto")
    says = detail + ("; the bundled tables are used" if outcome != "ok" and ok else "")
    return Check("HB46PP", ok, says, "" if ok else PROVISIONING_FIXES.get(outcome, ""))


def provision(config: Config) -> tuple[Config, tuple[str, str] | None]:
    """One HB46PP access, as the daemon would make it now: the config with the rules it gives (or
    the daemon's cached ones when it fails), and what happened. Unchanged when not provisioning."""
    from .provisioning import CAPABILITY, Provisioner, access, chosen, credentials, learn_resolvers

    isp = config.isp
    if not isp.provisions:
        return config, None
    resolvers = list(isp.resolvers) or learn_resolvers(config.wan.interface)
    if not resolvers:
        return config, (
            "no resolver",
            "no isp.resolvers, and neither the WAN's RAs (RDNSS) nor DHCPv6 name a DNS server",
        )
    a = access(resolvers, CAPABILITY, None, str(isp.ca_file) if isp.ca_file else None, credentials(isp))
    table = Provisioner().load_cache(isp)
    if a.offer is not None and (offered := chosen(a.offer, isp)) is not None:
        table = offered
    elif a.outcome.value == "no record":
        table = None
    return config.with_provisioned(table), (a.outcome.value, a.detail)


def _forwarding(f: Facts) -> Check:
    v = f.sysctl.get("ip_forward")
    return Check("IPv4 forwarding", v == "1", f"net.ipv4.ip_forward = {v}",
                 "" if v == "1" else "sysctl -w net.ipv4.ip_forward=1 (and net.ipv4.ip_forward = 1 in "
                 "/etc/sysctl.d/); the daemon does not turn it on")  # fmt: skip


def _tunnel(cfg: Config, obs, p: MapParams) -> Check:
    name = cfg.tunnel.name
    t = obs.tunnels.get(name)
    if t is None:
        return Check("tunnel", False, f"{name} does not exist", "start mape-daemon (or `mape-daemon apply`)")
    wrong = [f"{what} {have}, expected {want}" for what, have, want in
             (("local", t.local, str(p.ce_ipv6)), ("remote", t.remote, str(p.br))) if have != want]  # fmt: skip
    if not t.up:
        wrong.append("it is down")
    return Check("tunnel", not wrong, f"{name}: " + ("; ".join(wrong) if wrong else f"{t.local} -> {t.remote}, up"),
                 "a sync puts it right: `systemctl reload mape-daemon`" if wrong else "")  # fmt: skip


def _routes(f: Facts) -> list[Check]:
    assert f.computed is not None
    ours = [r for r in f.computed.observed.routes if r.dst == "default" and r.table == MAIN_TABLE and r.family == 4]
    taken = [c for c in f.computed.conflicts if "route slot taken" in c]
    if taken:
        return [Check("default route", False, taken[0].split(": IPv4")[0],
                      "pppd: add `nodefaultroute` to its options (PPPoE keeps working through the policy routing); "
                      "otherwise remove that route or set route.metric")]  # fmt: skip
    dev = f.config.tunnel.name
    there = any(r.dev == dev for r in ours)
    return [Check("default route", there, f"IPv4 default {'via' if there else 'NOT via'} {dev}",
                  "" if there else "start mape-daemon (or `mape-daemon apply`)")]  # fmt: skip


def _traffic(f: Facts) -> Check:
    if f.connect_error is None:
        return Check("traffic", None, "not tried")
    tx, rx = f.tunnel_delta or (0, 0)
    if f.connect_error == "":
        return Check("traffic", True, f"TCP to {f.target} through the tunnel: connected ({tx} out, {rx} in)")
    says = f"TCP to {f.target}, {CONNECT_TRIES} tries: {f.connect_error} ({tx} packet(s) out of the tunnel, {rx} in)"
    if not tx:
        return Check("traffic", False, says + ": nothing entered the tunnel",
                     "the IPv4 default route does not lead into the tunnel (see 'default route')")  # fmt: skip
    if f.echo_br is None:
        return Check("traffic", False, says, "the BR does not answer (see 'BR')")
    if not rx:
        return Check("traffic", False, says + ": packets go out, nothing comes back",
                     "the BR does not take this CE's packets: a wrong CE address (the interface-identifier "
                     "layout: the Japanese ISPs use draft03, an explicit rule defaults to rfc7597) or a wrong "
                     "rule or PSID for this line (`mape-daemon calc` against the ISP's values)")  # fmt: skip
    return Check("traffic", False, says, "check the firewall's forward policy for the tunnel (firewalld: its zone)")


def _rest(f: Facts) -> list[Check]:
    out = []
    if f.wan_mtu and f.tunnel_mtu:
        fits = f.tunnel_mtu + 40 <= f.wan_mtu
        out.append(Check("path MTU", fits, f"tunnel MTU {f.tunnel_mtu} + 40 (IPv6 header) "
                         f"{'<=' if fits else '>'} WAN MTU {f.wan_mtu}",
                         "" if fits else f"set tunnel.mtu = {f.wan_mtu - 40}"))  # fmt: skip
    fw = (f.state.firewalld if f.state else None) or {}
    if fw.get("running"):
        problem = fw.get("problem")
        out.append(Check("firewalld", not problem, problem or f"tunnel in zone {fw.get('zone')}",
                         "the commands in the problem text" if problem else ""))  # fmt: skip
    nm = f.managers.get("networkmanager") or {}
    if nm.get("wan"):
        out.append(Check("NetworkManager", True, "manages the WAN: it removes the CE address when it activates "
                         "or reapplies the WAN's profile, and the daemon puts it back within seconds"))  # fmt: skip
    if f.config.pppoe and f.config.pppoe.interface in f.rp_filter:
        eff = max(f.rp_filter[f.config.pppoe.interface], f.rp_filter.get("all", 0))
        out.append(Check("rp_filter", eff != 1, f"{f.config.pppoe.interface}: effective rp_filter {eff}",
                         "" if eff != 1 else "strict drops the replies of PPPoE-marked traffic; the daemon sets it "
                         "to 2 (loose): is it running?"))  # fmt: skip
    return out + _daemon(f)


def _daemon(f: Facts) -> list[Check]:
    s = f.state
    if s is None:
        return [Check("daemon", False, "no state file: mape-daemon is not running", "systemctl start mape-daemon")]
    age = f.now - s.last_sync
    limit = 2 * f.period + WATCHDOG_SLACK
    if age > limit:
        return [Check("daemon", False, f"last sync {age:.0f} s ago (more than {limit:.0f} s): it is stuck or gone",
                      "systemctl status mape-daemon; journalctl -u mape-daemon")]  # fmt: skip
    ok = s.ok and not s.error
    watchers = f"; its event watchers restarted {s.watcher_restarts} time(s)" if s.watcher_restarts else ""
    return [Check("daemon", ok, f"last sync {age:.0f} s ago, " + ("ok" if ok else f"FAILED: {s.error}") + watchers,
                  "" if ok else "journalctl -u mape-daemon says why")]  # fmt: skip


def _not_tried(*names: str) -> list[Check]:
    return [Check(n, None, "not tried") for n in names]


def failed(results: list[Check]) -> bool:
    return any(c.ok is False for c in results)


def to_text(results: list[Check]) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "--  "}
    lines = []
    for c in results:
        lines.append(f"{mark[c.ok]} {c.name}: {c.says}")
        if c.ok is False and c.fix:
            lines.append(f"     fix: {c.fix}")
    lines.append("all checks passed" if not failed(results) else
                 f"{sum(c.ok is False for c in results)} check(s) failed")  # fmt: skip
    return "\n".join(lines)


def to_json(results: list[Check]) -> dict[str, Any]:
    return {"ok": not failed(results), "checks": [asdict(c) for c in results]}


def gather(config: Config, reconciler, state_dir, target: tuple[str, int], timeout: float = 5.0,
           provisioning: tuple[str, str] | None = None) -> Facts:  # fmt: skip
    """The facts, read from this host (`reconciler`: a read-only `compute` is all it is asked;
    `provisioning`: what `provision` found)."""
    from .errors import MapeError
    from .kernel import LinuxKernel, diagnose

    wan, tunnel = config.wan.interface, config.tunnel.name
    f = Facts(config, None, target=f"{target[0]}:{target[1]}", provisioning=provisioning)
    f.sysctl = {"ip_forward": diagnose.sysctl("net", "ipv4", "ip_forward"),
                "forwarding6": diagnose.sysctl("net", "ipv6", "conf", wan, "forwarding"),
                "accept_ra": diagnose.sysctl("net", "ipv6", "conf", wan, "accept_ra")}  # fmt: skip
    try:
        with reconciler.kernel.session():
            f.computed = reconciler.compute()
    except MapeError as e:
        f.read_error = str(e)
    f.wan_mtu, f.tunnel_mtu = diagnose.mtu(wan), diagnose.mtu(tunnel)
    p = f.computed.selection.params if f.computed else None
    if f.computed is not None and p is not None and any(w.address == str(p.ce_ipv6) for w in f.computed.observed.wan):
        f.echo_br = diagnose.echo6(str(p.ce_ipv6), str(p.br), min(timeout, 2.0))
        if tunnel in f.computed.observed.tunnels:
            before = diagnose.counters(tunnel)
            for _ in range(CONNECT_TRIES):  # one refusal can be the far end's (a port still in its TIME_WAIT)
                f.connect_error = diagnose.connect(*target, timeout=timeout)
                if not f.connect_error:
                    break
            after = diagnose.counters(tunnel)
            if before and after:
                f.tunnel_delta = (after[0] - before[0], after[1] - before[1])
    f.state = DaemonState.read(state_dir)
    f.period = full_check_period(config.daemon.sync_interval, reconciler.kernel.backend)
    f.managers = LinuxKernel.managers(wan, tunnel)
    for name in ("all", *([config.pppoe.interface] if config.pppoe else [])):
        if (v := diagnose.sysctl("net", "ipv4", "conf", name, "rp_filter")) is not None:
            f.rp_filter[name] = int(v)
    return f
