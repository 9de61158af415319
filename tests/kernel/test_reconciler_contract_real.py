"""The reconciler contract against the real kernel, in the router's namespace of the lab."""

from __future__ import annotations

import subprocess

import pytest

from mape_daemon.kernel import make_kernel
from tests import reconciler_contract as contract
from tests.hostns import inside
from tests.reconciler_contract import (  # noqa: F401 - the shared contract, collected here
    test_cleanup_without_config_after_config_changes,
    test_converge_then_noop,
    test_drift_repaired_alone,
    test_foreign_untouched,
    test_primitives_are_idempotent,
)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class RealWorld:
    def __init__(self, backend: str, state_dir):
        self.backend = backend
        self.binary = "iptables-legacy" if backend == "iptables-legacy" else "iptables-nft"
        self.kernel = make_kernel(backend)
        self.state_dir = state_dir

    def damage(self, what: str) -> None:
        if what == "tunnel-deleted":
            run("ip", "link", "del", "ip6tnl1")
        elif what == "tunnel-remote-changed":
            run("ip", "-6", "tunnel", "change", "ip6tnl1", "mode", "ipip6", "remote", "2001:db8::1")
        elif what == "tunnel-down":
            run("ip", "link", "set", "ip6tnl1", "down")
        elif what == "snat-flushed" and self.backend == "nftables":
            run("nft", "flush", "chain", "ip", "mape", "nat-out")
        elif what == "snat-flushed":
            run(self.binary, "-t", "nat", "-F", "MAPE-SNAT")
        elif what == "guard-deleted":
            run("nft", "delete", "table", "ip", "mape")
        elif what == "fwmark-rule-deleted":
            run("ip", "rule", "del", "priority", "5000")
        elif what == "ce-address-deleted":
            run("ip", "-6", "addr", "del", f"{contract.CE}/128", "dev", "wan0")
        elif what == "egress-guard-deleted":
            run("tc", "qdisc", "del", "dev", "ip6tnl1", "clsact")

    def add_foreign(self) -> None:
        run("ip", "route", "add", "default", "dev", "lan0", "metric", "0", "proto", "static")  # pppd/DHCP's default
        run("ip", "route", "add", "198.18.0.0/24", "dev", "lan0", "table", "10", "proto", "static")
        run("ip", "route", "add", "198.18.0.0/24", "dev", "lan0", "table", "20", "proto", "static")
        run("ip", "rule", "add", "fwmark", "1000", "table", "20", "priority", "100")  # a foreign fwmark rule
        run("ip", "rule", "add", "fwmark", "7", "table", "20", "priority", "5000")  # one at our priority
        run(self.binary, "-t", "nat", "-N", "USER-NAT")
        run(self.binary, "-t", "nat", "-A", "POSTROUTING", "-o", "ppp0", "-j", "MASQUERADE")
        run("nft", "add", "table", "inet", "user")
        run("nft", "add", "chain", "inet", "user", "out", "{ type filter hook postrouting priority 0; }")

    def foreign(self):
        save = [line for line in run(f"{self.binary}-save").splitlines() if line.startswith(("-A", ":"))
                and "MAPE-" not in line and not line.startswith((":PREROUTING", ":INPUT", ":FORWARD", ":OUTPUT",
                                                                 ":POSTROUTING"))]  # fmt: skip
        # Kernel routes come and go with addresses (ours too), RA routes count their lifetime down:
        # what another program made is everything else.
        routes = [line for line in run("ip", "route", "show", "table", "all").splitlines()
                  if not any(f"proto {p} " in line for p in ("203", "kernel", "ra"))]  # fmt: skip
        rules = [line for line in run("ip", "rule", "show").splitlines() if "proto 203" not in line]
        nft = run("nft", "list", "table", "inet", "user")
        return routes, rules, save, nft

    def leftovers(self) -> list[str]:
        left = [f"link {line}" for line in run("ip", "-o", "link", "show").splitlines() if "ip6tnl1" in line]
        left += [f"addr {line}" for line in run("ip", "-o", "-6", "addr", "show", "dev", "wan0").splitlines()
                 if contract.CE in line]  # fmt: skip
        left += [f"route {line}" for line in run("ip", "route", "show", "table", "all", "proto", "203").splitlines()]
        left += [
            f"route6 {line}" for line in run("ip", "-6", "route", "show", "table", "all", "proto", "203").splitlines()
        ]
        left += [f"rule {line}" for line in run("ip", "-d", "rule", "show").splitlines() if "proto 203" in line]
        left += [f"netfilter {line}" for line in run(f"{self.binary}-save").splitlines() if "MAPE-" in line]
        left += [f"nft {line}" for line in run("nft", "list", "tables").splitlines() if "mape" in line]
        return left


@pytest.fixture(params=["iptables-nft", "nftables"])
def world(lab, tmp_path, request):
    lab.br_add_ce(lab.ce_params())
    with inside(lab.ce):
        yield RealWorld(request.param, tmp_path / "state")


def test_legacy_backend_converges_then_noops(lab, tmp_path):
    with inside(lab.ce):
        world = RealWorld("iptables-legacy", tmp_path / "state")
        contract.check_converge_then_noop(world, contract.config("iptables-legacy"))
        assert "MAPE-SNAT-TCP" in run("iptables-legacy-save", "-t", "nat")


def test_a_route_of_ours_with_link_scope_is_removed(world):
    """Found by the benchmark: `ip route add ... dev X proto 203` has scope link, and a delete
    that names scope universe missed it, so cleanup left it behind."""
    run("ip", "route", "add", "198.18.9.0/24", "dev", "lan0", "table", "10", "proto", "203")
    assert "198.18.9.0/24" in run("ip", "route", "show", "table", "10")
    r = contract.converge(world, contract.config())  # the stray route is not desired: the sync removes it
    assert "198.18.9.0" not in run("ip", "route", "show", "table", "all", "proto", "203")
    assert r.sync().writes == 0
