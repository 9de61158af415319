"""The reconciler contract, run against the fake kernel (tests/test_reconciler_contract_fake.py)
and the real one in the lab (tests/kernel/test_reconciler_contract_real.py): each of those files
provides a `world` fixture and imports the tests below, so the fake cannot drift from the kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pytest

from mape_daemon.actions import FirewallChange, NetAction, NftChange
from mape_daemon.config import Config, parse
from mape_daemon.reconciler import KernelPort, Reconciler
from mape_daemon.record import RecordFile

CONFIG_TEXT = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\nhosts = ["192.168.1.55/32"]\n'
CE = "2400:4050:1234:5600:99:f048:d100:1600"


class World(Protocol):
    kernel: KernelPort
    state_dir: Path
    backend: str  # the config's firewall.backend: iptables-nft or auto (chains), nftables (our table only)

    def damage(self, what: str) -> None: ...
    def add_foreign(self) -> None: ...
    def foreign(self) -> object: ...
    def leftovers(self) -> list[str]: ...


def config(backend: str = "auto") -> Config:
    return parse(CONFIG_TEXT + f'[firewall]\nbackend = "{backend}"\n')


def kinds(plan) -> set[str]:
    out = set()
    for a in plan.actions:
        if isinstance(a, FirewallChange):
            out.add(a.table)
        elif isinstance(a, NftChange):
            out.add("nft")
        elif isinstance(a, NetAction):
            out.add(type(a.obj).__name__.lower())
        else:
            out.add(type(a).__name__.lower())
    return out


def reconciler(world: World, cfg: Config | None) -> Reconciler:
    return Reconciler(cfg, world.kernel, RecordFile(world.state_dir))


def converge(world: World, cfg: Config) -> Reconciler:
    r = reconciler(world, cfg)
    result = r.sync()
    assert result.ok, result.error
    assert result.params is not None and str(result.params.ce_ipv6) == CE
    return r


def check_converge_then_noop(world: World, cfg: Config) -> None:
    r = converge(world, cfg)
    second = r.sync()
    assert second.ok and not second.plan, str(second.plan)
    assert second.writes == 0


DRIFT = {
    "tunnel-deleted": {"tunnel", "address", "route", "egressguard"},  # the guard goes with the device
    "tunnel-remote-changed": {"tunnel", "address", "route", "egressguard"},
    "tunnel-down": {"tunnel", "route"},
    "snat-flushed": {"nat", "conntrackcleanup"},
    "guard-deleted": {"nft", "conntrackcleanup"},
    "fwmark-rule-deleted": {"routingrule"},
    "ce-address-deleted": {"address"},
    "egress-guard-deleted": {"egressguard"},  # its clsact qdisc deleted (tc qdisc del): the filter with it
}


def check_drift_repaired_alone(world: World, cfg: Config, what: str) -> None:
    r = converge(world, cfg)
    world.damage(what)
    result = r.sync()
    assert result.ok, result.error
    # With the nftables backend SNAT is a chain of our table, which is replaced whole.
    want = {"nft", "conntrackcleanup"} if what == "snat-flushed" and world.backend == "nftables" else DRIFT[what]
    assert kinds(result.plan) == want, str(result.plan)
    assert r.sync().writes == 0


def check_foreign_untouched(world: World, cfg: Config) -> None:
    """Another program's routes (a default in main at our metric, one in table 10), its rule
    beside ours and its chains survive a sync and the teardown byte for byte; the route slot it
    holds is reported as a conflict, not taken."""
    world.add_foreign()
    before = world.foreign()
    r = reconciler(world, cfg)
    result = r.sync()
    assert result.ok, result.error
    assert any("route slot taken" in c and "nodefaultroute" in c for c in result.conflicts), result.conflicts
    assert world.foreign() == before, (world.foreign(), before)
    again = r.sync()
    assert again.writes == 0 and not again.plan, str(again.plan)
    assert r.sync(teardown=True).ok
    assert world.foreign() == before, (world.foreign(), before)
    left = world.leftovers()
    assert left == [], left


def check_primitives_are_idempotent(world: World, cfg: Config) -> None:
    """Every action applied twice (add twice, delete twice) is no error, and a sync converges."""
    r = reconciler(world, cfg)
    with world.kernel.session():
        plan = r.compute().plan
        for action in plan.actions:
            action.note_intent(r.record, r.kernel.observe(r.query()).rp_filter, r.kernel.backend)
            world.kernel.apply(action)
            world.kernel.apply(action)  # a retry after an answer that was lost
    r.records.save()
    first = r.sync()
    assert first.ok, first.error
    assert not r.sync().plan, str(first.plan)
    with world.kernel.session():
        teardown = r.compute(teardown=True).plan
        for action in teardown.actions:
            world.kernel.apply(action)
            world.kernel.apply(action)
    left = world.leftovers()
    assert left == [], left


def check_cleanup_without_config_after_config_changes(world: World, cfg: Config) -> None:
    """What we own is found by the record: a config that names another WAN tunnel, or none at
    all, still removes everything we made."""
    converge(world, cfg)
    renamed = parse(CONFIG_TEXT.replace("[pppoe]", '[tunnel]\nname = "mape0"\n[pppoe]')
                    + f'[firewall]\nbackend = "{world.backend}"\n')  # fmt: skip
    r = reconciler(world, renamed)
    result = r.sync()
    assert result.ok, result.error
    assert r.sync().writes == 0
    result = reconciler(world, None).sync(teardown=True)
    assert result.ok, result.error
    left = world.leftovers()
    assert left == [], left


def test_converge_then_noop(world):
    check_converge_then_noop(world, config(world.backend))


@pytest.mark.parametrize("what", sorted(DRIFT))
def test_drift_repaired_alone(world, what):
    check_drift_repaired_alone(world, config(world.backend), what)


def test_foreign_untouched(world):
    check_foreign_untouched(world, config(world.backend))


def test_primitives_are_idempotent(world):
    check_primitives_are_idempotent(world, config(world.backend))


def test_cleanup_without_config_after_config_changes(world):
    check_cleanup_without_config_after_config_changes(world, config(world.backend))
