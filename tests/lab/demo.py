"""`make demo`: mape-daemon's main job on the built-in lab (a simulated ISP with a real BR).

Runs inside the lab VM: the router gets its WAN prefix by router advertisements, `mape-daemon run`
computes the MAP-E parameters and converges the kernel, and a LAN client reaches a server on the
IPv4 internet through the tunnel and the BR from a port inside the router's port set. Then the
ISP renumbers, and the daemon follows by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import traffic
from .netns import call, popen, sh
from .topo import SERVER, Lab, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n[daemon]\nsync_interval = 10\n'


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def mape(lab: Lab, *args: str, env: dict[str, str] | None = None) -> None:
    print(f"router# mape-daemon {' '.join(args)}", flush=True)
    r = subprocess.run(["ip", "netns", "exec", lab.ce, sys.executable, "-m", "mape_daemon", *args],
                       capture_output=True, text=True, env=env)  # fmt: skip
    print((r.stdout + r.stderr).rstrip(), flush=True)
    if r.returncode:
        raise SystemExit(f"demo: mape-daemon {args[0]} exited {r.returncode}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp))
        daemon = None
        try:
            step("building the lab: ISP with radvd and a BR, the router, a LAN client, an IPv4 server")
            lab.up()
            wan = wait_for(lambda: [a for a in lab.wan_addresses() if not a["tentative"]], 30, "SLAAC")[0]
            print(f"router's WAN address by SLAAC: {wan['address']}/{wan['prefixlen']}")
            first = lab.ce_params()
            lab.br_add_ce(first)
            step("what the WAN prefix maps to")
            mape(lab, "calc", wan["address"])
            cfg = Path(tmp) / "mape.toml"
            cfg.write_text(CONFIG)
            env = {**os.environ, "MAPE_STATE_DIR": f"{tmp}/run"}
            step(f"starting the daemon: mape-daemon run (config: {CONFIG.strip()!r})")
            daemon = popen(lab.ce, sys.executable, "-m", "mape_daemon", "run", "-c", str(cfg), env=env)
            wait_for(lambda: first.ipv4 in snat(lab), 120, "the first sync")
            mape(lab, "status", "-c", str(cfg), env=env)
            clients(lab)

            step("someone deletes the tunnel and flushes our SNAT chain: the daemon repairs both")
            print("router# ip link del ip6tnl1; nft flush chain ip mape nat-out", flush=True)
            sh(lab.ce, "ip", "link", "del", "ip6tnl1")
            sh(lab.ce, "nft", "flush", "chain", "ip", "mape", "nat-out")
            wait_for(lambda: first.ipv4 in snat(lab) and "ip6tnl1" in sh(lab.ce, "ip", "link"), 120, "the repair")

            step("the ISP renumbers: a new prefix is announced, the old one deprecated")
            lab.renumber("2400:4050:1234:9a00::/64")
            second = lab.ce_params()
            lab.br_add_ce(second)
            wait_for(lambda: second.ipv4 in snat(lab), 120, "re-convergence")
            wait_for(lambda: second.ipv4 in (Path(tmp) / "run" / "state.json").read_text(), 30, "the state file")
            mape(lab, "status", "-c", str(cfg), env=env)
            clients(lab)

            step("stopping the daemon (SIGTERM): it removes everything of ours")
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            daemon = None
            print(f"ip6tnl1 left: {'ip6tnl1' in sh(lab.ce, 'ip', 'link')}; "
                  f"table ip mape left: {'mape' in sh(lab.ce, 'nft', 'list', 'tables')}")  # fmt: skip
        finally:
            if daemon is not None:
                daemon.kill()
            lab.down()
    return 0


def snat(lab: Lab) -> str:
    """Our SNAT rule (the nftables backend, which `auto` picks in the lab), or "" while it is missing."""
    out = sh(lab.ce, "nft", "list", "chain", "ip", "mape", "nat-out", check=False)
    return next((line for line in out.splitlines() if " snat ip to " in line), "")


def clients(lab: Lab) -> None:
    print("the LAN client (192.168.1.10) opens 3 connections to 203.0.113.10; the server saw:", flush=True)
    for answer in call(lab.lan, traffic.tcp_sequential, SERVER, 3):
        print(f"  {answer}")


if __name__ == "__main__":
    sys.exit(main())
