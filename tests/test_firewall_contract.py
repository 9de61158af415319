"""One contract for every netfilter backend: the fake, iptables-nft (restore) and the legacy
xtables (python-iptables). The real ones run on this machine's kernel in a fresh namespace."""

from __future__ import annotations

import re
import subprocess
from ipaddress import IPv6Address

import pytest

from mape_daemon import desired, maprules
from mape_daemon.actions import Words
from mape_daemon.config import parse
from mape_daemon.mapcalc import compute
from mape_daemon.plan import diff_firewall
from mape_daemon.state import BUILTIN_CHAINS, State
from tests.fake_kernel import FakeChains
from tests.hostns import fresh_netns

CFG = parse('[wan]\ninterface = "wan0"\n[pppoe]\nlan_interfaces = ["lan0"]\nhosts = ["192.168.1.55/32"]\n')
COUNTERS = re.compile(r"\[\d+:\d+\]")
LINKS = frozenset({"wan0", "lan0", "ppp0"})


def params(address: str):
    addr = IPv6Address(address)
    return compute(maprules.bundled().match(addr), addr)


OCN_A, OCN_B = params("2400:4050:1234:5600::1"), params("2400:4050:1234:9a00::1")


class RealHarness:
    def __init__(self, fw, binary: str):
        self.fw, self.binary = fw, binary

    def iptables(self, *args: str) -> None:
        subprocess.run([self.binary, "-w", *args], check=True, capture_output=True)

    def save(self) -> str:
        return subprocess.run([f"{self.binary}-save"], check=True, capture_output=True, text=True).stdout

    def foreign(self) -> list[str]:
        """Every rule and user chain in iptables-save that is not ours (tables that merely came
        into being, built-in policies and counters aside)."""
        out, table = [], ""
        for line in self.save().splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif "MAPE-" in line:
                continue
            elif line.startswith("-A ") or (line.startswith(":") and line.split()[0][1:] not in BUILTIN_CHAINS):
                out.append(f"{table} {COUNTERS.sub('', line)}")
        return sorted(out)


class FakeHarness:
    def __init__(self):
        self.fw = FakeChains()

    def iptables(self, *args: str) -> None:
        self.fw.iptables(*args)

    def foreign(self) -> list[str]:
        return self.fw.foreign()

    def save(self) -> str:
        return "\n".join(f"{t} {c} {r}" for (t, c), rs in self.fw.builtin.items() for r in rs)


@pytest.fixture(params=["fake", "iptables-nft", "iptables-legacy"])
def h(request):
    if request.param == "fake":
        yield FakeHarness()
        return
    with fresh_netns():
        if request.param == "iptables-nft":
            from mape_daemon.kernel.netfilter_restore import RestoreChains

            yield RealHarness(RestoreChains("iptables-nft"), "iptables-nft")
        else:
            from mape_daemon.kernel.netfilter_iptc import IptcChains

            yield RealHarness(IptcChains(), "iptables-legacy")


def sync(h, p=OCN_A, cfg=CFG):
    """One firewall pass; returns (writes, changes)."""
    want = desired.build(cfg, p, LINKS) if p else State()
    chains, jumps = h.fw.normalize(want.chains, want.jumps)
    have_chains, have_jumps = h.fw.observe()
    changes = diff_firewall(State(chains=chains, jumps=jumps), State(chains=have_chains, jumps=have_jumps))
    before = h.fw.writes
    for change in changes:
        h.fw.apply(change)
    return h.fw.writes - before, changes


def test_converge_then_noop(h):
    writes, changes = sync(h)
    assert writes == 3 and {c.table for c in changes} == {"filter", "nat", "mangle"}
    assert sync(h) == (0, [])


def test_flushed_chain_is_repaired_alone(h):
    sync(h)
    h.iptables("-t", "nat", "-F", "MAPE-SNAT-TCP")
    writes, changes = sync(h)
    assert writes == 1
    (change,) = changes
    assert (change.table, [c.name for c in change.replace], change.add_jumps, change.del_jumps) == (
        "nat", ["MAPE-SNAT-TCP"], (), ()
    )  # fmt: skip
    assert len(change.replace[0].rules) == 63
    # The journal names it by its words on every backend (the legacy one lost them in normalize).
    assert change.journal(Words()) == ["SNAT for tcp restored (63 rules): the chain was empty"]
    assert sync(h) == (0, [])


