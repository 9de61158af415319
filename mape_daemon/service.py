"""`mape-daemon run`: one asyncio loop; netlink events and signals only trigger the runner.

- The netlink watcher is supervised: an overflow of its socket means events were lost, so a full
  sync runs at once on a fresh subscription; if it dies it is restarted with backoff. If it
  cannot subscribe at start, the daemon exits with a clear message.
- systemd hears READY=1 after the first successful sync (and after a reload's sync), STATUS=,
  STOPPING=1, and WATCHDOG=1 only while the last sync attempt is recent: a sync wedged in a
  kernel call stops the pings and systemd restarts us.
- SIGHUP: the newest good config wins; a bad file changes nothing and says so. A config that
  changes what we own (WAN, ISP or rule, tunnel name, backend, PPPoE) first removes our state
  under the old one; if that fails, the old config stays and the removal is retried.
- SIGTERM/SIGINT stop per `daemon.on_stop`; the exit status says whether the removal worked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import forwards, upnp
from .config import Config, ConfigError, ForwardConfig, load
from .errors import CannotRunHere, MapeError
from .reconciler import Reconciler, SyncResult
from .record import RecordFile, exclusive
from .report import Line, describe
from .runner import Runner

log = logging.getLogger("mape-daemon")
STATE_DIR = Path(os.environ.get("MAPE_STATE_DIR", "/run/mape-daemon"))
EXIT_OK, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 69, 78
HISTORY = 20  # changes kept for `status`
WATCHER_BACKOFF_MAX = 60.0
FULL_CHECK, FULL_CHECK_LEGACY = 900.0, 60.0  # default sync_interval (see full_check_period)
UPNP_RETRY = 60.0  # seconds before a failed miniupnpd update is tried again
OVERFLOW_SAY_EVERY = 60.0  # a storm of route events (a BGP table loading) says so once a minute


class PlainFormatter(logging.Formatter):
    """For stderr: the journal's MAPE_CAUSE field, where a line has one, in brackets."""

    def format(self, record: logging.LogRecord) -> str:
        cause = getattr(record, "MAPE_CAUSE", None)
        if trigger := getattr(record, "MAPE_TRIGGER", None):
            cause = f"{cause}: {trigger}"
        text = f"[{cause}] {record.getMessage()}" if cause else record.getMessage()
        return f"mape-daemon: {record.levelname}: {text}" + (f"\n{self.formatException(record.exc_info)}"
                                                            if record.exc_info else "")  # fmt: skip


