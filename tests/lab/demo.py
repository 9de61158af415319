"""`make demo`: mape-daemon's main job on the built-in lab (a simulated ISP with a real BR).

Runs inside the lab VM: the router gets its WAN prefix by router advertisements, mape-daemon
computes the MAP-E parameters and converges the kernel, and a LAN client reaches a server on
the IPv4 internet through the tunnel and the BR, from a port inside the router's port set.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from . import traffic
from .netns import call, sh
from .topo import SERVER, Lab, wait_for

CONFIG = '[wan]\ninterface = "wan0"\n'


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def mape(lab: Lab, *args: str) -> None:
    print(f"router# mape-daemon {' '.join(args)}", flush=True)
    r = subprocess.run(["ip", "netns", "exec", lab.ce, sys.executable, "-m", "mape_daemon", *args],
                       capture_output=True, text=True)  # fmt: skip
    print((r.stdout + r.stderr).rstrip(), flush=True)
    if r.returncode:
        raise SystemExit(f"demo: mape-daemon {args[0]} exited {r.returncode}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lab = Lab(Path(tmp))
        try:
            step("building the lab: ISP with radvd and a BR, the router, a LAN client, an IPv4 server")
            lab.up()
            wan = wait_for(lambda: [a for a in lab.wan_addresses() if not a["tentative"]], 30, "SLAAC")[0]
            print(f"router's WAN address by SLAAC: {wan['address']}/{wan['prefixlen']}")
            lab.br_add_ce(lab.ce_params())
            step("what the WAN prefix maps to")
            mape(lab, "calc", wan["address"])
            cfg = Path(tmp) / "mape.toml"
            cfg.write_text(CONFIG)
            step(f"converging the router (config: {CONFIG.strip()!r})")
            mape(lab, "apply", "--once", "-c", str(cfg))
            step("a second run changes nothing")
            mape(lab, "apply", "--once", "-c", str(cfg))
            step("the LAN client (192.168.1.10) opens 5 connections to 203.0.113.10; the server saw:")
            for answer in call(lab.lan, traffic.tcp_sequential, SERVER, 5):
                print(f"  {answer}")
            print(sh(lab.lan, "busybox", "ping", "-c", "2", SERVER).rstrip())
            step("removing everything of ours")
            mape(lab, "cleanup", "-c", str(cfg))
            print(f"ip6tnl1 left: {'ip6tnl1' in sh(lab.ce, 'ip', 'link')}; "
                  f"MAPE chains left: {'MAPE-' in sh(lab.ce, 'iptables-save')}")  # fmt: skip
        finally:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
