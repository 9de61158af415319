"""Command line: `mape-daemon SUBCOMMAND`. Every failure is one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from . import maprules
from .config import DEFAULT_PATH, Config, ConfigError, load
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE, CannotRunHere, MapeError
from .mapcalc import IidLayout, MapParams, MappingError, MapRule, compute, nearest, range_text
from .prefix import source_text
from .statefile import NAME, STATE_DIR, DaemonState


class UsageError(Exception):
    """Bad command-line input; the message is shown as is."""


def parse_wan(text: str) -> IPv6Network | IPv6Address:
    """An address, or a prefix (host bits allowed, as `ip addr` prints them)."""
    try:
        return IPv6Network(text, strict=False) if "/" in text else IPv6Address(text)
    except ValueError as e:
        raise UsageError(f"{text!r} is not an IPv6 address or prefix: {e}") from None


def parse_rule(text: str, layout: IidLayout, psid_len: int | None) -> MapRule:
    """IPV6PREFIX,IPV4PREFIX,EALEN,OFFSET[,BR] as given to --rule."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (4, 5):
        raise UsageError(f"--rule {text!r}: expected IPV6PREFIX,IPV4PREFIX,EALEN,OFFSET[,BR]")
    try:
        return MapRule(
            ipv6_prefix=IPv6Network(parts[0]),
            ipv4_prefix=IPv4Network(parts[1]),
            ea_len=int(parts[2]),
            psid_offset=int(parts[3]),
            psid_len=psid_len,
            br=IPv6Address(parts[4]) if len(parts) == 5 else None,
            iid=layout,
        )
    except ValueError as e:  # MappingError included
        raise UsageError(f"--rule {text!r}: {e}") from None


def params_to_json(p: MapParams) -> dict:
    r = p.rule
    return {
        "isp": r.isp,
        "rule": {
            "ipv6_prefix": str(r.ipv6_prefix),
            "ipv4_prefix": str(r.ipv4_prefix),
            "ea_len": r.ea_len,
            "psid_offset": r.psid_offset,
            "psid_len": r.k,
        },
        "end_user_prefix": str(p.end_user_prefix),
        "ipv4": str(p.ipv4),
        "psid": p.psid,
        "psid_offset": p.psid_offset,
        "psid_len": p.psid_len,
        "ce_ipv6": str(p.ce_ipv6),
        "iid": p.iid.value,
        "br": str(p.br) if p.br else None,
        "port_ranges": [list(rng) for rng in p.port_ranges],
        "ports": p.ports,
    }


def compact_ranges(ranges: Sequence[tuple[int, int]], head: int = 3) -> str:
    """`1376-1391, 2400-2415, 3424-3439, ..., 64864-64879` for a long port set."""
    shown = [range_text(r) for r in ranges]
    if len(shown) > head + 1:
        shown = [*shown[:head], "...", shown[-1]]
    return ", ".join(shown)


def params_to_text(p: MapParams) -> str:
    r = p.rule
    isp = maprules.ISP_NAMES.get(r.isp or "", r.isp or "explicit rule")
    size = p.port_ranges[0][1] - p.port_ranges[0][0] + 1
    lines = [
        f"ISP:          {isp}",
        f"rule:         {r.ipv6_prefix} -> {r.ipv4_prefix}, EA length {r.ea_len}, "
        f"PSID offset {r.psid_offset}, PSID length {r.k}",
        f"prefix:       {p.end_user_prefix}",
        f"IPv4:         {p.ipv4}",
        f"PSID:         {p.psid} (0x{p.psid:x})",
        f"CE address:   {p.ce_ipv6} ({p.iid.value} interface identifier)",
        f"BR:           {p.br or 'not given'}",
        f"ports:        {p.ports} in {len(p.port_ranges)} block(s) of {size}",
        f"blocks:       {compact_ranges(p.port_ranges)}",
    ]
    if r.isp in maprules.UNVERIFIED:
        lines.append(f"warning:      the {r.isp} rules are unverified")
    return "\n".join(lines)


def rule_for(wan: IPv6Network | IPv6Address, args: argparse.Namespace) -> tuple[MapRule, int | None]:
    """The rule a PREFIX maps by, and the PSID it provisions: the config's [isp] (an explicit
    rule too, as the daemon maps) when -c is given and --isp is auto, else the bundled tables."""
    if args.config and args.isp == "auto":
        isp = load(args.config).isp
        return isp.match(wan), isp.psid
    return maprules.bundled().match(wan, None if args.isp == "auto" else args.isp), None


