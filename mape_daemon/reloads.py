"""SIGHUP: the newest good config wins, however many arrive and whenever. A bad file changes
nothing and says so; a good one waits as `pending` and is swapped in by the next sync (never
halfway through one).

Most changes are an ordinary sync under the new config: the diff changes what differs and keeps
the tunnel, the connections of an unchanged mapping and miniupnpd's mappings. Only a change of
what names objects we own by name (the WAN, the ISP or rule with its IID layout, the tunnel name,
the backend) first removes our state under the old config; if that removal fails, the old
config's state is put back whole by a sync under the old config, and the reload is retried."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import forwards
from .config import Config, ConfigError, load
from .lines import Line
from .reconciler import Reconciler
from .record import RecordFile

log = logging.getLogger("mape-daemon")
RELOAD = {"MAPE_EVENT": "reload", "MAPE_CAUSE": "reload"}


def identity(cfg: Config) -> tuple:
    """What names the objects we own by name: a change means removing them under the old config
    first. Everything else ([pppoe], [lan], snat, mss, forwards, ...) is found by our markers and
    the record, so the next sync's diff changes just what differs."""
    return (cfg.wan.interface, cfg.isp, cfg.tunnel.name, cfg.firewall.backend)


class ConfigSwitch:
    def __init__(self, path: str, reconciler: Reconciler, records: RecordFile, make_kernel: Callable[[Config], Any]):
        self.path, self.reconciler, self.records, self.make_kernel = path, reconciler, records, make_kernel
        self.pending: Config | None = None  # a reloaded config, swapped in between two syncs
        self.adapt: Callable[[Config], Config] = lambda cfg: cfg  # what the daemon adds: HB46PP's rules
        self.loaded_at = time.time()

    def load(self, mapped: Line | None) -> bool:
        """Read the file again; True when a good config now waits for the next sync. `mapped`: the
        running mapping, whose port set a reload's forwards must fit."""
        try:
            new = self.adapt(load(self.path))
            self._check_forwards(new, mapped)
        except ConfigError as e:
            running = "the config loaded at " + time.strftime("%H:%M:%S", time.localtime(self.loaded_at))
            if self.pending is not None:
                running = "the previous reload's config (newer, good, about to be applied)"
            log.error("reload: %s; nothing changes, staying with %s", e, running,
                      extra={"MAPE_EVENT": "error", "MAPE_CAUSE": "reload"})  # fmt: skip
            return False
        for w in new.warnings():
            log.warning("reload: %s", w, extra={"MAPE_EVENT": "config", "MAPE_CAUSE": "reload"})
        self.pending = new
        return True

    def _check_forwards(self, new: Config, p: Line | None) -> None:
        """A reload's forward outside the port set in use is a config error naming the nearest
        usable ports (at start, or after a renumbering, it is disabled and reported instead). A
        reload that changes the WAN or the ISP changes the set too: its forwards are judged after."""
        old = self.reconciler.config
        same_set = old is not None and (new.wan.interface, new.isp) == (old.wan.interface, old.isp)
        if p is None or not same_set or not p.snat:  # DS-Lite: no ports of ours, forwards are said disabled
            return
        if problem := forwards.check(new, p.port_ranges, f"the set of {p.short()}"):
            raise ConfigError(f"{self.path}: {problem}")

    def switch(self, new: Config) -> str | None:
        """In the worker thread, between syncs: put `new` (the pending config when the sync began)
        in place. Returns why the old state could not be removed (the old config then stays, and
        this is retried). A SIGHUP that arrives meanwhile leaves its newer config pending."""
        old = self.reconciler.config
        assert old is not None
        if identity(old) != identity(new):
            result = self.reconciler.sync(teardown=True)
            if result.error is not None:
                return str(result.error)
            log.info("reload: removed our state under the old config (%d change(s))", len(result.plan.actions),
                     extra=RELOAD)  # fmt: skip
            self.reconciler.kernel = self.make_kernel(new)
            self.reconciler.kernel.bind_canonical(self.records.record.nft_canonical)
        self.reconciler.config = new
        if self.pending is new:
            self.pending = None
        self.loaded_at = time.time()
        log.info("reload: %s applied", self.path, extra=RELOAD)
        return None
