"""The sync schedule: coalescing, minimum interval, backoff, periodic full sync, causes, reload
urgency, hold-down wake-ups and the watchdog's health (time by hand)."""

from __future__ import annotations

import asyncio

import pytest

from mape_daemon.runner import Runner, Schedule


def test_first_sync_is_immediate_then_periodic():
    s = Schedule(min_interval=0.5, period=60)
    assert s.wait(100.0) == 0 and s.cause(100.0) == "start"
    s.started(100.0)
    s.finished(True, 101.0)
    assert s.wait(100.0) == 60
    assert s.wait(159.0) == 1 and s.cause(160.0) == "periodic"


def test_a_burst_of_triggers_is_one_sync_after_the_minimum_interval():
    s = Schedule(min_interval=0.5, period=60)
    s.started(10.0)
    s.finished(True, 10.0)
    for _ in range(20):
        s.causes.add("netlink")  # twenty events in a row
    assert s.wait(10.1) == pytest.approx(0.4) and s.cause(10.5) == "event"
    s.started(10.5)
    s.finished(True, 10.5)
    assert s.wait(10.5) == 60  # all twenty were served by that one sync


def test_failures_back_off_exponentially_up_to_the_cap_and_success_resets():
    s = Schedule(min_interval=0.5, backoff_first=1, backoff_max=8)
    delays = []
    for i in range(6):
        s.started(float(i * 100))
        s.finished(False, float(i * 100))
        delays.append(s.wait(float(i * 100)))
    assert delays == [1, 2, 4, 8, 8, 8] and s.cause(600.0) == "retry"
    s.started(1000.0)
    s.finished(True, 1000.0)
    assert s.wait(1000.0) == s.period


def test_a_reload_runs_at_once_even_during_a_backoff():
    """Before: READY=1 after a reload waited out a running backoff (up to a minute)."""
    s = Schedule(min_interval=0.5, backoff_first=30, backoff_max=60)
    s.started(0.0)
    s.finished(False, 0.0)
    s.failures = 2
    assert s.wait(1.0) > 50
    s.causes.add("reload")
    s.urgent = True
    assert s.wait(1.0) == 0 and s.cause(1.0) == "reload"


def test_a_hold_down_wake_up_is_kept_and_named():
    s = Schedule(min_interval=0.5, period=60)
    s.started(0.0)
    s.finished(True, 0.0)
    s.wake(10.0, "hold-down")
    assert s.wait(0.0) == 10 and s.cause(10.0) == "hold-down"
    s.started(10.0)
    assert s.wake_at is None


def test_the_soonest_wake_up_wins_and_each_keeps_its_own_cause():
    """Before: one wake-up time, so miniupnpd's 60 s retry asked after a 10 s hold-down recheck
    overwrote it: the teardown came 50 s late and was logged as the wrong cause."""
    s = Schedule(min_interval=0.5, period=900)
    s.started(0.0)
    s.finished(True, 0.0)
    s.wake(10.0, "hold-down")
    s.wake(60.0, "retry")  # miniupnpd could not be restarted: try again in a minute
    assert s.wait(0.0) == 10 and s.cause(10.0) == "hold-down"
    s.started(10.0)
    s.finished(True, 10.0)
    assert s.wait(10.0) == 50 and s.cause(60.0) == "retry"  # the later one still stands, with its cause
    s.wake(70.0, "retry")
    assert s.wake_at == 60.0  # a later retry does not postpone the one already asked for
    s.started(60.0)
    assert s.wake_at is None


def test_health_is_the_age_of_the_last_attempt_not_the_loop():
    s = Schedule(period=60)
    assert s.healthy(0.0, bound=130)
    s.started(0.0)
    assert s.healthy(100.0, bound=130)  # a long sync, still within the bound
    assert not s.healthy(131.0, bound=130)  # wedged in a kernel call: no more watchdog pings
    s.finished(False, 131.0)
    assert s.healthy(200.0, bound=130)  # failed, and retried on schedule: alive
    assert not s.healthy(262.0, bound=130)  # no attempt for too long


def test_a_long_period_does_not_hide_a_wedged_sync():
    s = Schedule(period=900)
    s.started(0.0)
    assert s.healthy(299.0, bound=1810)
    assert not s.healthy(301.0, bound=1810)  # stuck for five minutes: stop the pings
    s.finished(True, 301.0)
    assert s.healthy(1000.0, bound=1810)  # idle between full checks is healthy


def test_runner_coalesces_and_stops():
    async def scenario():
        calls = []

        async def sync(cause, triggers):
            calls.append((loop.time(), cause, triggers))
            if len(calls) == 2:
                runner.stop()
            return True

        loop = asyncio.get_running_loop()
        runner = Runner(sync, Schedule(min_interval=0.05, period=3600))
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.01)  # the first sync ran at once
        for _ in range(10):
            runner.trigger()
        await asyncio.wait_for(task, 5)
        return calls

    calls = asyncio.run(scenario())
    assert [(c, t) for _, c, t in calls] == [("start", ()), ("event", ("netlink",))]  # ten triggers, one sync
    assert calls[1][0] - calls[0][0] >= 0.05


def test_an_event_during_a_backoff_brings_the_sync_forward_but_a_storm_no_faster_than_the_bound():
    """Before: a failed sync's backoff (up to a minute) held every event back, so an unrelated
    repair (a tunnel deleted, a CE address removed) waited for it."""
    s = Schedule(min_interval=0.5, backoff_first=1, backoff_max=60, event_in_backoff=2)
    for t in range(7):  # seven failures in a row: the next retry is a minute away
        s.started(float(t))
        s.finished(False, float(t))
    assert s.wait(6.0) == 60
    s.causes.add("netlink")  # news: perhaps what it waited for
    assert s.wait(6.0) == 2 and s.cause(8.0) == "event"
    s.started(8.0)
    s.finished(False, 8.0)
    for _ in range(1000):
        s.causes.add("netlink")  # a storm of events while it keeps failing
    assert s.wait(8.0) == 2  # at most one sync per bound, whatever the storm
