"""The event sources, supervised: rtnetlink, nf_tables commits and firewalld's D-Bus signals only
say "something changed" (the runner then syncs, which re-reads the kernel). An overflowed socket
means events were lost, so a full sync runs at once on a fresh subscription; a source that dies is
restarted with backoff; a source that cannot subscribe at start says why."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .errors import CannotRunHere
from .runner import Runner
from .state import TABLES

log = logging.getLogger("mape-daemon")
WATCHER_BACKOFF_MAX = 60.0
OVERFLOW_SAY_EVERY = 60.0  # a storm of route events (a BGP table loading) says so once a minute
NETLINK_RCVBUF = 1 << 20
OUR_TABLES = frozenset({("ip", "mape")})
IPTABLES_NFT_TABLES = frozenset(("ip", t) for t in TABLES)  # where iptables-nft keeps our MAPE-* chains


class Events:
    def __init__(
        self,
        runner: Runner,
        committed_by_child: Callable[[int], bool],
        changed: Callable[[], None],
        our_tables: Callable[[], frozenset[tuple[str, str]]] = lambda: OUR_TABLES,
    ):
        """`committed_by_child`: the kernel adapter's; `changed`: what firewalld says changed (the
        state file shows it); `our_tables`: the nf_tables tables our state lives in now."""
        self.runner, self.committed_by_child, self.changed = runner, committed_by_child, changed
        self.our_tables = our_tables
        self.restarts = 0
        self.overflows: Counter[str] = Counter()  # since the last line that said so, per source
        self.overflow_said: dict[str, float] = {}
        self.own_generation: int | None = None  # the nf_tables generation our last sync left
        self.firewalld: Any = None  # what firewalld says of the tunnel (kernel.firewalld.ZoneState)
        self.firewalld_said: str | None = None
        self.firewalld_recheck = asyncio.Event()  # set after a periodic sync: look at the zone again
        # Test knob: a small netlink buffer, to force an overflow.
        self.rcvbuf = int(os.environ.get("MAPE_DEBUG_NETLINK_RCVBUF", NETLINK_RCVBUF))

    def after_sync(self) -> None:
        from .kernel.nftevents import current_generation

        self.own_generation = current_generation()

    async def start(self, tunnel: Callable[[], str], zone: Callable[[], str | None]) -> list[asyncio.Task]:
        """Subscribe to every source; returns once netlink is subscribed (before the first sync reads
        the kernel, so no event is lost) and the others are, or have said why not."""
        from .kernel import firewalld, nftevents, watch

        loop = asyncio.get_running_loop()
        sources = {  # name: (what it triggers, how to start it)
            "netlink": ("netlink", lambda up: watch.watch(lambda _e: self.runner.trigger("netlink"), up, self.rcvbuf)),
            "nftables": ("nftables", lambda up: nftevents.watch(self.on_nftables, up, self.rcvbuf)),
            "firewalld": ("firewalld", lambda up: firewalld.watch(self.runner.trigger, up, self.on_firewalld,
                                                                  tunnel, zone, self.firewalld_recheck)),
        }  # fmt: skip
        bound = {name: loop.create_future() for name in sources}
        tasks = [asyncio.create_task(self.supervise(name, cause, start, bound[name], needed=name == "netlink"))
                 for name, (cause, start) in sources.items()]  # fmt: skip
        try:
            await bound["netlink"]
        except Exception as e:
            for task in tasks:
                task.cancel()
            raise CannotRunHere(f"cannot subscribe to netlink events: {e}") from None
        for name in ("nftables", "firewalld"):
            try:
                await asyncio.wait_for(bound[name], 10)
            except Exception as e:  # the periodic sync still repairs what these would have told us
                log.warning("no %s events (%s); the periodic sync repairs what they would have told", name,
                            e or type(e).__name__, extra={"MAPE_EVENT": "watcher", "MAPE_CAUSE": name})  # fmt: skip
        return tasks

    async def supervise(
        self,
        name: str,
        cause: str,
        start: Callable[[Callable[[], None]], Any],
        bound: asyncio.Future,
        needed: bool = True,
    ) -> None:
        """Run one event source for good: resubscribed at once after an overflow (events were
        lost, so a full sync runs), restarted with backoff if it dies. `bound` resolves once it is
        subscribed, or fails with the reason it could not be; a source that is not `needed` (the
        periodic sync covers for it) keeps trying to subscribe after that, with backoff."""
        from .kernel import overflowed

        delay = 1.0
        failed_to_start = False

        def subscribed() -> None:
            nonlocal failed_to_start
            if not bound.done():
                bound.set_result(True)
            elif failed_to_start:
                log.info("%s events: subscribed", name,
                         extra={"MAPE_EVENT": "watcher", "MAPE_CAUSE": "event", "MAPE_TRIGGER": cause})  # fmt: skip
            failed_to_start = False

        while True:
            try:
                await start(subscribed)
                return  # a source with nothing to watch here (no system bus) ends by itself
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not bound.done() or failed_to_start:
                    if not bound.done():
                        bound.set_exception(e)  # start() says why, once
                    if needed:
                        return
                    failed_to_start = True
                    self.restarts += 1
                    await asyncio.sleep(delay)
                    delay = min(WATCHER_BACKOFF_MAX, delay * 2)
                    continue
                overflow = overflowed(e)
                self.restarts += 1
                extra = {"MAPE_EVENT": "watcher", "MAPE_CAUSE": "event", "MAPE_TRIGGER": cause}
                if overflow:
                    self.overflows[name] += 1
                    if time.monotonic() - self.overflow_said.get(name, -OVERFLOW_SAY_EVERY) >= OVERFLOW_SAY_EVERY:
                        log.warning(
                            "%s events overflowed the socket (some were lost; %d time(s) since the last such "
                            "line): full sync, new subscription", name, self.overflows[name], extra=extra,
                        )  # fmt: skip
                        self.overflow_said[name], self.overflows[name] = time.monotonic(), 0
                    delay = 1.0
                else:
                    log.error("%s watcher died (%s: %s); restarting it in %.0f s", name, type(e).__name__, e, delay,
                              extra=extra)  # fmt: skip
                self.runner.trigger(cause)
                if not overflow:
                    await asyncio.sleep(delay)
                    delay = min(WATCHER_BACKOFF_MAX, delay * 2)

    def on_nftables(self, generation: int, pid: int | None, tables: frozenset[tuple[str, str]] | None = None) -> None:
        """A committed nf_tables transaction: news if it touched a table of ours (`tables` None:
        not known, so it may have), unless this process or one of its iptables-restore children
        made it (kernels that do not name the process: newer than our last sync's). The kernel
        names the committing thread, and our syncs commit from a worker thread."""
        if tables is not None and not tables & self.our_tables():
            return  # another program's table only: fail2ban, docker, kube-proxy on a busy host
        if pid is not None:
            ours = (pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}")
                    or self.committed_by_child(pid))  # fmt: skip
        else:
            ours = self.own_generation is not None and generation <= self.own_generation
        if not ours:
            self.runner.trigger("nftables")

    def on_firewalld(self, state: Any) -> None:
        self.firewalld = state
        if state.problem and state.problem != self.firewalld_said:
            extra = {"MAPE_EVENT": "firewalld", "MAPE_CAUSE": "event", "MAPE_TRIGGER": "firewalld"}
            log.warning("firewalld: %s", state.problem, extra=extra)
        self.firewalld_said = state.problem
        self.changed()
