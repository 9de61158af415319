"""`mape-daemon run`: one asyncio loop; netlink events and signals only trigger the runner.

SIGHUP re-reads the config and keeps the running one if the new file is bad; SIGTERM/SIGINT stop
per `daemon.on_stop`. systemd hears READY=1 after the first successful sync, RELOADING=1 and
READY=1 around a reload, STOPPING=1, a STATUS= line, and watchdog pings while the loop runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

from .config import Config, ConfigError, load
from .reconciler import Reconciler, SyncResult
from .runner import Runner, Schedule

log = logging.getLogger("mape-daemon")
STATE_DIR = Path(os.environ.get("MAPE_STATE_DIR", "/run/mape-daemon"))


def setup_logging() -> None:
    """journald with structured fields under systemd; plain stderr otherwise (journald is not
    always running, and systemd-python then drops messages silently)."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="mape-daemon")
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mape-daemon: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon

        daemon.notify(message)


def status_line(result: SyncResult) -> str:
    p = result.params
    if p is None:
        return f"waiting: {result.selection.reason}"
    state = "tunnel up" if result.ok else f"error: {result.error}"
    return f"{p.rule.isp or 'explicit'} {p.ipv4} psid {p.psid}, {p.ports} ports, {state}"


def fields(result: SyncResult, event: str) -> dict[str, str]:
    out = {"MAPE_EVENT": event, "MAPE_CHANGES": str(len(result.plan.actions))}
    if (p := result.params) is not None:
        out |= {"MAPE_PREFIX": str(p.end_user_prefix), "MAPE_IPV4": str(p.ipv4), "MAPE_PSID": str(p.psid)}
    return out


def write_state(result: SyncResult) -> None:
    """A small JSON file for `mape-daemon status`, replaced atomically."""
    p = result.params
    data = {
        "last_sync": result.started,
        "ok": result.ok,
        "error": str(result.error) if result.error else None,
        "changes": len(result.plan.actions),
        "reason": result.selection.reason,
        "prefix": str(p.end_user_prefix) if p else None,
        "isp": p.rule.isp if p else None,
        "rule": str(p.rule.ipv6_prefix) if p else None,
        "ipv4": str(p.ipv4) if p else None,
        "psid": p.psid if p else None,
        "psid_len": p.psid_len if p else None,
        "psid_offset": p.psid_offset if p else None,
        "ce_ipv6": str(p.ce_ipv6) if p else None,
        "ports": p.ports if p else None,
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=STATE_DIR, prefix=".state-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, STATE_DIR / "state.json")


class Service:
    def __init__(self, config_path: str, config: Config, reconciler: Reconciler):
        self.path, self.reconciler = config_path, reconciler
        self.runner = Runner(self.sync_once, Schedule(period=config.daemon.sync_interval))
        self.ready = False
        self.last_ipv4: str | None = None

    async def sync_once(self) -> bool:
        result = await asyncio.to_thread(self.reconciler.sync)
        ipv4 = str(result.params.ipv4) if result.params else None
        event = "prefix-change" if ipv4 != self.last_ipv4 else "sync"
        if result.error is not None and not result.plan:
            log.error("sync failed: %s (retrying)", result.error, extra=fields(result, "error"))
        elif result.error is not None:
            log.error("sync failed after %d of %d changes: %s (retrying)", result.applied,
                      len(result.plan.actions), result.error, extra=fields(result, "error"))  # fmt: skip
        elif result.plan:
            log.info("sync: %s; %d change(s), %d write(s) in %.0f ms", status_line(result), len(result.plan.actions),
                     result.writes, result.seconds * 1000, extra=fields(result, event))  # fmt: skip
        self.last_ipv4 = ipv4
        write_state(result)
        if result.ok and not self.ready:
            self.ready = True
            notify("READY=1")
        notify(f"STATUS={status_line(result)}")
        return result.ok

    def reload(self) -> None:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load(self.path)
        except ConfigError as e:
            log.error("reload: keeping the running config: %s", e, extra={"MAPE_EVENT": "error"})
        else:
            self.reconciler.config = new  # takes effect at the next sync, never halfway through one
            self.runner.schedule.period = new.daemon.sync_interval
            self.runner.trigger()
            log.info("reload: %s applied", self.path)
        notify("READY=1")

    async def watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        while usec:
            notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    async def run(self) -> int:
        from .kernel.watch import watch

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.runner.stop)
        bound = asyncio.Event()
        watcher = asyncio.create_task(watch(lambda _event: self.runner.trigger(), bound.set))
        await bound.wait()  # subscribed before the first sync reads the kernel: no event is lost
        dog = asyncio.create_task(self.watchdog())
        try:
            await self.runner.run()
        finally:
            watcher.cancel()
            dog.cancel()
        notify("STOPPING=1")
        if self.reconciler.config.daemon.on_stop == "remove":
            result = await asyncio.to_thread(self.reconciler.sync, True)
            log.info("stopped: removed %d object(s) of ours", len(result.plan.actions), extra=fields(result, "stop"))
        return 0


def main(config_path: str) -> int:
    from .kernel import LinuxKernel, make_firewall

    setup_logging()
    config = load(config_path)  # a ConfigError here exits 78 (cli)
    reconciler = Reconciler(config, LinuxKernel(make_firewall(config.firewall.backend)))
    return asyncio.run(Service(config_path, config, reconciler).run())
