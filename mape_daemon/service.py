"""`mape-daemon run`: one asyncio loop; events and signals only trigger the runner.

The service ties together the concerns that live in their own modules: when to sync (`runner`),
what a sync does (`reconciler`), the event sources (`events`), SIGHUP's config (`reloads`), what
the journal says (`journal`), miniupnpd (`upnp`) and the state file (`statefile`).

- systemd hears READY=1 after the first sync attempt, whatever its outcome (and after a
  reload's sync): "started" means the loop runs and converges. A first sync that keeps failing
  (another program's device holds our tunnel's name, a slow ONU) shows in STATUS= and the journal
  and is retried; waiting for a success instead let the start timeout stop the unit, tear down
  what was made and restart it, every ~95 s. STOPPING=1, and WATCHDOG=1 only while the last sync
  attempt is recent: a sync wedged in a kernel call stops the pings and systemd restarts us.
- SIGTERM/SIGINT stop per `daemon.on_stop`; the exit status says whether the removal worked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from . import upnp
from .config import Config, load
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, CannotRunHere, MapeError, RetryableError
from .events import IPTABLES_NFT_TABLES, OUR_TABLES, Events
from .hb46pp import Provisioned
from .ipip_update import Target, Updater
from .journal import SyncJournal, fields, notify, setup_logging, status_line
from .metrics import Metrics
from .portuse import Exhaustion, usage
from .prefix import source_text
from .provisioning import LIB_DIR, Provisioner
from .reconciler import Reconciler
from .record import RecordFile, exclusive
from .reloads import ConfigSwitch
from .result import SyncResult
from .runner import Runner, full_check_period
from .statefile import STATE_DIR, DaemonState

log = logging.getLogger("mape-daemon")
UPNP_RETRY = 60.0  # seconds before a failed miniupnpd update is tried again
STATUS_RETRY = 60.0  # ... and a failed write of the state file
STOP_READ_TRIES = 3  # a stop's teardown read that raced a change is read again, not given up


class Service:
    def __init__(
        self,
        config_path: str,
        config: Config,
        records: RecordFile,
        make_kernel: Callable[[Config], Any],
        state_dir: Path = STATE_DIR,
        kernel_for: Callable[[str], Any] | None = None,
        provisioner: Provisioner | None = None,
        updater: Updater | None = None,
    ):
        self.path, self.records, self.state_dir = config_path, records, state_dir
        self.provisioner = provisioner or Provisioner()
        self.updater = updater or Updater(LIB_DIR)
        if config.isp.provisions:
            config = config.with_provisioned(self.provisioner.load_cache(config.isp))  # the last good answer
        self.reconciler = Reconciler(config, make_kernel(config), records, kernel_for=kernel_for)
        self.runner = Runner(self.sync_once)
        self.configs = ConfigSwitch(config_path, self.reconciler, records, make_kernel)
        self.configs.adapt = self._with_provisioned
        self.journal = SyncJournal()
        self.events = Events(self.runner, lambda pid: self.reconciler.kernel.committed_by_child(pid),
                             self._firewalld_changed, self._our_tables)  # fmt: skip
        self._set_period()
        self.ready = False
        self.last: SyncResult | None = None
        self.last_change_seconds: float | None = None  # how long the last sync that changed something took
        self.exit_code = EXIT_OK
        self.miniupnpd = upnp.Miniupnpd()
        self.upnp_problem: str | None = None
        self.status_problem: str | None = None  # why the state file could not be written, as said once
        self.syncs = 0
        self.metrics = Metrics()
        self.metrics.provisioning = lambda: self.provisioner.report.as_dict() if self.config.isp.provisions else None
        self.metrics.update = lambda: self.updater.report.as_dict() if self.updater.target is not None else None
        self.metrics_problem: str | None = None  # why /metrics is not served, as said once
        self.exhaustion = Exhaustion()
        stop_at = os.environ.get("MAPE_DEBUG_STOP_BEFORE")  # test knob: freeze before an action kind
        if stop_at:
            self.reconciler.before_apply = _stop_before(stop_at, lambda: self.syncs)

    @property
    def config(self) -> Config:
        return self.reconciler.config  # type: ignore[return-value]

    @property
    def pending(self) -> Config | None:
        """A reloaded config waiting for the next sync."""
        return self.configs.pending

    def on_nftables(self, generation: int, pid: int | None, tables: frozenset | None = None) -> None:
        self.events.on_nftables(generation, pid, tables)

    def _our_tables(self) -> frozenset[tuple[str, str]]:
        """Where our netfilter state lives now: our table, and iptables-nft's tables if that is
        the backend (the record's, or the adapter's)."""
        backends = {self.reconciler.kernel.backend, self.records.record.backend}
        return OUR_TABLES | (IPTABLES_NFT_TABLES if "iptables-nft" in backends else frozenset())

    # --- HB46PP ------------------------------------------------------------------------------
    def _with_provisioned(self, cfg: Config) -> Config:
        """A reloaded config with what was learned on the line (HB46PP's parameters, the AFTR's address)."""
        return cfg.with_provisioned(self.provisioner.table if cfg.isp.provisions else None).with_resolved(
            self.provisioner.aftr
        )

    def _provisioned(self, table: Provisioned | None) -> None:
        """New parameters from HB46PP (or none): swapped in by the next sync, as a reload's config is."""
        base = self.configs.pending or self.config
        self._learned(base.with_provisioned(table if base.isp.provisions else None))

    def _resolved(self, aftr: tuple[str, IPv6Address] | None) -> None:
        """The AFTR's name has a new address: swapped in by the next sync."""
        base = self.configs.pending or self.config
        self._learned(base.with_resolved(aftr))

    def _learned(self, new: Config) -> None:
        if new != (self.configs.pending or self.config):
            self.configs.pending = new
            self.runner.trigger("provisioning", urgent=True)
        elif self.last is not None:
            self._write_status(self.last)

    def _wan_addresses(self) -> frozenset[str]:
        """The line's prefixes now (preferred ones, not our CE /128): HB46PP asks again when they
        change, since its answer may depend on them."""
        if self.last is None:
            return frozenset()
        source = self.last.selection.source
        found = [w for w in self.last.wan if not w.ours_shape and not w.deprecated] + ([source] if source else [])
        return frozenset(str(IPv6Network(f"{w.address}/{w.prefixlen}", strict=False)) for w in found)

    def _update_target(self, result: SyncResult) -> Target | None:
        """IPIP with an update endpoint: the tunnel address to tell the provider (not while held)."""
        p = result.params
        if p is None or p.method != "ipip" or self.config.ipip.update_url is None or result.selection.held:
            return None
        return Target(str(p.ce_ipv6), str(p.ipv4)) if result.ok else None

    # --- syncing ----------------------------------------------------------------------------
    def _set_period(self) -> None:
        period = full_check_period(self.config.daemon.sync_interval, self.reconciler.kernel.backend)
        self.runner.schedule.period, self.runner.schedule.backoff_max = period, min(60.0, period)

    async def sync_once(self, cause: str, triggers: tuple[str, ...] = ()) -> bool:
        reloaded = self.configs.pending
        if reloaded is not None:
            before = _line_settings(self.config)
            problem = await asyncio.to_thread(self.configs.switch, reloaded)
            if problem is not None:
                # Half removed is the worst state: put the old config's state back whole, then retry.
                restored = await asyncio.to_thread(self.reconciler.sync)
                self.journal.report(restored, self.config, cause, triggers)
                log.error(
                    "reload: removing our state under the old config failed (%s); %s, the old config stays and "
                    "the reload is retried",
                    problem,
                    "its state was put back"
                    if restored.ok
                    else f"putting its state back failed too ({restored.error})",
                    extra={"MAPE_EVENT": "error", "MAPE_CAUSE": cause},
                )
                self._write_status(restored)
                notify("READY=1")
                return False
            self._set_period()
            self._serve_metrics()
            if _line_settings(reloaded) != before:
                self.provisioner.wake.set()  # [isp] or [dslite] changed (resolvers, provisioning, AFTR): ask now
        self.syncs += 1
        result = await asyncio.to_thread(self.reconciler.sync)
        self.events.after_sync()
        if cause == "periodic":
            self.events.firewalld_recheck.set()  # a zone binding lost without a signal is made again
        self.last = result
        self.provisioner.address_seen(self._wan_addresses())
        self.updater.seen(self._update_target(result))
        if result.plan:
            self.last_change_seconds = result.seconds
        lines = self.journal.report(result, self.config, cause, triggers)
        trigger = ",".join(triggers) or cause
        repaired = [(a.kind, trigger) for a in result.plan.actions if a.kind != "conntrack"]
        self.metrics.synced(result, cause, repaired if any(line.event == "repair" for line in lines) else [],
                            any(line.event == "prefix-change" for line in lines))  # fmt: skip
        if isinstance(result.error, CannotRunHere):
            log.error("this host cannot run mape-daemon: %s", result.error, extra=fields(result, "error", cause))
            self.exit_code = EXIT_UNAVAILABLE
            self.runner.stop()
        if result.recheck_in is not None:
            self.runner.wake_in(result.recheck_in, "hold-down")
        if result.params is not None or result.error is None:  # not when the kernel could not be read
            await self._upnp(result, cause)
        self._snapshot(result)
        self._write_status(result)
        if (not self.ready or reloaded is not None) and self.exit_code == EXIT_OK:
            # Up and converging: a failure is logged, in STATUS= and retried (see the module doc).
            # Not when this host cannot run us: `systemctl start` must fail, with 69.
            self.ready = True
            notify("READY=1")
        notify(f"STATUS={status_line(result)}")
        return result.ok

    async def _upnp(self, result: SyncResult, cause: str, stopping: bool = False) -> None:
        params = None if stopping or result.params is None or not result.params.snat else result.params
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
            if not stopping:
                self.runner.wake_in(upnp.CHECK_AFTER, "retry")  # is it running? (upnp.check)

    def _snapshot(self, result: SyncResult) -> None:
        """The metrics' gauges as of this sync (the ports' come from check_ports)."""
        p, snap = result.params, self.metrics.snapshot
        snap.ok, snap.mapped, snap.conflicts = result.ok, p is not None, len(result.conflicts)
        source = result.selection.source
        snap.info = {} if p is None else {
            "method": p.method, "isp": p.isp or p.method, "ipv4": str(p.ipv4), "psid": str(p.psid or 0),
            "rule": str(p.rule.ipv6_prefix) if p.rule else "",
            "prefix": str(p.end_user_prefix), "source": source.origin if source is not None else "config",
        }  # fmt: skip
        snap.forwards = {"active": len(self.journal.active) if p else 0, "disabled": len(self.journal.unavailable)}
        snap.upnp = None
        if self.config.upnp.enabled:
            snap.upnp = "failing" if self.upnp_problem else "offering" if self.miniupnpd.offering else "refusing"

    def _serve_metrics(self) -> None:
        """/metrics where [metrics] listen says (nowhere when unset); a port it cannot have is said
        once and the daemon goes on without."""
        problem = None
        try:
            self.metrics.serve(self.config.metrics.address())
        except OSError as e:
            problem = f"metrics: cannot listen on {self.config.metrics.listen}: {e.strerror or e}"
        if problem is not None and problem != self.metrics_problem:
            log.error("%s (going on without /metrics: change [metrics] listen and reload)", problem,
                      extra={"MAPE_EVENT": "error", "MAPE_CAUSE": "metrics"})  # fmt: skip
        self.metrics_problem = problem

    async def check_ports(self) -> None:
        """One reading of conntrack: ports in use for the metrics, and the running-out episodes."""
        p = self.last.params if self.last is not None else None
        usages = {}
        if p is None or not p.snat:
            lines = self.exhaustion.clear()
        else:
            try:
                flows = await asyncio.to_thread(self.reconciler.kernel.nat_flows, str(p.ipv4))
            except (OSError, MapeError):
                return  # conntrack busy or gone for a moment: the next reading
            usages = usage(flows, list(p.port_ranges))
            lines = self.exhaustion.update(usages, self.config.ports.warn_percent)
        self.metrics.snapshot.usage = usages
        self.metrics.snapshot.exhausted = frozenset(self.exhaustion.open)
        for kind, text in lines:
            log.log(logging.WARNING if kind == "start" else logging.INFO, "%s", text,
                    extra={"MAPE_EVENT": "ports", "MAPE_CAUSE": "ports"})  # fmt: skip
        if lines and self.last is not None:
            self._write_status(self.last)

    async def ports_watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.ports.check_every)
            await self.check_ports()

    def _firewalld_changed(self) -> None:
        if self.last is not None:
            self._write_status(self.last)

    def _write_status(self, result: SyncResult) -> None:
        """The state file; a failure (a full /run) is said once and retried, and the loop and the
        kernel state carry on."""
        try:
            self._status(result).write(self.state_dir)
        except OSError as e:
            problem = f"cannot write the state file in {self.state_dir}: {e.strerror or e}"
            if problem != self.status_problem:
                log.error("%s (retrying every minute; `mape-daemon status` shows old news meanwhile)", problem,
                          extra=fields(result, "error", "retry"))  # fmt: skip
            self.status_problem = problem
            self.runner.wake_in(STATUS_RETRY, "retry")
            return
        if self.status_problem is not None:
            log.info("the state file is written again", extra=fields(result, "error", "retry"))
        self.status_problem = None

    def _status(self, result: SyncResult) -> DaemonState:
        p, j, fw = result.params, self.journal, self.events.firewalld
        active = j.active if p is not None else []
        upnp_state = None
        if self.config.upnp.enabled:
            upnp_state = {"file": str(self.config.upnp.file), "offering": self.miniupnpd.offering,
                          "problem": self.upnp_problem}  # fmt: skip
        return DaemonState(
            pid=os.getpid(),
            last_sync=result.started,
            ok=result.ok,
            error=str(result.error) if result.error else None,
            changes=len(result.plan.actions),
            reason=result.selection.reason,
            tunnel_name=self.config.tunnel.name,
            wan=self.config.wan.interface,
            backend=self.reconciler.kernel.backend,
            last_change_seconds=self.last_change_seconds,
            held=result.selection.held,
            prefix=str(p.end_user_prefix) if p else None,
            prefix_from=source_text(result.selection),
            method=p.method if p else None,
            summary=p.describe() if p else None,
            remote=str(p.br) if p else None,
            isp=p.rule.isp if p and p.rule else None,
            rule=str(p.rule.ipv6_prefix) if p and p.rule else None,
            ipv4=str(p.ipv4) if p else None,
            psid=p.psid if p else None,
            psid_len=p.psid_len if p else None,
            psid_offset=p.psid_offset if p else None,
            ce_ipv6=str(p.ce_ipv6) if p else None,
            ports=p.ports if p else None,
            port_ranges=list(p.port_ranges) if p else None,
            conflicts=list(result.conflicts),
            forwards={"active": [f.describe() for f in active], "unavailable": list(j.unavailable)},
            history=list(j.history),
            repairs=dict(j.repairs),
            watcher_restarts=self.events.restarts,
            firewalld=None if fw is None else dataclasses.asdict(fw),
            upnp=upnp_state,
            config_loaded_at=self.configs.loaded_at,
            ports_running_out=dict(self.exhaustion.open),
            provisioning=self.provisioner.report.as_dict() if self.config.isp.provisions else None,
            update=self.updater.report.as_dict() if self.updater.target is not None else None,
        )

    # --- signals and the loop ---------------------------------------------------------------
    def reload(self) -> None:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        if not self.configs.load(self.last.params if self.last is not None else None):
            notify("READY=1")
            return
        self.runner.trigger("reload", urgent=True)  # applied by the next sync, which says READY=1

    def health_bound(self) -> float:
        """How old the last sync attempt may be while we call ourselves healthy."""
        return 2 * self.runner.schedule.period + 10

    async def watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        while usec:
            if self.runner.schedule.healthy(time.monotonic(), self.health_bound()):
                notify("WATCHDOG=1")
            await asyncio.sleep(usec / 4e6)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.runner.stop)
        tasks = await self.events.start(lambda: self.config.tunnel.name, lambda: self.config.firewalld.zone)
        self._serve_metrics()
        provisioning = self.provisioner.run(lambda: self.configs.pending or self.config, self._wan_addresses,
                                            self._provisioned, self._resolved)  # fmt: skip
        updates = self.updater.run(lambda: self.config.ipip)
        helpers = tuple(asyncio.create_task(c) for c in (self.watchdog(), self.ports_watch(), provisioning, updates))
        try:
            await self.runner.run()
        finally:
            for task in (*tasks, *helpers):
                task.cancel()
            self.metrics.stop()
        notify("STOPPING=1")
        code = await self.stop()
        return self.exit_code or code

    async def stop(self) -> int:
        if self.config.daemon.on_stop != "remove" and self.exit_code == EXIT_OK:
            log.info("stopped: our state stays (daemon.on_stop = keep)", extra={"MAPE_EVENT": "stop"})
            return EXIT_OK
        for _ in range(STOP_READ_TRIES):
            result = await asyncio.to_thread(self.reconciler.sync, True)
            if not (isinstance(result.error, RetryableError) and not result.plan):
                break
            await asyncio.sleep(0.2)  # the kernel changed while we read it (a busy router): read again
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


