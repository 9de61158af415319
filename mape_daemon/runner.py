"""When to sync: coalesce bursts of triggers, keep a minimum interval between syncs, retry a failed
sync with exponential backoff, run a periodic full sync that catches what sends no event
(`iptables -F` on a legacy host), and wake at a time a sync asked for (the flap hold-down).
Events only say "something changed" and why; the sync re-reads the kernel itself.

The decisions are pure functions of the clock (`Schedule`), so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# Why a sync runs (journal field MAPE_CAUSE), in the order a line names them; events say which
# source set them off (MAPE_TRIGGER): netlink (rtnetlink), nftables (an nf_tables commit by
# someone else), firewalld (its reload or restart).
CAUSES = ("start", "reload", "provisioning", "event", "hold-down", "retry", "periodic")
EVENT_SOURCES = ("netlink", "nftables", "firewalld")


@dataclass
class Schedule:
    min_interval: float = 0.5  # a burst of netlink events becomes one sync
    event_in_backoff: float = 2.0  # an event during a backoff syncs this soon, and a storm no sooner
    period: float = 60.0  # full sync even without events
    backoff_first: float = 1.0
    backoff_max: float = 60.0  # never longer than the period (see Service)
    last_start: float | None = None
    last_end: float | None = None
    running_since: float | None = None
    causes: set[str] = field(default_factory=lambda: {"start"})  # the first sync is due at once
    urgent: bool = False  # a reload: now, whatever the backoff
    wakes: dict[str, float] = field(default_factory=dict)  # cause -> when a sync asked to run again
    failures: int = 0
    wedged_after: float = 300.0  # a sync takes seconds; one running this long is stuck

    def retry_delay(self) -> float:
        return min(self.backoff_max, self.backoff_first * 2 ** max(0, self.failures - 1))

    def due_at(self) -> float:
        """The clock time of the next sync."""
        if self.last_start is None or self.urgent:
            return 0.0
        due = self.last_start + self.period
        if self.failures:
            due = min(due, self.last_start + max(self.min_interval, self.retry_delay()))
            if self.causes:  # news may be what the failed sync waited for (ppp0 up, a link back)
                due = min(due, self.last_start + max(self.min_interval, self.event_in_backoff))
        elif self.causes:
            due = self.last_start + self.min_interval
        if self.wake_at is not None:
            due = min(due, max(self.wake_at, self.last_start + self.min_interval))
        return due

    @property
    def wake_at(self) -> float | None:
        """The soonest wake-up asked for: a later, longer one never hides it."""
        return min(self.wakes.values(), default=None)

    def wake(self, at: float, cause: str) -> None:
        """Run a sync at `at` for `cause`; of two wake-ups for one cause, the sooner stands."""
        self.wakes[cause] = min(at, self.wakes.get(cause, at))

    def wait(self, now: float) -> float:
        return max(0.0, self.due_at() - now)

    def cause(self, now: float) -> str:
        """Why the sync starting now runs: the first of the pending causes."""
        causes = {"event" if c in EVENT_SOURCES else c for c in self.causes}
        if self.failures:
            causes.add("retry")
        causes |= {c for c, at in self.wakes.items() if now >= at}
        if not causes:
            causes.add("periodic")
        return next(c for c in CAUSES if c in causes)

    def triggers(self) -> tuple[str, ...]:
        """The event sources pending for the sync about to start."""
        return tuple(c for c in EVENT_SOURCES if c in self.causes)

    def started(self, now: float) -> None:
        self.last_start, self.running_since = now, now
        self.causes, self.urgent = set(), False
        self.wakes = {c: at for c, at in self.wakes.items() if now < at}  # served now; the later ones stay

    def finished(self, ok: bool, now: float) -> None:
        self.failures = 0 if ok else self.failures + 1
        self.last_end, self.running_since = now, None

    def healthy(self, now: float, bound: float) -> bool:
        """The loop is alive when the last sync attempt is younger than `bound`, and the one
        running (if any) younger than that and than `wedged_after`: a sync wedged in a kernel call
        stops the watchdog pings and systemd restarts us, however long the period."""
        if self.running_since is not None:
            return now - self.running_since < min(bound, self.wedged_after)
        last = self.last_end if self.last_end is not None else self.last_start
        return last is None or now - last < bound


class Runner:
    def __init__(
        self,
        sync: Callable[[str, tuple[str, ...]], Awaitable[bool]],
        schedule: Schedule | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sync = sync
        self.schedule = schedule or Schedule()
        self.clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self.syncs = 0

    def trigger(self, cause: str = "netlink", urgent: bool = False) -> None:
        """Something changed (or a reload asked): sync soon, bursts coalesced."""
        self.schedule.causes.add(cause)
        self.schedule.urgent |= urgent
        self._wake.set()

    def wake_in(self, seconds: float, cause: str) -> None:
        self.schedule.wake(self.clock() + seconds, cause)
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
            now = self.clock()
            cause, triggers = self.schedule.cause(now), self.schedule.triggers()
            self.schedule.started(now)
            ok = await self.sync(cause, triggers)
            self.syncs += 1
            self.schedule.finished(ok, self.clock())


FULL_CHECK, FULL_CHECK_LEGACY = 900.0, 60.0  # default daemon.sync_interval, per backend


def full_check_period(sync_interval: float | None, backend: str) -> float:
    """Seconds between full syncs. Events repair within a second what sends them; the full sync
    is insurance against what does not: a sysctl reset, a lost event, and on iptables-legacy
    (x_tables announce nothing) an `iptables -F` of our chains. It costs a netlink read only
    (the netfilter reading is reused while the nf_tables generation stands still)."""
    if sync_interval is not None:
        return sync_interval
    return FULL_CHECK_LEGACY if backend == "iptables-legacy" else FULL_CHECK