def running_state() -> DaemonState | None:
    """The running daemon's state file, or None when there is none (or it cannot be read)."""
    return DaemonState.read(state_dir())


def running_set(state: DaemonState) -> tuple[tuple[int, int], ...] | None:
    """The port set of the daemon's mapping now, or None while it has none."""
    return None if state.port_ranges is None else tuple(state.port_ranges)


def cmd_calc(args: argparse.Namespace) -> int:
    wan = parse_wan(args.prefix)
    layout_override = IidLayout(args.iid) if args.iid else None
    psid = args.psid
    if args.rule:
        if args.isp != "auto":
            raise UsageError("give --rule or --isp, not both")
        rule = parse_rule(args.rule, layout_override or IidLayout.RFC7597, args.psid_len)
    else:
        rule, provisioned = rule_for(wan, args)
        psid = provisioned if psid is None else psid
    params = compute(rule, wan, psid=psid, layout=layout_override)
    print(json.dumps(params_to_json(params)) if args.json else params_to_text(params))
    return 0


PORTS_PER_LINE = 6


def ports_of(args: argparse.Namespace) -> tuple[str, str, int, tuple[tuple[int, int], ...]]:
    """(who, IPv4, PSID, port ranges) for a PREFIX as calc maps it, or the running daemon's."""
    if args.prefix:
        wan = parse_wan(args.prefix)
        rule, psid = rule_for(wan, args)
        p = compute(rule, wan, psid=psid)
        return maprules.ISP_NAMES.get(p.rule.isp or "", "explicit rule"), str(p.ipv4), p.psid, p.port_ranges
    state = running_state()
    if state is None:
        path = state_dir() / NAME
        raise UsageError(f"no PREFIX given and no daemon state at {path}: give a prefix, or start the daemon")
    ranges = running_set(state)
    if state.method == "ds-lite":
        raise UsageError("the running line is DS-Lite: its AFTR owns the ports, none are ours to forward")
    if ranges is None or state.ipv4 is None or state.psid is None:
        raise UsageError(f"no PREFIX given and the daemon has no mapping now: {state.reason or 'unknown'}")
    who = "fixed IPv4 (IPIP)" if state.method == "ipip" else maprules.ISP_NAMES.get(state.isp or "", "explicit rule")
    return who, state.ipv4, state.psid, ranges


def cmd_ports(args: argparse.Namespace) -> int:
    if args.near is not None and not 0 < args.near < 65536:
        raise UsageError(f"--near {args.near}: a port is 1 to 65535")
    who, ipv4, psid, ranges = ports_of(args)
    near = nearest(ranges, args.near) if args.near is not None else None
    if args.json:
        out: dict = {"isp": who, "ipv4": ipv4, "psid": psid, "ports": sum(hi - lo + 1 for lo, hi in ranges),
                     "port_ranges": [list(r) for r in ranges]}  # fmt: skip
        if near is not None:
            out["near"] = {"port": near.port, "in_set": near.holding is not None,
                           **{k: list(v) if v else None for k, v in (("holding", near.holding), ("below", near.below),
                                                                     ("above", near.above))}}  # fmt: skip
        print(json.dumps(out))
        return 0
    size = ranges[0][1] - ranges[0][0] + 1
    print(
        f"{who} {ipv4} psid {psid}: {sum(hi - lo + 1 for lo, hi in ranges)} ports in {len(ranges)} block(s) of {size}"
    )
    cells = [f"{lo}-{hi}" for lo, hi in ranges]
    for i in range(0, len(cells), PORTS_PER_LINE):
        print("  " + "  ".join(f"{c:<11}" for c in cells[i : i + PORTS_PER_LINE]).rstrip())
    if near is not None:
        print(near.text())
    return 0


def state_dir() -> Path:
    return STATE_DIR


def make_reconciler(config: Config | None, records):
    from .kernel import make_kernel
    from .reconciler import Reconciler

    backend = config.firewall.backend if config else "auto"
    return Reconciler(config, make_kernel(backend, records.record.backend), records, kernel_for=make_kernel)


def describe_selection(result_or_computed) -> str:
    sel = result_or_computed.selection
    if sel.params is None:
        return f"no parameters: {sel.reason}"
    p = sel.params
    if p.rule is None:  # DS-Lite, IPIP
        return f"{p.describe()}, tunnel from {p.ce_ipv6} (prefix from {source_text(sel)})"
    isp = maprules.ISP_NAMES.get(p.rule.isp or "", "explicit rule")
    return f"{isp}: {p.ipv4} psid {p.psid}, {p.ports} ports, CE {p.ce_ipv6} (from {source_text(sel)})"