def setup_logging() -> None:
    """journald with structured fields under systemd; plain stderr otherwise (journald is not
    always running, and systemd-python then drops messages silently)."""
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="mape-daemon")
        handler.setFormatter(logging.Formatter("%(message)s"))  # the priority is a field of its own
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(PlainFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        from systemd import daemon

        daemon.notify(message)


def status_line(result: SyncResult) -> str:
    p = result.params
    if p is None:
        return f"waiting: {result.selection.reason}"
    if result.selection.held:
        return f"holding {p.ipv4} psid {p.psid}: {result.selection.reason}"
    state = "tunnel up" if result.ok else f"error: {result.error}"
    return f"{p.rule.isp or 'explicit'} {p.ipv4} psid {p.psid}, {p.ports} ports, {state}"


def fields(result: SyncResult, event: str, cause: str, triggers: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"MAPE_EVENT": event, "MAPE_CAUSE": cause, "MAPE_CHANGES": str(len(result.plan.actions))}
    if triggers:
        out["MAPE_TRIGGER"] = ",".join(triggers)
    if (p := result.params) is not None:
        out |= {"MAPE_PREFIX": str(p.end_user_prefix), "MAPE_IPV4": str(p.ipv4), "MAPE_PSID": str(p.psid)}
    return out


def full_check_period(cfg: Config, backend: str) -> float:
    """Seconds between full syncs. Events repair within a second what sends them; the full sync
    is insurance against what does not: a sysctl reset, a lost event, and on iptables-legacy
    (x_tables announce nothing) an `iptables -F` of our chains. It costs a netlink read only
    (the netfilter reading is reused while the nf_tables generation stands still)."""
    if cfg.daemon.sync_interval is not None:
        return cfg.daemon.sync_interval
    return FULL_CHECK_LEGACY if backend == "iptables-legacy" else FULL_CHECK


def identity(cfg: Config) -> tuple:
    """What names the objects we own: a change means removing them under the old config first."""
    return (cfg.wan.interface, cfg.isp, cfg.tunnel.name, cfg.firewall.backend, cfg.pppoe, cfg.lan_interfaces)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replaced atomically: `status` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class Service:
    def __init__(
        self,
        config_path: str,
        config: Config,
        records: RecordFile,
        make_kernel: Callable[[Config], Any],
        state_dir: Path = STATE_DIR,
    ):
        self.path, self.records, self.make_kernel, self.state_dir = config_path, records, make_kernel, state_dir
        self.reconciler = Reconciler(config, make_kernel(config), records)
        self.runner = Runner(self.sync_once)
        self._set_period()
        self.ready = False
        self.pending: Config | None = None  # a reloaded config, swapped in between two syncs
        self.loaded_at = time.time()
        self.conflicts: tuple[str, ...] = ()
        self.active: list[ForwardConfig] = []  # forwards inside the last mapping's port set
        self.unavailable: list[str] = []  # forwards outside the port set, as said in the journal
        self.holding = False
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.repairs: Counter[str] = Counter()
        self.last: SyncResult | None = None
        self.last_change_seconds: float | None = None  # how long the last sync that changed something took
        self.watcher_restarts = 0
        self.exit_code = EXIT_OK
        self.overflows: Counter[str] = Counter()  # since the last line that said so, per source
        self.miniupnpd = upnp.Miniupnpd()
        self.upnp_problem: str | None = None
        self.overflow_said: dict[str, float] = {}
        self.own_generation: int | None = None  # the nf_tables generation our last sync left
        self.firewalld: Any = None  # what firewalld says of the tunnel (kernel.firewalld.ZoneState)
        self.firewalld_said: str | None = None
        # Test knobs: a small netlink buffer (to force an overflow), a freeze before an action kind.
        self.rcvbuf = int(os.environ.get("MAPE_DEBUG_NETLINK_RCVBUF", 1 << 20))
        self.syncs = 0
        stop_at = os.environ.get("MAPE_DEBUG_STOP_BEFORE")
        if stop_at:
            self.reconciler.before_apply = _stop_before(stop_at, lambda: self.syncs)

    @property
    def config(self) -> Config:
        return self.reconciler.config  # type: ignore[return-value]

    # --- syncing ----------------------------------------------------------------------------
    def _switch_config(self, new: Config) -> str | None:
        """In the worker thread, between syncs. Returns why the old state could not be removed."""
        old = self.config
        if identity(old) != identity(new):
            result = self.reconciler.sync(teardown=True)
            if result.error is not None:
                return str(result.error)
            log.info("reload: removed our state under the old config (%d change(s))", len(result.plan.actions),
                     extra={"MAPE_EVENT": "reload", "MAPE_CAUSE": "reload"})  # fmt: skip
            self.reconciler.kernel = self.make_kernel(new)
            self.reconciler.kernel.bind_canonical(self.records.record.nft_canonical)
        self.reconciler.config = new
        self._set_period()
        return None

    def _set_period(self) -> None:
        period = full_check_period(self.config, self.reconciler.kernel.backend)
        self.runner.schedule.period, self.runner.schedule.backoff_max = period, min(60.0, period)

    async def sync_once(self, cause: str, triggers: tuple[str, ...] = ()) -> bool:
        reloaded = self.pending
        if reloaded is not None:
            problem = await asyncio.to_thread(self._switch_config, reloaded)
            if problem is not None:
                log.error(
                    "reload: removing our state under the old config failed, so the old config stays and the "
                    "reload is retried: %s",
                    problem,
                    extra={"MAPE_EVENT": "error", "MAPE_CAUSE": cause},
                )
                notify("READY=1")
                return False
            self.pending = None
            self.loaded_at = time.time()
            log.info("reload: %s applied", self.path, extra={"MAPE_EVENT": "reload", "MAPE_CAUSE": "reload"})
        self.syncs += 1
        result = await asyncio.to_thread(self.reconciler.sync)
        from .kernel.nftevents import current_generation

        self.own_generation = current_generation()
        self.last = result
        if result.plan:
            self.last_change_seconds = result.seconds
        self._report(result, cause, triggers)
        if isinstance(result.error, CannotRunHere):
            log.error("this host cannot run mape-daemon: %s", result.error, extra=fields(result, "error", cause))
            self.exit_code = EXIT_UNAVAILABLE
            self.runner.stop()
        if result.recheck_in is not None:
            self.runner.wake_in(result.recheck_in, "hold-down")
        if result.params is not None or result.error is None:  # not when the kernel could not be read
            await self._upnp(result, cause)
        self._write_status(result)
        if result.ok and (not self.ready or reloaded is not None):
            self.ready = True
            notify("READY=1")
        elif reloaded is not None:
            notify("READY=1")  # the reload itself is done; the sync's failure is logged and retried
        notify(f"STATUS={status_line(result)}")
        return result.ok

    def _report(self, result: SyncResult, cause: str, triggers: tuple[str, ...] = ()) -> None:
        if result.error is not None:
            done = f" after {result.applied} of {len(result.plan.actions)} changes" if result.plan else ""
            # A traceback only for what we did not expect; kernel refusals explain themselves.
            trace = result.error if not isinstance(result.error, MapeError) else None
            log.error("sync failed%s: %s (retrying)", done, result.error, extra=fields(result, "error", cause),
                      exc_info=trace)  # fmt: skip
        lines = describe(result, cause)
        if result.selection.held and not self.holding:
            lines.insert(0, Line("hold", f"prefix gone from {self.config.wan.interface}: {result.selection.reason}"))
        self.holding = result.selection.held
        for line in lines:
            log.info("%s", line.text, extra=fields(result, line.event, cause, triggers))
            self.history.append({"time": time.time(), "cause": ",".join(triggers) or cause, "event": line.event,
                                 "text": line.text})  # fmt: skip
        if any(line.event == "repair" for line in lines):
            self.repairs[",".join(triggers) or cause] += 1  # repair syncs, by what set them off
        for c in sorted(set(result.conflicts) - set(self.conflicts)):
            log.warning("conflict: %s", c, extra=fields(result, "conflict", cause))
        for c in sorted(set(self.conflicts) - set(result.conflicts)):
            log.info("conflict resolved: %s", c, extra=fields(result, "conflict", cause))
        self.conflicts = result.conflicts
        if result.params is not None:  # while MAP-E is off, what was said stays said
            self.active, unavailable = forwards.split(self.config, result.params.port_ranges)
            for u in sorted(set(unavailable) - set(self.unavailable)):
                log.warning("%s; disabled until the port set holds it", u,
                            extra=fields(result, "forward-unavailable", cause))  # fmt: skip
            for u in sorted(set(self.unavailable) - set(unavailable)):
                log.info("%s: usable again", u.partition(": ")[0], extra=fields(result, "forward", cause))
            self.unavailable = unavailable

    async def _upnp(self, result: SyncResult, cause: str, stopping: bool = False) -> None:
        params = None if stopping else result.params
        try:
            said = await asyncio.to_thread(self.miniupnpd.update, self.config, params)
        except upnp.UpnpError as e:
            if str(e) != self.upnp_problem:  # once, not at every retry
                log.error("%s (retrying)", e, extra=fields(result, "upnp", cause))
            self.upnp_problem = str(e)
            self.runner.wake_in(UPNP_RETRY, "retry")
            return
        self.upnp_problem = None
        if said:
            log.info("%s", said, extra=fields(result, "upnp", cause))

    def _check_forwards(self, new: Config) -> None:
        """A reload's forward outside the port set in use is a config error naming the nearest
        usable ports (at start, or after a renumbering, it is disabled and reported instead). A
        reload that changes the WAN or the ISP changes the set too: its forwards are judged after."""
        p = self.last.params if self.last is not None else None
        same_set = (new.wan.interface, new.isp) == (self.config.wan.interface, self.config.isp)
        if p is None or not same_set:
            return
        if problem := forwards.check(new, p.port_ranges, f"the set of {p.ipv4} psid {p.psid}"):
            raise ConfigError(f"{self.path}: {problem}")

    def _write_status(self, result: SyncResult) -> None:
        p = result.params
        active = self.active if p is not None else []
        write_json(self.state_dir / "state.json", {
            "pid": os.getpid(),
            "last_sync": result.started,
            "ok": result.ok,
            "error": str(result.error) if result.error else None,
            "changes": len(result.plan.actions),
            "last_change_seconds": self.last_change_seconds,
            "reason": result.selection.reason,
            "held": result.selection.held,
            "prefix": str(p.end_user_prefix) if p else None,
            "isp": p.rule.isp if p else None,
            "rule": str(p.rule.ipv6_prefix) if p else None,
            "ipv4": str(p.ipv4) if p else None,
            "psid": p.psid if p else None,
            "psid_len": p.psid_len if p else None,
            "psid_offset": p.psid_offset if p else None,
            "ce_ipv6": str(p.ce_ipv6) if p else None,
            "ports": p.ports if p else None,
            "tunnel_name": self.config.tunnel.name,
            "wan": self.config.wan.interface,
            "conflicts": list(result.conflicts),
            "forwards": {"active": [f.describe() for f in active], "unavailable": list(self.unavailable)},
            "history": list(self.history),
            "repairs": dict(self.repairs),
            "watcher_restarts": self.watcher_restarts,
            "firewalld": None if self.firewalld is None else dataclasses.asdict(self.firewalld),
            "upnp": {"file": str(self.config.upnp.file), "offering": self.miniupnpd.offering,
                     "problem": self.upnp_problem} if self.config.upnp.enabled else None,
            "config_loaded_at": self.loaded_at,
        })  # fmt: skip

    # --- signals ----------------------------------------------------------------------------
    def reload(self) -> None:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load(self.path)
            self._check_forwards(new)
        except ConfigError as e:
            running = "the config loaded at " + time.strftime("%H:%M:%S", time.localtime(self.loaded_at))
            if self.pending is not None:
                running = "the previous reload's config (newer, good, about to be applied)"
            log.error("reload: %s; nothing changes, staying with %s", e, running,
                      extra={"MAPE_EVENT": "error", "MAPE_CAUSE": "reload"})  # fmt: skip
            notify("READY=1")
            return
        for w in new.warnings():
            log.warning("reload: %s", w, extra={"MAPE_EVENT": "config", "MAPE_CAUSE": "reload"})
        self.pending = new  # applied by the next sync (never halfway through one), which says READY=1
        self.runner.trigger("reload", urgent=True)

    # --- watchdog and events ----------------------------------------------------------------
    def health_bound(self) -> float:
        """How old the last sync attempt may be while we call ourselves healthy."""
        return 2 * self.runner.schedule.period + 10

    async def watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        while usec:
            if self.runner.schedule.healthy(time.monotonic(), self.health_bound()):
                notify("WATCHDOG=1")
            await asyncio.sleep(usec / 4e6)

    async def supervise(
        self, name: str, cause: str, start: Callable[[Callable[[], None]], Any], bound: asyncio.Future
    ) -> None:
        """Run one event source for good: resubscribed at once after an overflow (events were
        lost, so a full sync runs), restarted with backoff if it dies. `bound` resolves once it is
        subscribed, or fails with the reason it could not be."""
        from .kernel import overflowed

        delay = 1.0

        def subscribed() -> None:
            if not bound.done():
                bound.set_result(True)

        while True:
            try:
                await start(subscribed)
                return  # a source with nothing to watch here (no system bus) ends by itself
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not bound.done():
                    bound.set_exception(e)
                    return
                overflow = overflowed(e)
                self.watcher_restarts += 1
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

    def on_nftables(self, generation: int, pid: int | None) -> None:
        """A committed nf_tables transaction: news unless this process or one of its iptables-restore
        children made it (kernels that do not name the process: newer than our last sync's). The
        kernel names the committing thread, and our syncs commit from a worker thread."""
        if pid is not None:
            ours = (pid == os.getpid() or os.path.exists(f"/proc/self/task/{pid}")
                    or self.reconciler.kernel.committed_by_child(pid))  # fmt: skip
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
        if self.last is not None:
            self._write_status(self.last)

    async def run(self) -> int:
        from .kernel import firewalld, nftevents, watch

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.runner.stop)
        sources = {  # name: (what it triggers, how to start it)
            "netlink": ("netlink", lambda up: watch.watch(lambda _e: self.runner.trigger("netlink"), up, self.rcvbuf)),
            "nftables": ("nftables", lambda up: nftevents.watch(self.on_nftables, up, self.rcvbuf)),
            "firewalld": ("firewalld", lambda up: firewalld.watch(
                self.runner.trigger, up, self.on_firewalld, lambda: self.config.tunnel.name,
                lambda: self.config.firewalld.zone,
            )),
        }  # fmt: skip
        bound = {name: loop.create_future() for name in sources}
        tasks = [asyncio.create_task(self.supervise(name, cause, start, bound[name]))
                 for name, (cause, start) in sources.items()]  # fmt: skip
        try:
            await bound["netlink"]  # subscribed before the first sync reads the kernel: no event is lost
        except Exception as e:
            raise CannotRunHere(f"cannot subscribe to netlink events: {e}") from None
        for name in ("nftables", "firewalld"):
            try:
                await asyncio.wait_for(bound[name], 10)
            except Exception as e:  # the periodic sync still repairs what these would have told us
                log.warning("no %s events (%s); the periodic sync repairs what they would have told", name,
                            e or type(e).__name__, extra={"MAPE_EVENT": "watcher", "MAPE_CAUSE": name})  # fmt: skip
        dog = asyncio.create_task(self.watchdog())
        try:
            await self.runner.run()
        finally:
            for task in (*tasks, dog):
                task.cancel()
        notify("STOPPING=1")
        code = await self.stop()
        return self.exit_code or code

    async def stop(self) -> int:
        if self.config.daemon.on_stop != "remove" and self.exit_code == EXIT_OK:
            log.info("stopped: our state stays (daemon.on_stop = keep)", extra={"MAPE_EVENT": "stop"})
            return EXIT_OK
        result = await asyncio.to_thread(self.reconciler.sync, True)
        if isinstance(result.error, CannotRunHere) and not result.plan:
            return EXIT_UNAVAILABLE  # it could not even read the kernel: nothing of ours was made
        if result.error is not None:
            log.error("stopped, but removing our state failed after %d of %d change(s): %s; run "
                      "`mape-daemon cleanup` to finish", result.applied, len(result.plan.actions), result.error,
                      extra=fields(result, "stop", "stop"))  # fmt: skip
            return EXIT_FAILURE
        log.info("stopped: removed %d object(s) of ours", result.applied, extra=fields(result, "stop", "stop"))
        await self._upnp(result, "stop", stopping=True)  # miniupnpd's file goes with the tunnel
        return EXIT_OK


