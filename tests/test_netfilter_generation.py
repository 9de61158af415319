"""A sync that finds nothing changed forks nothing and lists nothing: our netfilter reading is
reused while the nf_tables ruleset generation stands still (host kernel, fresh namespaces)."""

from __future__ import annotations

import subprocess
import time

from mape_daemon.kernel import LinuxKernel
from mape_daemon.kernel.netfilter_iptc import IptcChains
from mape_daemon.kernel.netfilter_restore import RestoreChains
from mape_daemon.kernel.nftables import NftTable
from mape_daemon.state import Query
from tests.hostns import fresh_netns

QUERY = Query("wan0", frozenset(), frozenset(), frozenset(), frozenset({254}))
TABLE = "table ip mape {\n\tchain guard {\n\t\ttype filter hook postrouting priority 300; policy accept;\n\t}\n}\n"


class CountingTable(NftTable):
    listings = 0

    def observe(self) -> str | None:
        self.listings += 1
        return super().observe()


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def test_unchanged_generation_reuses_the_reading_and_any_commit_invalidates_it():
    with fresh_netns():
        fw, nft = RestoreChains("iptables-nft"), CountingTable()
        kernel = LinuxKernel(fw, nft)
        run("iptables-nft", "-t", "nat", "-N", "MAPE-SNAT-TCP")
        nft.replace(TABLE)
        with kernel.session():
            first = kernel.observe(QUERY)
            forks, listings = fw.forks, nft.listings
            again = kernel.observe(QUERY)
            assert (fw.forks, nft.listings) == (forks, listings)  # nothing forked, nothing listed
            assert (again.chains, again.nft) == (first.chains, first.nft)

            run("nft", "add", "table", "inet", "someone-else")  # anyone's commit moves the generation
            kernel.observe(QUERY)
            assert fw.forks > forks and nft.listings > listings

            run("iptables-nft", "-t", "nat", "-A", "MAPE-SNAT-TCP", "-j", "ACCEPT")
            (chain,) = kernel.observe(QUERY).chains
            assert chain.rules == ("-j ACCEPT",)

            run("nft", "delete", "table", "ip", "mape")
            assert kernel.observe(QUERY).nft is None


def test_our_own_commits_keep_the_reading_true_without_reading_again():
    """Before: each of our writes moved the generation, so the next table's change (to prune it)
    and the next sync read every table back: three iptables-save after any sync that wrote."""
    from mape_daemon import desired
    from mape_daemon.plan import diff
    from tests.test_desired_plan import BASE, OCN, parse

    with fresh_netns():
        fw, nft = RestoreChains("iptables-nft"), CountingTable()
        kernel = LinuxKernel(fw, nft)
        want = kernel.normalize(desired.build(parse(BASE), OCN))
        with kernel.session():
            have = kernel.observe(QUERY)
            plan = diff(want, type(want)(chains=have.chains, jumps=have.jumps, nft=have.nft))
            changes = [a for a in plan.actions if a.kind in ("firewall", "nft")]
            assert len(changes) == 4  # nat, mangle, filter, our table
            forks, listings = fw.forks, nft.listings
            for change in changes:
                kernel.apply(change)
            assert fw.forks - forks == len(changes) - 1  # one restore per table, no iptables-save
            believed = kernel.observe(QUERY)
            assert (fw.forks - forks, nft.listings - listings) == (3, 1)  # nothing more: the reading was kept
        fresh = LinuxKernel(RestoreChains("iptables-nft"), NftTable(dict(nft.canonical)))
        with fresh.session():
            read = fresh.observe(QUERY)
        assert (believed.chains, sorted(believed.jumps), believed.nft) == (read.chains, sorted(read.jumps), read.nft)
        assert {c.name for c in read.chains} and read.nft is not None


def test_the_reading_of_one_namespace_is_not_reused_in_another():
    kernel = LinuxKernel(RestoreChains("iptables-nft"))
    seen = []
    for chain in ("MAPE-A", "MAPE-B"):
        with fresh_netns():
            run("iptables-nft", "-t", "nat", "-N", chain)
            with kernel.session():
                seen.append({c.name for c in kernel.observe(QUERY).chains})
    assert seen == [{"MAPE-A"}, {"MAPE-B"}]


def test_legacy_chains_are_read_every_time_they_move_no_generation():
    with fresh_netns():
        kernel = LinuxKernel(IptcChains())
        with kernel.session():
            assert kernel.observe(QUERY).chains == frozenset()
            run("iptables-legacy", "-t", "nat", "-N", "MAPE-SNAT-TCP")
            assert {c.name for c in kernel.observe(QUERY).chains} == {"MAPE-SNAT-TCP"}


def test_a_commit_is_announced_with_its_generation_and_the_committing_pid():
    import asyncio
    import threading

    from mape_daemon.kernel.nftevents import current_generation, watch

    with fresh_netns():
        seen: list[tuple] = []
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        task = loop.create_task(watch(lambda gen, pid, tables: seen.append((gen, pid, tables)), ready.set))
        runner = threading.Thread(target=lambda: loop.run_until_complete(asyncio.wait([task])), daemon=True)
        runner.start()
        assert ready.wait(10)
        proc = subprocess.Popen(["nft", "add", "table", "inet", "someone-else"])
        assert proc.wait(10) == 0
        wait_for_events(seen, 1)
        ours = subprocess.Popen(["nft", "add table ip mape; add chain ip mape c; add table ip6 other"])
        assert ours.wait(10) == 0
        wait_for_events(seen, 2)
        loop.call_soon_threadsafe(task.cancel)
        runner.join(10)
        assert seen[0][1:] == (proc.pid, frozenset({("inet", "someone-else")}))  # the tables each commit touched
        assert seen[1] == (current_generation(), ours.pid, frozenset({("ip", "mape"), ("ip6", "other")}))


def wait_for_events(seen: list, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen) >= n, seen


def test_learned_listings_stay_bounded_in_memory():
    """Before: the canonical listings only grew in memory (the record kept the last 8 on disk)."""
    from mape_daemon.kernel.nftables import CANONICAL_KEPT

    with fresh_netns():
        t = NftTable()
        for i in range(CANONICAL_KEPT + 4):
            t.replace(TABLE.replace("priority 300", f"priority {300 + i}"))
        assert len(t.canonical) == CANONICAL_KEPT
        assert t.expected(TABLE.replace("priority 300", f"priority {300 + CANONICAL_KEPT + 3}")) == t.observe()