def config_path(args: argparse.Namespace) -> str:
    return getattr(args, "file", None) or args.config


def check_forwards_against_running(config: Config, path) -> None:
    """With a daemon running, a forward outside its port set is an error naming the nearest
    usable ports (a reload would refuse it)."""
    from . import forwards

    state = running_state()
    ranges = running_set(state) if state is not None else None
    if ranges is None:
        return
    if problem := forwards.check(config, ranges, f"the running line's set, {state.ipv4} psid {state.psid}"):
        raise ConfigError(f"{path}: {problem}")


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args)
    config = load(path)
    for w in config.warnings():
        print(f"{path}: warning: {w}", file=sys.stderr)
    check_forwards_against_running(config, path)
    print(
        f"{path}: ok (WAN {config.wan.interface}, method {config.isp.method}, ISP {config.isp.name}, "
        f"tunnel {config.tunnel.name}, PPPoE {'on' if config.pppoe else 'off'}, {len(config.forward)} forward(s), "
        f"UPnP {'on' if config.upnp.enabled else 'off'})"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .record import RecordFile

    reconciler = make_reconciler(load(args.config), RecordFile(state_dir()))
    with reconciler.kernel.session():
        computed = reconciler.compute()
    print(describe_selection(computed))
    print_notes(reconciler.config, computed)
    print(computed.plan)
    return 0


def print_notes(config: Config | None, result_or_computed) -> None:
    """Conflicts, and forwards the current port set cannot hold."""
    from . import forwards

    for c in result_or_computed.conflicts:
        print(f"conflict: {c}")
    p = result_or_computed.selection.params
    if config is not None and p is not None:
        for u in forwards.split(config, p.port_ranges)[1]:
            print(f"disabled: {u}")


def _apply(args: argparse.Namespace, config: Config | None, teardown: bool) -> int:
    from .record import RecordFile, exclusive

    with exclusive(state_dir(), f"mape-daemon {args.command}"):
        result = make_reconciler(config, RecordFile(state_dir())).sync(teardown=teardown)
    if not teardown:
        print(describe_selection(result))
    print_notes(config, result)
    print(result.plan)
    if result.error is not None:
        done = f"{result.applied} of {len(result.plan.actions)} changes applied"
        print(f"mape-daemon {args.command}: {result.error} ({done}; run again to retry)", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(result.error, CannotRunHere) else EXIT_FAILURE
    print(f"{len(result.plan.actions)} change(s), {result.writes} kernel write(s) in {result.seconds * 1000:.0f} ms")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    return _apply(args, load(args.config), teardown=False)


def cmd_run(args: argparse.Namespace) -> int:
    from .service import main

    return main(args.config)


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, to_text

    state = collect(state_dir())
    print(json.dumps(state) if args.json else to_text(state))
    return 0 if state.get("ok") else EXIT_FAILURE


def cmd_doctor(args: argparse.Namespace) -> int:
    """Why IPv4 does not work: each known cause checked, with its fix. Changes nothing."""
    from . import doctor
    from .record import RecordFile

    config = load(args.config)
    host, _, port = args.target.rpartition(":")
    if config.isp.provisions:
        print("mape-daemon doctor: asking HB46PP (the line's resolvers, then the provisioning server)",
              file=sys.stderr, flush=True)  # fmt: skip
    config, provisioning = doctor.provision(config)
    reconciler = make_reconciler(config, RecordFile(state_dir()))
    print(f"mape-daemon doctor: checking (a TCP connection to {args.target} through the tunnel, up to "
          f"{args.timeout:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    facts = doctor.gather(config, reconciler, state_dir(), (host, int(port)), args.timeout, provisioning)
    results = doctor.checks(facts)
    print(json.dumps(doctor.to_json(results)) if args.json else doctor.to_text(results))
    return EXIT_FAILURE if doctor.failed(results) else 0


def target(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: give IPV4:PORT, e.g. 1.1.1.1:443")
    return text


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Everything of ours goes, found through the ownership record: a broken or missing config is
    no obstacle (it only says which backend to use when the record does not)."""
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"mape-daemon cleanup: {e}; removing what the record in {state_dir()} lists", file=sys.stderr)
        config = None
    code = _apply(args, config, teardown=True)
    if code == 0:
        code = _cleanup_upnp(config)
    return code


def _cleanup_upnp(config: Config | None) -> int:
    """Our miniupnpd file goes too, and the restart stops miniupnpd: it must not keep granting
    ports of a mapping that is gone. Without a usable config, the default file is looked for."""
    from . import upnp
    from .config import UpnpConfig

    settings = config.upnp if config is not None else UpnpConfig()
    try:
        said = upnp.Miniupnpd().remove(settings, "mape-daemon cleanup")
    except (upnp.UpnpError, OSError) as e:
        print(f"mape-daemon cleanup: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if said:
        print(said)
    return 0


EXAMPLES = {
    "calc": "mape-daemon calc 2400:4050:1234:5600::/56 --json",
    "check-config": "mape-daemon check-config -c /etc/mape-daemon/mape.toml",
    "plan": "mape-daemon plan -c /etc/mape-daemon/mape.toml",
    "apply": "mape-daemon apply -c /etc/mape-daemon/mape.toml",
    "run": "mape-daemon run -c /etc/mape-daemon/mape.toml   (what systemctl start mape-daemon runs)",
    "status": "mape-daemon status --json",
    "cleanup": "mape-daemon cleanup",
    "ports": "mape-daemon ports --near 25565   (the running line's set, and the usable ports nearest 25565)",
    "doctor": "mape-daemon doctor --target 203.0.113.10:80",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mape-daemon", description="MAP-E (RFC 7597) for Linux routers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func, config: str | None = str(DEFAULT_PATH)) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        what = f"config file (default {config})" if config else "map by this config's [isp] (default: bundled rules)"
        p.add_argument("-c", "--config", default=config, help=what)
        p.set_defaults(func=func)
        return p

    calc = command("calc", "compute MAP-E parameters for a WAN prefix or address", cmd_calc, config=None)
    calc.add_argument("prefix", metavar="PREFIX_OR_ADDRESS", help="e.g. 2400:4050:1234:5600::/56 or an address")
    calc.add_argument("--isp", default="auto", choices=["auto", *maprules.ISP_NAMES], help="bundled rule table to use")
    calc.add_argument("--rule", help="explicit rule IPV6PREFIX,IPV4PREFIX,EALEN,OFFSET[,BR]")
    calc.add_argument("--psid-len", type=int, help="PSID length when --rule's EA bits carry no PSID")
    calc.add_argument("--psid", type=int, help="provisioned PSID when the EA bits carry none")
    calc.add_argument(
        "--iid",
        choices=[layout.value for layout in IidLayout],
        help="interface-identifier layout (default: draft03 for bundled rules, rfc7597 for --rule)",
    )
    calc.add_argument("--json", action="store_true", help="print one JSON object")

    ports = command("ports", "which IPv4 ports this line can use: the port set, and those nearest a wanted one",
                    cmd_ports, config=None)  # fmt: skip
    ports.add_argument("prefix", metavar="PREFIX_OR_ADDRESS", nargs="?",
                       help="map this WAN prefix as calc does (default: the running daemon's mapping)")  # fmt: skip
    ports.add_argument("--isp", default="auto", choices=["auto", *maprules.ISP_NAMES], help="bundled rule table to use")
    ports.add_argument("--near", type=int, metavar="PORT", help="the usable ports nearest this one")
    ports.add_argument("--json", action="store_true", help="print one JSON object")

    check = command("check-config", "validate a config file and exit (0, or 78 naming the key)", cmd_check_config)
    check.add_argument("file", nargs="?", help="the file to check (same as -c)")
    command("plan", "print what a sync would change, change nothing", cmd_plan)
    apply = command("apply", "converge once and exit (a second run writes nothing)", cmd_apply)
    apply.add_argument("--once", action="store_true", help="the default; kept for scripts that say it")
    command("run", "the daemon: watch the WAN and keep the kernel converged", cmd_run)
    status = command("status", "the daemon's state: prefix, IPv4, PSID, tunnel, last changes, ports in use",
                     cmd_status)  # fmt: skip
    status.add_argument("--json", action="store_true", help="print one JSON object")
    command("cleanup", "remove everything of ours (works without a usable config)", cmd_cleanup)
    doctor = command("doctor", "when IPv4 does not work: check each known cause and say the fix (changes nothing; "
                     "exit 1 when a check fails)", cmd_doctor)  # fmt: skip
    doctor.add_argument("--target", type=target, default="1.1.1.1:443",
                        help="IPV4:PORT of a test TCP connection through the tunnel (default 1.1.1.1:443)")  # fmt: skip
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds for the test connection (default 5)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `| head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as e:
        print(f"mape-daemon {args.command}: bad config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (UsageError, MappingError) as e:
        print(f"mape-daemon {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CannotRunHere as e:
        print(f"mape-daemon {args.command}: this host cannot run mape-daemon: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except MapeError as e:
        print(f"mape-daemon {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
