"""The firewalld watcher under supervision, on a real (private) D-Bus daemon: a watcher whose first
subscription fails keeps trying, a bus that stops answering is noticed by the liveness check and
subscribed to anew, and a periodic sync's recheck asks firewalld's view again."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time

import pytest

from mape_daemon.events import Events
from mape_daemon.kernel import firewalld
from mape_daemon.runner import Runner


class Bus:
    def __init__(self, path) -> None:
        self.path, self.proc = path, None

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address=unix:path={self.path}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def bus(tmp_path, monkeypatch):
    b = Bus(tmp_path / "system_bus_socket")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={b.path}")
    yield b
    if b.proc is not None and b.proc.poll() is None:
        b.kill()


def test_the_firewalld_watcher_recovers_from_a_failed_start_and_a_dead_bus(bus, caplog):
    """Before: a watcher that failed before subscribing was never restarted, and one whose bus
    connection dropped waited on its signal queue forever."""

    async def scenario() -> None:
        async def sync(cause, triggers):
            return True

        events = Events(Runner(sync), lambda pid: False, lambda: None)
        seen: list = []
        events.changed = lambda: seen.append(events.firewalld)
        bus.path.write_text("")  # a stale socket file: connecting is refused
        bound = asyncio.get_running_loop().create_future()

        def start(up):
            return firewalld.watch(events.runner.trigger, up, events.on_firewalld, lambda: "ip6tnl1", lambda: None,
                                   events.firewalld_recheck, alive_every=0.3, ask_timeout=2)  # fmt: skip

        task = asyncio.create_task(events.supervise("firewalld", "firewalld", start, bound, needed=False))
        try:
            with pytest.raises(OSError):
                await asyncio.wait_for(bound, 10)  # its first subscription failed ...
            bus.start()
            await until(lambda: seen, 30, "... and it subscribed once the bus was there")
            assert seen[-1] == firewalld.ZoneState(False)  # a bus without firewalld on it

            n = len(seen)
            events.firewalld_recheck.set()  # what a periodic sync does
            await until(lambda: len(seen) > n, 10, "firewalld's view asked again")

            restarts = events.restarts
            bus.kill()  # the connection drops: no signal will ever come
            await until(lambda: events.restarts > restarts, 30, "the liveness check to notice")
            n = len(seen)
            bus.start()
            await until(lambda: len(seen) > n, 60, "a new subscription on the bus that came back")
        finally:
            task.cancel()

    with caplog.at_level(logging.INFO, "mape-daemon"):
        asyncio.run(scenario())
    assert "firewalld events: subscribed" in caplog.text and "firewalld watcher died" in caplog.text