def _stop_before(spec: str, syncs: Callable[[], int]) -> Callable[[Any], None]:
    """MAPE_DEBUG_STOP_BEFORE=KIND[:N][@S]: SIGSTOP this process before its Nth action of KIND
    (tunnel, address, route, routingrule, firewall, nft, conntrack) counted from its Sth sync on
    (default 1), so a test can kill -9 it at that point of a sync."""
    what, _, from_sync = spec.partition("@")
    kind, _, n = what.partition(":")
    seen = {"count": 0}

    def hook(action: Any) -> None:
        if syncs() < int(from_sync or 1):
            return
        obj = getattr(action, "obj", action)
        name = {"FirewallChange": "firewall", "NftChange": "nft", "ConntrackCleanup": "conntrack"}.get(
            type(action).__name__, type(obj).__name__.lower()
        )
        if name == kind:
            seen["count"] += 1
            if seen["count"] == int(n or 1):
                os.kill(os.getpid(), signal.SIGSTOP)

    return hook


def main(config_path: str) -> int:
    from .kernel import LinuxKernel, make_kernel

    setup_logging()
    config = load(config_path)  # a ConfigError here exits 78 (cli)
    for w in config.warnings():
        log.warning("%s", w, extra={"MAPE_EVENT": "config"})

    with exclusive(STATE_DIR, "running a second daemon"):
        records = RecordFile(STATE_DIR)

        def make_kernel(cfg: Config) -> LinuxKernel:
            return make_kernel(cfg.firewall.backend, records.record.backend)

        return asyncio.run(Service(config_path, config, records, make_kernel).run())
