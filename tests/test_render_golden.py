"""What we write to netfilter, for a matrix of configs on each backend, byte for byte: the
iptables-restore text of every table, our nftables table, the plan and the journal's words. The
golden files were made from main before the firewall features became data (issue 18): a
refactor that changes one byte of what reaches the kernel or the journal fails here.

Regenerate on purpose only: MAPE_REGEN_GOLDEN=1 pytest tests/test_render_golden.py
"""

from __future__ import annotations

import os
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from mape_daemon import desired, maprules
from mape_daemon.actions import FirewallChange
from mape_daemon.config import parse
from mape_daemon.kernel.netfilter_restore import restore_script
from mape_daemon.mapcalc import compute
from mape_daemon.plan import diff, diff_firewall
from mape_daemon.report import repair_lines, summary
from mape_daemon.state import NOTHING

GOLDEN = Path(__file__).with_name("golden") / "render"
LINKS = frozenset({"wan0", "lan0", "lan1", "ppp0"})


def params(address: str):
    a = IPv6Address(address)
    return compute(maprules.bundled().match(a), a)


LINES = {"ocn": params("2400:4050:1234:5600::1"), "v6plus": params("240b:10:2a40:5600::1")}
BASE = '[wan]\ninterface = "wan0"\n'
PPPOE = '[lan]\ninterfaces = ["lan0", "lan1"]\n[pppoe]\nhosts = ["192.168.1.55/32", "192.168.2.0/24"]\n'
CONFIGS = {
    "base": "",
    "pppoe": PPPOE,
    "pppoe-plain": "[pppoe]\nmark_incoming = false\nmasquerade = false\nfwmark = 0x10000\nmask = 0xff0000\n",
    "forwards": '[[forward]]\nprotocol = "tcp"\nport = "{lo}"\nto = "192.168.1.20"\nto_port = 25565\n'
    '[[forward]]\nprotocol = "udp"\nport = "{lo2}-{hi2}"\nto = "192.168.1.21"\n',
    "no-guard": "[firewall]\nguard = false\n",
    "open": "[inbound]\nclosed = false\n",
    "open-no-guard": "[inbound]\nclosed = false\n[firewall]\nguard = false\n",
    "no-mss-tcp-udp": '[mss]\nclamp = false\n[snat]\nprotocols = ["tcp", "udp"]\n',
    "reserved": '[snat]\nreserved_ports = ["{lo}", "{lo2}-{hi2}"]\n[tunnel]\nname = "mape-t.1"\nmtu = 1400\n',
    "per-connection": '[snat]\nudp_mapping = "per-connection"\n',
    "eif": '[snat]\nudp_filtering = "endpoint-independent"\n',
    "adf": '[snat]\nudp_filtering = "address-dependent"\n',
    "everything": PPPOE + '[[forward]]\nprotocol = "udp"\nport = "{lo2}"\nto = "192.168.1.22"\n',
}


def render(line: str, name: str, native: bool) -> str:
    p = LINES[line]
    (lo, _), (lo2, hi2) = p.port_ranges[0], p.port_ranges[1]
    cfg = parse(BASE + CONFIGS[name].format(lo=lo, lo2=lo2, hi2=hi2))
    state = desired.build(cfg, p, LINKS, native=native)
    plan = diff(state, NOTHING)
    out = ["# plan", str(plan), "# iptables-restore"]
    out += [restore_script(c) for c in diff_firewall(state, NOTHING)]
    out += ["# nftables", state.nft or "(none)", "# journal: set up", summary(plan.actions), "# journal: repair"]
    out += repair_lines(plan.actions, 0)
    out += ["# journal: teardown", *repair_lines(diff(NOTHING, state).actions, 0)]
    firewall = [a for a in plan.actions if isinstance(a, FirewallChange)]
    out += ["# journal: reload", *repair_lines(tuple(firewall), 0, "updated")]
    return "\n".join(out) + "\n"


CASES = [(line, name, backend) for line in LINES for name in CONFIGS for backend in ("iptables", "nftables")]


@pytest.mark.parametrize(("line", "name", "backend"), CASES)
def test_rendered_text_is_byte_identical_to_the_golden_file(line, name, backend):
    text = render(line, name, native=backend == "nftables")
    path = GOLDEN / f"{line}-{name}-{backend}.txt"
    if os.environ.get("MAPE_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; regenerate on purpose only (see the module doc)"