def _line_settings(cfg: Config) -> tuple:
    """What the provisioning loop reads of a config, less what it put there itself."""
    return cfg.isp.with_provisioned(None), cfg.dslite.model_copy(update={"resolved": None})


def _stop_before(spec: str, syncs: Callable[[], int]) -> Callable[[Any], None]:
    """MAPE_DEBUG_STOP_BEFORE=KIND[:N][@S]: SIGSTOP this process before its Nth action of KIND
    (an action's kind: tunnel, address, route, routingrule, rp_filter, firewall, nft, conntrack)
    counted from its Sth sync on (default 1), so a test can kill -9 it at that point of a sync."""
    what, _, from_sync = spec.partition("@")
    kind, _, n = what.partition(":")
    seen = {"count": 0}

    def hook(action: Any) -> None:
        if syncs() >= int(from_sync or 1) and action.kind == kind:
            seen["count"] += 1
            if seen["count"] == int(n or 1):
                os.kill(os.getpid(), signal.SIGSTOP)

    return hook


def main(config_path: str) -> int:
    from .kernel import make_kernel

    setup_logging()
    config = load(config_path)  # a ConfigError here exits 78 (cli)
    for w in config.warnings():
        log.warning("%s", w, extra={"MAPE_EVENT": "config"})

    with exclusive(STATE_DIR, "running a second daemon"):
        records = RecordFile(STATE_DIR)
        service = Service(config_path, config, records, lambda cfg: make_kernel(cfg.firewall.backend,
                          records.record.backend), kernel_for=make_kernel)  # fmt: skip
        return asyncio.run(service.run())
