"""The service's decisions (reload, stop, cannot-run-here, what the journal says) over the fake
kernel; the lab tests run the same service against the real one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from mape_daemon.actions import NetAction
from mape_daemon.config import parse
from mape_daemon.errors import EXIT_FAILURE, EXIT_UNAVAILABLE
from mape_daemon.record import RecordFile
from mape_daemon.service import Service
from tests.fake_kernel import FakeKernel

BASE = '[wan]\ninterface = "wan0"\n[lan]\ninterfaces = ["lan0"]\n[pppoe]\n'
SLAAC = "2400:4050:1234:5600:5054:ff:fe12:3456"


@pytest.fixture
def svc(tmp_path):
    k = FakeKernel(("wan0", "wan1", "lan0", "ppp0"))
    k.slaac(SLAAC)
    path = tmp_path / "mape.toml"
    path.write_text(BASE)
    s = Service(str(path), parse(BASE), RecordFile(tmp_path / "run"), lambda cfg: k, tmp_path / "run")
    s.kernel = k
    return s


def sync(svc, cause="event") -> bool:
    return asyncio.run(svc.sync_once(cause))


def test_a_reload_that_changes_what_we_own_removes_the_old_state_first(svc, tmp_path):
    assert sync(svc, "start")
    k = svc.kernel
    old_ce = set(k.ce_addrs)
    (tmp_path / "mape.toml").write_text(BASE.replace('"wan0"', '"wan1"').replace("[pppoe]", "") + "[tunnel]\n"
                                        'name = "mape0"\n')  # fmt: skip
    svc.reload()
    k.wan = "wan1"
    assert sync(svc, "reload")
    assert svc.config.wan.interface == "wan1" and set(k.tunnels) == {"mape0"}
    assert not (old_ce & k.ce_addrs) and not any(r.table == 10 for r in k.routes)  # no PPPoE any more


def test_a_reload_whose_removal_fails_keeps_the_running_config_and_retries(svc, tmp_path, caplog):
    assert sync(svc, "start")
    k = svc.kernel
    (tmp_path / "mape.toml").write_text(BASE + '[tunnel]\nname = "mape0"\n')
    svc.reload()
    k.fail_on = NetAction
    with caplog.at_level(logging.ERROR, "mape-daemon"):
        assert not sync(svc, "reload")
    assert "the old config stays and the reload is retried" in caplog.text
    assert svc.config.tunnel.name == "ip6tnl1" and svc.pending is not None
    assert sync(svc, "retry")  # the removal works now: the new config is in place
    assert svc.config.tunnel.name == "mape0" and set(k.tunnels) == {"mape0"}


def test_a_half_failed_removal_puts_the_old_state_back_whole(svc, tmp_path, caplog):
    """Before: a reload whose teardown failed halfway left IPv4 down (routes and rules gone, the
    tunnel left) for the whole back-off, or for good."""
    assert sync(svc, "start")
    k = svc.kernel
    whole = k.snapshot()
    (tmp_path / "mape.toml").write_text(BASE + '[tunnel]\nname = "mape0"\n')
    svc.reload()
    k.fail_kind = "tunnel"  # rules, routes and addresses go first; then the tunnel's removal fails
    with caplog.at_level(logging.ERROR, "mape-daemon"):
        assert not sync(svc, "reload")
    assert "its state was put back, the old config stays and the reload is retried" in caplog.text
    assert k.snapshot() == whole and svc.config.tunnel.name == "ip6tnl1"
    assert sync(svc, "retry") and set(k.tunnels) == {"mape0"}


def test_a_reload_that_adds_a_pppoe_host_is_a_plain_diff(svc, tmp_path):
    """Before: any change under [pppoe] or [lan] tore everything down (the tunnel recreated, every
    connection of the mapping deleted, miniupnpd restarted)."""
    assert sync(svc, "start")
    k = svc.kernel
    tunnel, cleanups = k.tunnels["ip6tnl1"], len(k.cleanups)
    (tmp_path / "mape.toml").write_text(BASE + 'hosts = ["192.168.1.55"]\n')
    svc.reload()
    assert sync(svc, "reload")
    changed = [a for a in svc.last.plan.actions]
    assert changed and all(a.kind in ("firewall", "nft", "conntrack") for a in changed), changed
    assert k.tunnels["ip6tnl1"] is tunnel  # never deleted: the same object the first sync made
    assert not any(c.drop_ipv4 for c in k.cleanups[cleanups:])  # the mapping's connections stay
    assert any("-s 192.168.1.55/32" in r for (t, n), rules in k.chains.items() for r in rules)


def test_the_newest_config_wins_even_when_a_sighup_arrives_during_the_switch(svc, tmp_path, caplog):
    """Before: a SIGHUP that arrived while the previous reload was being applied was lost (its
    config overwritten with None), and the journal still said applied."""
    assert sync(svc, "start")
    path, real = tmp_path / "mape.toml", svc.configs.switch

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()

        def slow_switch(new):
            path.write_text(BASE + "[tunnel]\nmtu = 1400\n")  # the third SIGHUP's file
            loop.call_soon_threadsafe(svc.reload)
            time.sleep(0.3)  # the loop runs the handler meanwhile
            return real(new)

        svc.configs.switch = slow_switch
        return await svc.sync_once("reload")

    for mtu in (1420, 1410):  # two SIGHUPs before the sync
        path.write_text(BASE + f"[tunnel]\nmtu = {mtu}\n")
        svc.reload()
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(scenario())
    assert svc.kernel.tunnels["ip6tnl1"].mtu == 1410 and svc.pending is not None
    svc.configs.switch = real
    assert sync(svc, "reload") and svc.kernel.tunnels["ip6tnl1"].mtu == 1400 and svc.pending is None
    assert caplog.text.count("applied") == 1  # the one whose config reached the kernel by then


def test_a_bad_reload_after_a_good_one_says_which_config_stays(svc, tmp_path, caplog):
    (tmp_path / "mape.toml").write_text(BASE + "[tunnel]\nmtu = 1400\n")
    svc.reload()
    (tmp_path / "mape.toml").write_text("[wan\n")
    with caplog.at_level(logging.ERROR, "mape-daemon"):
        svc.reload()
    assert "staying with the previous reload's config (newer, good, about to be applied)" in caplog.text
    assert sync(svc, "reload") and svc.kernel.tunnels["ip6tnl1"].mtu == 1400


def test_stop_says_what_teardown_did_and_fails_when_it_failed(svc, caplog):
    assert sync(svc, "start")
    svc.kernel.fail_on = NetAction
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(svc.stop()) == EXIT_FAILURE
    assert "removing our state failed after 0 of" in caplog.text
    assert asyncio.run(svc.stop()) == 0 and not svc.kernel.tunnels


def test_no_ip6tnl_in_the_kernel_stops_with_exit_69(svc, caplog):
    svc.kernel.ip6tnl = False
    with caplog.at_level(logging.ERROR, "mape-daemon"):
        assert not sync(svc, "start")
    assert svc.exit_code == EXIT_UNAVAILABLE and "this host cannot run mape-daemon" in caplog.text
    assert svc.runner._stopping


def test_the_journal_names_each_repair_and_its_cause(svc, caplog):
    assert sync(svc, "start")
    k = svc.kernel
    k.apply_del_tunnel("ip6tnl1")
    k.iptables.iptables("-t", "nat", "-F", "MAPE-SNAT-TCP")
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert sync(svc, "event")
    lines = [(r.message, r.MAPE_EVENT, r.MAPE_CAUSE) for r in caplog.records]
    assert ("tunnel ip6tnl1 recreated with its addresses and routes: it was missing", "repair", "event") in lines
    assert ("SNAT for tcp restored (63 rules): the chain was empty", "repair", "event") in lines
    caplog.clear()
    assert sync(svc, "periodic") and caplog.records == []  # quiet when nothing changed
    assert svc.journal.repairs == {"event": 1}  # one repair sync, set off by an event


def test_an_nftables_commit_by_one_of_our_threads_is_no_news_and_another_process_s_is(svc):
    """Before: our syncs commit our table from a worker thread, the kernel names that thread, and
    each of our own commits came back as news: an extra sync, and a wrong trigger on the next."""
    import os
    import threading

    tid: list[int] = []
    hold = threading.Event()
    worker = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), hold.wait(10)))
    worker.start()
    try:
        while not tid:
            threading.Event().wait(0.01)
        assert tid[0] != os.getpid()
        svc.on_nftables(7, tid[0])
        svc.on_nftables(8, os.getpid())
        assert "nftables" not in svc.runner.schedule.causes
        svc.on_nftables(9, 1)  # init (or any other process) committed
        assert "nftables" in svc.runner.schedule.causes
    finally:
        hold.set()
        worker.join()


@pytest.mark.parametrize(("backend", "configured", "period"), [
    ("nftables", None, 900), ("iptables-nft", None, 900), ("iptables-legacy", None, 60),
    ("iptables-legacy", 600, 600), ("nftables", 30, 30),
])  # fmt: skip
def test_the_full_check_is_rare_where_netfilter_announces_changes(tmp_path, backend, configured, period):
    k = FakeKernel(("wan0",))
    k.backend = backend
    text = '[wan]\ninterface = "wan0"\n' + (f"[daemon]\nsync_interval = {configured}\n" if configured else "")
    s = Service(str(tmp_path / "mape.toml"), parse(text), RecordFile(tmp_path / "run"), lambda cfg: k, tmp_path)
    assert s.runner.schedule.period == period


def test_a_state_folder_that_cannot_be_written_is_said_once_and_the_loop_and_kernel_state_go_on(svc, tmp_path, caplog):
    """Before: an error writing /run/mape-daemon (ENOSPC, a read-only mount) escaped the sync and
    ended the loop."""
    assert sync(svc, "start")
    whole = svc.kernel.snapshot()
    svc.state_dir = tmp_path / "full"
    svc.state_dir.write_text("not a folder")  # every write below it fails, as on a full /run
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert sync(svc, "periodic") and sync(svc, "retry")  # no exception: the loop goes on
        assert caplog.text.count("cannot write the state file") == 1  # said once, not at every retry
        assert svc.runner.schedule.wakes["retry"] > 0 and svc.kernel.snapshot() == whole
        svc.state_dir = tmp_path / "run"
        assert sync(svc, "retry") and "the state file is written again" in caplog.text
    assert json.loads((tmp_path / "run" / "state.json").read_text())["ok"]


def test_error_means_a_person_must_act_passing_races_are_retried_quietly(svc, caplog):
    """Before: every failed sync was an ERROR line, also ppp0 vanishing mid-sync or the kernel
    changing during a read, ordinary on a busy router."""
    from mape_daemon.errors import ConflictError, RetryableError

    assert sync(svc, "start")
    k = svc.kernel
    k.apply_del_tunnel("ip6tnl1")
    with caplog.at_level(logging.INFO, "mape-daemon"):
        for _ in range(2):
            k.fail_kind = "tunnel"  # a passing race, twice
            assert not sync(svc, "retry")
        assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]
        assert "sync did not finish" in caplog.text and caplog.records[0].MAPE_EVENT == "retry"
        k.fail_kind = "tunnel"
        assert not sync(svc, "retry")  # the third in a row: it persists, a person should look
        assert caplog.records[-1].levelname == "ERROR" and "(3 times in a row)" in caplog.text
        assert sync(svc, "retry") and "syncs work again after 3 failure(s)" in caplog.text
        caplog.clear()
        k.apply_del_tunnel("ip6tnl1")
        k.links["ip6tnl1"] = "gre"  # another program's device holds the name: not a passing race
        assert not sync(svc, "event")
        assert [r.levelname for r in caplog.records if r.levelname != "INFO"] == ["ERROR"]
    assert isinstance(svc.last.error, ConflictError) and not isinstance(svc.last.error, RetryableError)


def test_ready_follows_the_first_sync_attempt_even_when_it_fails(svc, monkeypatch):
    """Before: READY=1 only after a successful sync, so a first sync that kept failing let
    systemd's start timeout stop the unit, tear down what was made and restart it, in a loop."""
    from mape_daemon import service

    said: list[str] = []
    monkeypatch.setattr(service, "notify", said.append)
    svc.kernel.links["ip6tnl1"] = "gre"  # another program's device holds the tunnel's name
    assert not sync(svc, "start")
    assert "READY=1" in said and any(m.startswith("STATUS=") and "error:" in m for m in said), said
    said.clear()
    assert not sync(svc, "retry") and "READY=1" not in said  # once is enough
    del svc.kernel.links["ip6tnl1"]
    assert sync(svc, "retry") and any("tunnel up" in m for m in said)


