"""The reconciler contract against the fake kernel (the same checks run in the lab VM)."""

from __future__ import annotations

import re

import pytest

from mape_daemon.state import Route, RoutingRule
from tests.fake_kernel import FakeKernel
from tests.reconciler_contract import (  # noqa: F401 - the shared contract, collected here
    CE,
    test_cleanup_without_config_after_config_changes,
    test_converge_then_noop,
    test_drift_repaired_alone,
    test_foreign_untouched,
    test_primitives_are_idempotent,
)


class FakeWorld:
    def __init__(self, state_dir, backend: str):
        self.state_dir, self.backend = state_dir, backend
        self.kernel = FakeKernel(("wan0", "lan0", "ppp0"))
        if backend == "nftables":
            self.kernel.backend = "nftables"
        self.kernel.slaac("2400:4050:1234:5600:5054:ff:fe12:3456")

    def damage(self, what: str) -> None:
        k = self.kernel
        if what == "tunnel-deleted":
            k.apply_del_tunnel("ip6tnl1")
        elif what == "tunnel-remote-changed":
            t = k.tunnels["ip6tnl1"]
            k.tunnels["ip6tnl1"] = type(t)(**{**t.__dict__, "remote": "2001:db8::1"})
        elif what == "tunnel-down":
            k.link_down("ip6tnl1")
        elif what == "snat-flushed" and self.backend == "nftables":
            assert k.nft is not None
            k.nft = re.sub(r"\t\t.* snat ip to .*\n", "", k.nft)
        elif what == "snat-flushed":
            k.iptables.iptables("-t", "nat", "-F", "MAPE-SNAT")
        elif what == "guard-deleted":
            k.nft = None
        elif what == "fwmark-rule-deleted":
            k.rules.pop(next(r for r in k.rules if r.table == 10))
        elif what == "ce-address-deleted":
            k.ce_addrs.discard(("wan0", CE))
        elif what == "egress-guard-deleted":
            del k.guards["ip6tnl1"]

    def add_foreign(self) -> None:
        k = self.kernel
        k.routes[Route("default", "lan0", 254, 0)] = 4  # a DHCP client's or pppd's default, at our metric
        k.routes[Route("198.18.0.0/24", "lan0", 10)] = 4  # the user's own route in the PPPoE table
        k.rules[RoutingRule(100, 1000, 0xFFFFFFFF, 20)] = 0  # a foreign fwmark rule
        k.rules[RoutingRule(5000, 0x7, 0xFFFFFFFF, 20)] = 0  # one at our priority
        k.iptables.iptables("-t", "nat", "-N", "USER-NAT")
        k.iptables.iptables("-t", "nat", "-A", "POSTROUTING", "-o", "ppp0", "-j", "MASQUERADE")

    def foreign(self):
        k = self.kernel
        return (
            sorted((r, p) for r, p in k.routes.items() if p != 203),
            sorted((r, p) for r, p in k.rules.items() if p != 203),
            k.iptables.foreign(),
        )

    def leftovers(self) -> list[str]:
        k = self.kernel
        left = [f"tunnel {n}" for n in k.tunnels]
        left += [f"address {a}" for a in sorted(k.ce_addrs)]
        left += [f"route {r}" for r, p in k.routes.items() if p == 203]
        left += [f"rule {r}" for r, p in k.rules.items() if p == 203]
        left += [f"chain {n}" for (_, n) in k.chains if n.startswith("MAPE-")]
        left += [f"jump {r}" for rules in k.builtin.values() for r in rules if "MAPE-" in r]
        left += ["nft table ip mape"] if k.nft else []
        return left


@pytest.fixture(params=["auto", "nftables"])
def world(tmp_path, request):
    return FakeWorld(tmp_path / "state", request.param)
