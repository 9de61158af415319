"""The sync schedule: coalescing, minimum interval, backoff, periodic full sync (time by hand)."""

from __future__ import annotations

import asyncio

import pytest

from mape_daemon.runner import Runner, Schedule


def test_first_sync_is_immediate_then_periodic():
    s = Schedule(min_interval=0.5, period=60)
    assert s.wait(100.0) == 0
    s.started(100.0)
    s.finished(True)
    assert s.wait(100.0) == 60
    assert s.wait(159.0) == 1


def test_a_burst_of_triggers_is_one_sync_after_the_minimum_interval():
    s = Schedule(min_interval=0.5, period=60)
    s.started(10.0)
    s.finished(True)
    for _ in range(20):
        s.pending = True  # twenty events in a row
    assert s.wait(10.1) == pytest.approx(0.4)
    s.started(10.5)
    s.finished(True)
    assert s.wait(10.5) == 60  # all twenty were served by that one sync


def test_failures_back_off_exponentially_up_to_the_cap_and_success_resets():
    s = Schedule(min_interval=0.5, backoff_first=1, backoff_max=8)
    delays = []
    for i in range(6):
        s.started(float(i * 100))
        s.finished(False)
        delays.append(s.wait(float(i * 100)))
    assert delays == [1, 2, 4, 8, 8, 8]
    s.started(1000.0)
    s.finished(True)
    assert s.wait(1000.0) == s.period


def test_runner_coalesces_and_stops():
    async def scenario():
        calls = []

        async def sync():
            calls.append(loop.time())
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
    assert len(calls) == 2  # ten triggers, one sync
    assert calls[1] - calls[0] >= 0.05