def test_a_foreign_commit_to_another_programs_table_is_no_news(svc):
    """Before: every nf_tables commit of another process (fail2ban, crowdsec, docker, kube-proxy)
    set off a full sync (three iptables-nft-save forks on iptables-nft)."""
    causes = svc.runner.schedule.causes
    causes.clear()
    svc.on_nftables(7, 1, frozenset({("inet", "f2b-table")}))
    assert "nftables" not in causes
    svc.on_nftables(8, 1, frozenset({("inet", "f2b-table"), ("ip", "mape")}))  # `nft flush ruleset` names ours too
    assert "nftables" in causes
    causes.clear()
    svc.on_nftables(9, 1, frozenset({("ip", "nat")}))  # iptables-nft's nat table: ours only on that backend
    assert "nftables" not in causes
    svc.records.record.backend = "iptables-nft"
    svc.on_nftables(10, 1, frozenset({("ip", "nat")}))
    assert "nftables" in causes


def test_a_host_that_cannot_run_it_never_says_ready(svc, monkeypatch):
    """`systemctl start` must fail with 69 there, not report a start and then a failure."""
    from mape_daemon import service

    said: list[str] = []
    monkeypatch.setattr(service, "notify", said.append)
    svc.kernel.ip6tnl = False
    assert not sync(svc, "start")
    assert "READY=1" not in said and svc.exit_code == EXIT_UNAVAILABLE


