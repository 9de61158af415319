"""The event sources' supervision (events.Events), with sources that fail on cue: a dead watcher
is restarted with backoff and followed by a sync, an overflow is said at most once a minute and
resubscribed at once, and an rtnetlink watcher that cannot subscribe at start ends the daemon
with CannotRunHere (exit 69)."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from mape_daemon import events as events_mod
from mape_daemon.errors import CannotRunHere
from mape_daemon.events import Events
from mape_daemon.runner import Runner


def make() -> Events:
    async def sync(cause, triggers):
        return True

    return Events(Runner(sync), lambda pid: False, lambda: None)


def test_a_dead_watcher_is_restarted_with_backoff_and_each_death_asks_for_a_sync(monkeypatch, caplog):
    ev = make()
    slept: list[float] = []

    async def no_wait(seconds):
        slept.append(seconds)

    runs = {"n": 0}

    async def source(up):
        up()
        runs["n"] += 1
        if runs["n"] <= 4:
            raise RuntimeError("socket closed")
        # the fifth subscription lives on: the test ends here

    async def scenario():
        bound = asyncio.get_running_loop().create_future()
        monkeypatch.setattr(events_mod.asyncio, "sleep", no_wait)
        await ev.supervise("netlink", "netlink", source, bound)
        assert bound.result() is True

    with caplog.at_level(logging.INFO, "mape-daemon"):
        asyncio.run(scenario())
    assert slept == [1.0, 2.0, 4.0, 8.0] and ev.restarts == 4
    assert caplog.text.count("netlink watcher died (RuntimeError: socket closed); restarting it in") == 4
    assert "netlink" in ev.runner.schedule.causes  # a sync: what it might have missed
    died = [r for r in caplog.records if "watcher died" in r.getMessage()]
    assert {(r.MAPE_EVENT, r.MAPE_CAUSE, r.MAPE_TRIGGER) for r in died} == {("watcher", "event", "netlink")}


def test_an_overflow_resubscribes_at_once_and_is_said_at_most_once_a_minute(monkeypatch, caplog):
    ev = make()
    now = [1000.0]
    monkeypatch.setattr(events_mod.time, "monotonic", lambda: now[0])
    runs = {"n": 0}

    async def source(up):
        up()
        runs["n"] += 1
        if runs["n"] <= 5:
            now[0] += 20  # an overflow every 20 s: a BGP table loading
            raise OSError(errno.ENOBUFS, "No buffer space available")

    async def scenario():
        await ev.supervise("netlink", "netlink", source, asyncio.get_running_loop().create_future())

    with caplog.at_level(logging.INFO, "mape-daemon"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(said) == 2, said  # at 20 s and at 80 s: not five lines in 100 s
    assert "3 time(s) since the last such line" in said[1]


def test_a_netlink_watcher_that_cannot_subscribe_at_start_is_cannot_run_here(monkeypatch):
    from mape_daemon.kernel import watch

    async def refused(trigger, up, rcvbuf):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(watch, "watch", refused)
    ev = make()
    with pytest.raises(CannotRunHere, match=r"cannot subscribe to netlink events: .*Operation not permitted"):
        asyncio.run(ev.start(lambda: "ip6tnl1", lambda: None))
