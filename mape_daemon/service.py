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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load
from .errors import MapeError
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
    def __init__(self, config_path: str, config: Config, reconciler: Reconciler, make_kernel: Callable[[Config], Any]):
        self.path, self.reconciler, self.make_kernel = config_path, reconciler, make_kernel
        self.runner = Runner(self.sync_once, Schedule(period=config.daemon.sync_interval))
        self.ready = False
        self.last_ipv4: str | None = None
        self.pending: Config | None = None  # a reloaded config, swapped in between two syncs

    def switch_config(self, new: Config) -> None:
        """In the worker thread, between syncs. What we own is found by tunnel name and firewall
        backend: if either changes, remove our state under the old config before swapping."""
        old = self.reconciler.config
        if (old.tunnel.name, old.firewall.backend) != (new.tunnel.name, new.firewall.backend):
            result = self.reconciler.sync(teardown=True)
            if result.error is not None:
                log.error("reload: removing the old tunnel/rules failed: %s", result.error)
            self.reconciler.kernel = self.make_kernel(new)
        self.reconciler.config = new

    async def sync_once(self) -> bool:
        reloaded, self.pending = self.pending, None
        if reloaded is not None:
            await asyncio.to_thread(self.switch_config, reloaded)
            self.runner.schedule.period = reloaded.daemon.sync_interval
        result = await asyncio.to_thread(self.reconciler.sync)
        if reloaded is not None:
            log.info("reload: %s applied", self.path)
            notify("READY=1")
        ipv4 = str(result.params.ipv4) if result.params else None
        event = "prefix-change" if ipv4 != self.last_ipv4 else "sync"
        # A traceback only for what we did not expect; kernel refusals are explained by their message.
        trace = result.error if result.error is not None and not isinstance(result.error, MapeError) else None
        if result.error is not None:
            done = f" after {result.applied} of {len(result.plan.actions)} changes" if result.plan else ""
            log.error("sync failed%s: %s (retrying)", done, result.error, extra=fields(result, "error"), exc_info=trace)
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
            notify("READY=1")
            return
        self.pending = new  # applied by the next sync (never halfway through one), which says READY=1
        self.runner.trigger()

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

    def make_kernel(cfg: Config) -> LinuxKernel:
        return LinuxKernel(make_firewall(cfg.firewall.backend))

    reconciler = Reconciler(config, make_kernel(config))
    return asyncio.run(Service(config_path, config, reconciler, make_kernel).run())
