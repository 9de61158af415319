"""Prometheus `/metrics`, served by the daemon from what its loop already knows (README
"Metrics"): a scrape reads memory, never the kernel. Counters are counted as syncs happen; the
state (mapping, ports in use, conflicts, forwards, miniupnpd) is a snapshot the loop replaces
after each sync and each reading of conntrack.

Names follow Prometheus' conventions: `mape_` prefix, `_total` counters, base units, labels with
small fixed sets of values. Nothing node_exporter already has (conntrack totals, interfaces).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector

from .kernel.httpd import Listener
from .portuse import Usage
from .result import SyncResult

PROVISIONING_STATES = ("ok", "failed", "no_record", "no_resolver", "waiting")
SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Snapshot:
    """What the gauges say, as of the loop's last sync or conntrack reading."""

    ok: bool = False
    mapped: bool = False
    info: dict[str, str] = field(default_factory=dict)  # isp, ipv4, psid, rule, prefix, source
    usage: dict[str, Usage] = field(default_factory=dict)
    exhausted: frozenset[str] = frozenset()  # protocols in a running-out episode
    conflicts: int = 0
    last_success: float | None = None  # time.time() of the last sync that ended well
    forwards: dict[str, int] = field(default_factory=lambda: {"active": 0, "disabled": 0})
    upnp: str | None = None  # None: not enabled; "offering", "refusing" (no mapping), "failing"


class Metrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot = Snapshot()
        self.syncs = Counter("mape_syncs", "Syncs, by what caused them and how they ended", ["cause", "result"],
                             registry=self.registry)  # fmt: skip
        self.repairs = Counter("mape_repairs", "Objects of ours put back after someone removed or changed them",
                               ["object", "trigger"], registry=self.registry)  # fmt: skip
        self.prefix_changes = Counter("mape_prefix_changes", "Mappings moved to another prefix",
                                      registry=self.registry)  # fmt: skip
        self.duration = Histogram("mape_sync_duration_seconds", "How long a sync took (reading, planning, "
                                  "applying)", buckets=SYNC_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(self)
        self.listener: Listener | None = None
        self.provisioning: Callable[[], dict[str, Any] | None] = lambda: None  # HB46PP's report, read live
        self.update: Callable[[], dict[str, Any] | None] = lambda: None  # IPIP's update endpoint, read live

    # --- what the loop tells it -------------------------------------------------------------
    def synced(self, result: SyncResult, cause: str, repaired: list[tuple[str, str]], moved: bool) -> None:
        self.syncs.labels(cause, "ok" if result.ok else "error").inc()
        self.duration.observe(result.seconds)
        for kind, trigger in repaired:
            self.repairs.labels(kind, trigger).inc()
        if moved:
            self.prefix_changes.inc()
        if result.ok:
            self.snapshot.last_success = time.time()

    # --- the scrape -------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        s = self.snapshot
        yield gauge("mape_up", "1 when MAP-E is mapped and the last sync ended well", int(s.ok and s.mapped))
        yield gauge("mape_mapped", "1 when a prefix is mapped (IPv4 by MAP-E), 0 while waiting for one", int(s.mapped))
        info = InfoMetricFamily("mape_mapping", "The mapping in use", labels=sorted(s.info))
        if s.mapped:
            info.add_metric([s.info[k] for k in sorted(s.info)], {})
        yield info
        for name, help_text, value in (
            ("mape_ports", "Ports (ICMP: ids) of the set, per protocol", lambda u: u.of),
            ("mape_ports_in_use", "Ports of the set held by tracked connections", lambda u: u.in_use),
            ("mape_ports_fullest_block_in_use", "Ports in use in the fullest block", lambda u: u.fullest_in_use),
            ("mape_ports_block_size", "Size of the fullest block", lambda u: u.fullest_size),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["protocol"])
            for proto, u in sorted(s.usage.items()):
                family.add_metric([proto], value(u))
            yield family
        family = GaugeMetricFamily("mape_ports_exhausted", "1 while the protocol is running out of ports (the "
                                   "journal's MAPE_EVENT=ports episode)", labels=["protocol"])  # fmt: skip
        for proto in sorted(s.usage):
            family.add_metric([proto], int(proto in s.exhausted))
        yield family
        yield gauge("mape_conflicts", "Objects of another program in our way (see `mape-daemon status`)", s.conflicts)
        since = GaugeMetricFamily("mape_seconds_since_last_successful_sync", "Seconds since a sync last ended well")
        if s.last_success is not None:
            since.add_metric([], time.time() - s.last_success)
        yield since
        family = GaugeMetricFamily("mape_forwards", "Port forwards, active or disabled (outside the port set)",
                                   labels=["state"])  # fmt: skip
        for state, n in sorted(s.forwards.items()):
            family.add_metric([state], n)
        yield family
        if (prov := self.provisioning()) is not None:
            family = GaugeMetricFamily("mape_provisioning_state", "HB46PP: how the last access ended "
                                       "(waiting: none yet)", labels=["state"])  # fmt: skip
            for state in PROVISIONING_STATES:
                family.add_metric([state], int(prov["state"].replace(" ", "_") == state))
            yield family
            fetched = GaugeMetricFamily("mape_provisioning_answer_timestamp_seconds",
                                        "When the HB46PP answer whose rules are in force was fetched")  # fmt: skip
            if prov["fetched_at"] is not None:
                fetched.add_metric([], prov["fetched_at"])
            yield fetched
        if (update := self.update()) is not None:
            family = GaugeMetricFamily("mape_ipip_update_state", "IPIP: how the last call of the provider's update "
                                       "endpoint ended (waiting: none yet)", labels=["state"])  # fmt: skip
            for state in ("ok", "failed", "waiting"):
                family.add_metric([state], int(update["state"] == state))
            yield family
        if s.upnp is not None:
            family = GaugeMetricFamily("mape_miniupnpd", "miniupnpd's state as we keep it: offering the set, "
                                       "refusing (no mapping), failing", labels=["state"])  # fmt: skip
            for state in ("offering", "refusing", "failing"):
                family.add_metric([state], int(s.upnp == state))
            yield family

    def describe(self) -> Iterator[Any]:
        return iter(())  # names vary with the snapshot: collected at each scrape, never cached

    # --- serving ----------------------------------------------------------------------------
    def serve(self, address: tuple[str, int] | None) -> None:
        """Listen on `address` (None: stop serving). Raises OSError when it cannot bind."""
        if self.listener is not None and self.listener.address == address:
            return
        self.stop()
        if address is not None:
            self.listener = Listener(address, make_wsgi_app(self.registry))

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)
