"""When to sync: coalesce bursts of triggers, keep a minimum interval between syncs, retry a failed
sync with exponential backoff, and run a periodic full sync that catches what sends no event
(`iptables -F`). Events only say "something changed"; the sync re-reads the kernel itself.

The decision is a pure function of the clock (`Schedule.wait`), so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Schedule:
    min_interval: float = 0.5  # a burst of netlink events becomes one sync
    period: float = 60.0  # full sync even without events
    backoff_first: float = 1.0
    backoff_max: float = 60.0
    last_start: float | None = None
    pending: bool = True  # the first sync is due at once
    failures: int = 0

    def retry_delay(self) -> float:
        return min(self.backoff_max, self.backoff_first * 2 ** max(0, self.failures - 1))

    def due_at(self) -> float:
        """The clock time of the next sync."""
        if self.last_start is None:
            return 0.0
        if self.failures:
            return self.last_start + max(self.min_interval, self.retry_delay())
        if self.pending:
            return self.last_start + self.min_interval
        return self.last_start + self.period

    def wait(self, now: float) -> float:
        return max(0.0, self.due_at() - now)

    def started(self, now: float) -> None:
        self.last_start, self.pending = now, False

    def finished(self, ok: bool) -> None:
        self.failures = 0 if ok else self.failures + 1


class Runner:
    def __init__(
        self,
        sync: Callable[[], Awaitable[bool]],
        schedule: Schedule | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sync = sync
        self.schedule = schedule or Schedule()
        self.clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self.syncs = 0

    def trigger(self) -> None:
        """Something changed (or a reload asked): sync soon, bursts coalesced."""
        self.schedule.pending = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            delay = self.schedule.wait(self.clock())
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                continue  # re-plan: a trigger may have moved the due time, or stop was asked
            self.schedule.started(self.clock())
            ok = await self.sync()
            self.syncs += 1
            self.schedule.finished(ok)