def test_a_good_reload_asks_for_a_sync_at_once_and_a_bad_one_for_none(svc, tmp_path):
    """test_runner sets `urgent` by hand; this shows that a SIGHUP's good config is what sets it
    (so a reload is applied even during a retry backoff), and that a bad file sets nothing."""
    assert sync(svc, "start")
    schedule = svc.runner.schedule
    schedule.causes.clear()
    (tmp_path / "mape.toml").write_text("[wan\n")
    svc.reload()
    assert not schedule.urgent and "reload" not in schedule.causes and svc.pending is None
    (tmp_path / "mape.toml").write_text(BASE + "[tunnel]\nmtu = 1400\n")
    svc.reload()
    assert schedule.urgent and "reload" in schedule.causes and svc.pending is not None
    schedule.failures = 5  # in the middle of a backoff
    assert schedule.wait(schedule.last_start or 0.0) == 0


def test_apply_and_cleanup_refuse_beside_a_running_daemon(tmp_path, monkeypatch, capsys):
    """README: `apply` and `cleanup` refuse while a daemon holds the state folder's lock (they
    would fight it), with a message that names it; nothing is read from the kernel."""
    from mape_daemon import cli
    from mape_daemon.record import exclusive

    monkeypatch.setattr(cli, "state_dir", lambda: tmp_path)
    monkeypatch.setattr(cli, "make_reconciler", lambda *a: pytest.fail("the kernel was touched"))
    path = tmp_path / "mape.toml"
    path.write_text(BASE)
    with exclusive(tmp_path, "running a second daemon"):  # what `mape-daemon run` holds
        for command in ("apply", "cleanup"):
            assert cli.main([command, "-c", str(path)]) == cli.EXIT_FAILURE
            err = capsys.readouterr().err
            assert f"another mape-daemon (pid {os.getpid()}) is managing this router" in err, err
            assert f"mape-daemon {command} would fight it: stop it first" in err


def test_on_stop_keep_leaves_our_state_and_its_record(svc, tmp_path, caplog):
    """README: with daemon.on_stop = "keep" a stop removes nothing, and says so."""
    (tmp_path / "mape.toml").write_text(BASE + '[daemon]\non_stop = "keep"\n')
    svc.reload()
    assert sync(svc, "reload")
    whole = svc.kernel.snapshot()
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(svc.stop()) == 0
    assert "our state stays (daemon.on_stop = keep)" in caplog.text
    assert svc.kernel.snapshot() == whole and svc.records.record.tunnels == ["ip6tnl1"]


def test_a_stop_whose_read_races_a_change_reads_again(svc, caplog):
    """CI saw a stop on a churning router give up on 'it changed during the read' and exit 1
    with everything left in place. Two such reads are read again; a third is given up."""
    assert sync(svc, "start")
    svc.kernel.read_races = 2
    assert asyncio.run(svc.stop()) == 0 and not svc.kernel.tunnels
    assert sync(svc, "start")
    svc.kernel.read_races = 3
    with caplog.at_level(logging.INFO, "mape-daemon"):
        assert asyncio.run(svc.stop()) == EXIT_FAILURE
    assert "it changed during the read" in caplog.text