def test_deleted_jump_is_restored_alone(h):
    sync(h)
    h.iptables("-t", "mangle", "-F", "FORWARD")
    writes, (change,) = sync(h)
    assert writes == 1 and change.table == "mangle" and not change.replace and len(change.add_jumps) == 1


def test_renumbering_rewrites_only_the_snat_chains(h):
    sync(h, OCN_A)
    _writes, (change,) = sync(h, OCN_B)
    assert change.table == "nat" and {c.name for c in change.replace} == {
        "MAPE-SNAT-TCP",
        "MAPE-SNAT-UDP",
        "MAPE-SNAT-ICMP",
    }
    assert "153.240.72.210" in change.replace[0].rules[0]
    assert sync(h, OCN_B) == (0, [])


def test_foreign_rules_and_chains_survive_sync_and_teardown_byte_for_byte(h):
    h.iptables("-t", "nat", "-N", "USER-NAT")
    h.iptables("-t", "nat", "-A", "USER-NAT", "-j", "RETURN")
    h.iptables("-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")  # a catch-all, as many routers have
    h.iptables("-t", "mangle", "-A", "PREROUTING", "-i", "lan0", "-j", "MARK", "--set-xmark", "0x3e8/0xffffffff")
    before = h.foreign()
    sync(h)
    # Our jump sits above the user's catch-all MASQUERADE, which would otherwise take tunnel traffic.
    post = [line for line in h.save().splitlines() if "POSTROUTING" in line and ("MAPE-SNAT" in line or "MASQ" in line)]
    assert "MAPE-SNAT" in post[0] and "MASQUERADE" in post[-1]
    assert h.foreign() == before
    writes, _ = sync(h, None)
    assert writes == 3
    assert h.foreign() == before
    assert h.fw.observe() == (frozenset(), ())


def test_applying_a_change_twice_still_converges(h):
    _, changes = sync(h)
    for change in changes:
        h.fw.apply(change)  # a retry after a lost answer: jumps are now doubled
    writes, changes = sync(h)
    assert writes == 3 and all(c.del_jumps and not c.replace for c in changes)
    assert sync(h) == (0, [])


# Every ASCII punctuation the kernel allows in a name and the config accepts (not / : % " ' \ *,
# nor a trailing +): each must survive the way into nftables and iptables text and back.
SPECIAL = "!#$&()+,-.;<=>?@[]^_`{|}~"


@pytest.mark.parametrize("backend", ["nftables", "iptables-nft", "iptables-legacy"])
def test_interface_names_with_every_allowed_special_character_load_and_read_back_as_written(backend):
    """Before: a name with a quote went into the text as is, and every sync failed. Names with the
    characters the config accepts are loaded on the real kernel and a second pass changes nothing."""
    from mape_daemon.kernel.nftables import NftTable

    for c in SPECIAL:
        lan, ppp, tunnel = f"l{c}0", f"p{c}0", f"t{c}0"
        cfg = parse(f'[wan]\ninterface = "wan0"\n[tunnel]\nname = "{tunnel}"\n[lan]\ninterfaces = ["{lan}"]\n'
                    f'[pppoe]\ninterface = "{ppp}"\nhosts = ["192.168.1.55"]\n')  # fmt: skip
        with fresh_netns():
            want = desired.build(cfg, OCN_A, {"wan0", lan, ppp}, native=backend == "nftables")
            table = NftTable()
            table.replace(want.nft)  # the guard and inbound policy (or everything, on nftables)
            listed = table.observe()
            assert listed is not None and table.expected(want.nft) == listed, c
            written = [name for name in (lan, ppp, tunnel) if f'"{name}"' in want.nft]
            assert tunnel in written and all(f'"{name}"' in listed for name in written), (c, listed)
            if backend == "nftables":
                continue
            h = RealHarness(*(
                (_restore(), "iptables-nft") if backend == "iptables-nft" else (_iptc(), "iptables-legacy")
            ))  # fmt: skip
            writes, _ = sync(h, cfg=cfg)
            assert writes == 3 and sync(h, cfg=cfg) == (0, []), c  # read back exactly as written
            saved = h.save()
            assert f"-i {lan} " in saved and f"-o {tunnel} " in saved and f"-o {ppp} " in saved, (c, saved)


def _restore():
    from mape_daemon.kernel.netfilter_restore import RestoreChains

    return RestoreChains("iptables-nft")


def _iptc():
    from mape_daemon.kernel.netfilter_iptc import IptcChains

    return IptcChains()
