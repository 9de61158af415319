"""observe -> select prefix -> compute -> desired -> diff -> apply. The kernel is injected.

The reconciler re-reads the kernel on every sync, so a lost or reordered event, or a change made
behind our back, cannot leave it wrong; a second sync of an unchanged world writes nothing. What
is ours comes from the ownership record and our markers, never from the config alone, so a config
that changed (or is missing, for `cleanup`) cannot orphan or adopt anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Protocol

from . import desired as desired_mod
from .actions import Action, ConntrackCleanup, Plan
from .config import Config
from .errors import ConflictError, RetryableError
from .lines import Line
from .mapcalc import MappingError
from .plan import diff
from .prefix import Selection, map_address, select
from .record import AppliedMapping, RecordFile
from .result import SyncResult
from .state import MAIN_TABLE, NOTHING, Observed, Query, State


class KernelPort(Protocol):
    """What the reconciler needs of a kernel: mape_daemon.kernel.LinuxKernel, or the test fake."""

    writes: int  # kernel writes so far (the no-op oracle: a second sync adds none)
    backend: str  # where our netfilter state lives: iptables-nft, iptables-legacy, or nftables (our table only)
    conntrack_deleted: int  # conntrack entries deleted so far

    def session(self) -> AbstractContextManager[None]: ...
    def observe(self, query: Query) -> Observed: ...
    def normalize(self, state: State) -> State: ...
    def nft_matches(self, script: str | None, listed: str | None) -> bool: ...
    def bind_canonical(self, canonical: dict[str, str]) -> None: ...
    def apply(self, action: Action) -> None: ...
    def committed_by_child(self, pid: int) -> bool: ...


@dataclass(frozen=True)
class Computed:
    observed: Observed
    selection: Selection
    desired: State
    plan: Plan
    conflicts: tuple[str, ...] = ()
    recheck_in: float | None = None  # the hold-down ends then: sync again


def mapping_of(selection: Selection) -> AppliedMapping | None:
    p = selection.params
    if p is None:
        return None
    source = selection.source.address if selection.source else str(p.end_user_prefix.network_address)
    return AppliedMapping(str(p.end_user_prefix), source, str(p.ipv4) if p.snat else "", p.psid,
                          [tuple(r) for r in p.port_ranges], p.method, p.short())  # fmt: skip


def _describe_conflicts(cfg: Config, want: State, obs: Observed) -> tuple[State, list[str]]:
    """Our routes and rules whose slot another program's object holds: never touched, left out
    of what we want, and said in words with what to change."""
    notes = []
    held = {r.key: r for r in obs.foreign_routes}
    routes = set(want.routes)
    for r in sorted(want.routes):
        if (theirs := held.get(r.key)) is None:
            continue
        routes.discard(r)
        advice = (
            "IPv4 does not go by MAP-E. If it is pppd's, add `nodefaultroute` to its options (PPPoE keeps "
            "working through the policy routing); otherwise remove that route or set route.metric to a free "
            "metric (the lowest metric wins)"
            if r.table == MAIN_TABLE
            else "pick another pppoe.table, or remove that route (we add the same route ourselves)"
        )
        notes.append(f"route slot taken: {theirs.describe_foreign()} is another program's, where we want our "
                     f"{r.describe()}: {advice}")  # fmt: skip
    rules = set(want.rules)
    for rule in sorted(want.rules & obs.foreign_rules):
        rules.discard(rule)
        notes.append(f"an identical rule exists, not ours: {rule.describe().replace(' proto 203', '')}: "
                     "we leave it (it does the same); remove it to let mape-daemon own the policy routing")  # fmt: skip
    return replace(want, routes=frozenset(routes), rules=frozenset(rules)), notes


class Reconciler:
    def __init__(
        self,
        config: Config | None,
        kernel: KernelPort,
        records: RecordFile,
        clock: Callable[[], float] = time.monotonic,
        kernel_for: Callable[[str], KernelPort] | None = None,
    ):
        self.config = config  # None: only removal is possible (cleanup without a usable config)
        self.kernel = kernel
        self.records = records
        self.clock = clock
        self.kernel_for = kernel_for  # the adapter for another backend (the one the record names)
        self.lost_at: float | None = None  # when the WAN prefix went away (flap hold-down)
        self.before_apply: Callable[[Action], None] = lambda action: None  # a test's fault-injection point
        self._built: tuple[tuple, State] | None = None
        kernel.bind_canonical(records.record.nft_canonical)

    @property
    def record(self):
        return self.records.record

    def query(self) -> Query:
        cfg, rec = self.config, self.record
        tunnels = set(rec.tunnels) | ({cfg.tunnel.name} if cfg else set())
        rp = set(rec.rp_filter) | ({cfg.pppoe.interface} if cfg and cfg.pppoe else set())
        tables = {MAIN_TABLE} | ({cfg.pppoe.table} if cfg and cfg.pppoe else set()) if cfg else set()
        wan = cfg.wan.interface if cfg else next((i for i, _ in rec.addresses), "")
        return Query(wan, frozenset(tunnels), frozenset(rec.addresses), frozenset(rp), frozenset(tables))

    def _hold(self, selection: Selection) -> tuple[Selection, float | None]:
        """Keep the last mapping for daemon.hold_down seconds after the WAN loses its prefix: a
        link flap or a network manager re-applying the WAN then changes nothing at all."""
        cfg, last = self.config, self.record.mapping
        if selection.params is not None:
            self.lost_at = None
            return selection, None
        if cfg is None or last is None or cfg.daemon.hold_down <= 0:
            return selection, None
        now = self.clock()
        self.lost_at = now if self.lost_at is None else self.lost_at
        left = self.lost_at + cfg.daemon.hold_down - now
        if left <= 0:
            return selection, None
        try:
            params = map_address(cfg, last.source)
        except MappingError:
            return selection, None
        reason = f"{selection.reason}; keeping {last.prefix} for {left:.0f} s in case it comes back"
        return Selection(params, None, reason, held=True), left

    def _ours(self, obs: Observed) -> State:
        """What of the observed state is ours."""
        rec = self.record
        tunnels = {t for n, t in obs.tunnels.items() if n in rec.tunnels}
        names = {t.name for t in tunnels}
        addresses = {a for a in obs.addresses if (a.ifname, a.address) in rec.addresses or a.ifname in names}
        # Loose (or off) already counts as present; ours to give back only while it is still our 2.
        effective = {i: max(v, obs.rp_filter.get("all", 0)) for i, v in obs.rp_filter.items() if i != "all"}
        loose = {i for i, v in effective.items() if v != 1 and (i not in rec.rp_filter or obs.rp_filter[i] == 2)}
        guards = {g for g in obs.guards if g.ifname in names}
        return State(tunnels=frozenset(tunnels), addresses=frozenset(addresses), routes=obs.routes, rules=obs.rules,
                     loose_rp=frozenset(loose), guards=frozenset(guards), chains=obs.chains, jumps=obs.jumps,
                     nft=obs.nft)  # fmt: skip

    def compute(self, teardown: bool = False) -> Computed:
        cfg, rec = self.config, self.record
        obs = self.kernel.observe(self.query())
        have = self._ours(obs)
        recheck = None
        conflicts: list[str] = []
        if teardown or cfg is None:
            selection, want = Selection(None, reason="teardown"), NOTHING
        else:
            selection = select(cfg, obs.wan, ours={a for _, a in rec.addresses}, delegated=obs.delegated)
            selection, recheck = self._hold(selection)
            if selection.params is not None:
                try:
                    desired_mod.check_pool(cfg, selection.params)
                except desired_mod.EmptyPool as e:
                    selection = Selection(None, selection.source, str(e))
            if selection.params is not None:
                self._check_tunnel_name(cfg, obs)
                if rec.backend and rec.backend != self.kernel.backend:
                    raise ConflictError(f"our netfilter state lives in {rec.backend}, and this config uses "
                                        f"{self.kernel.backend}: run `mape-daemon cleanup` first")  # fmt: skip
            want, conflicts = _describe_conflicts(cfg, self._build(cfg, selection.params, obs.carriers), obs)
            self._check_endpoints(want, obs)
        if self.kernel.nft_matches(want.nft, obs.nft):
            have = replace(have, nft=want.nft)  # the same table, in nft's canonical listing
        have = replace(have, loose_rp=frozenset(i for i in have.loose_rp if i in want.loose_rp or i in rec.rp_filter))
        plan = diff(want, have, rec.rp_filter)
        plan = Plan(plan.actions + tuple(self._conntrack(selection, want, plan)))
        return Computed(obs, selection, want, plan, tuple(conflicts), recheck)

    def _build(self, cfg: Config, params: Line | None, links: Mapping[str, str]) -> State:
        """The desired state in the kernel's normal form, built again only when what it reads moved
        (the config, the mapping, whether ppp0 can carry traffic, the backend): a no-op sync
        builds nothing. `links`: the interfaces that can carry IPv4 now."""
        key = (cfg, params, cfg.pppoe is not None and cfg.pppoe.interface in links, self.kernel.backend)
        if self._built is not None and self._built[0] == key:
            return self._built[1]
        want = desired_mod.build(cfg, params, links, native=self.kernel.backend == "nftables")
        if want is not NOTHING:
            want = self.kernel.normalize(want)
        self._built = (key, want)
        return want

    @staticmethod
    def _check_tunnel_name(cfg: Config, obs: Observed) -> None:
        name = cfg.tunnel.name
        if name in obs.links and name not in obs.tunnels:
            kind = obs.links[name] or "a device"
            raise ConflictError(f"interface {name} exists and is {kind}, not an ip6tnl of mape-daemon's: "
                                "set tunnel.name to a free name")  # fmt: skip

    def _check_endpoints(self, want: State, obs: Observed) -> None:
        for t in want.tunnels:
            clash = next((o for n, o in sorted(obs.tunnels.items()) if n not in self.record.tunnels
                          and (o.local, o.remote) == (t.local, t.remote)), None)  # fmt: skip
            if clash is not None:
                raise ConflictError(
                    f"ip6tnl {clash.name} (not mape-daemon's) already connects {t.local} to {t.remote}; the kernel "
                    f"allows one such tunnel: delete it (ip link del {clash.name}) or set tunnel.name = "
                    f'"{clash.name}" after deleting it'
                )
            if t.name in obs.tunnels and t.name not in self.record.tunnels:
                raise ConflictError(f"ip6tnl {t.name} exists and was not created by mape-daemon: delete it "
                                    f"(ip link del {t.name}) or set tunnel.name to another name")  # fmt: skip

    def _conntrack(self, selection: Selection, want: State, plan: Plan) -> Iterator[ConntrackCleanup]:
        """Cleanups still pending from earlier syncs, and the ones this sync makes necessary: the
        mapping moved, or our NAT (or the guard) had to be restored."""
        rec = self.record
        pending = [ConntrackCleanup.from_json(d) for d in rec.pending_conntrack]
        yield from pending
        old, new = rec.mapping, mapping_of(selection) if want is not NOTHING else None
        if old is not None and (new is None or (old.ipv4, old.ranges) != (new.ipv4, new.ranges)):
            moved = new is None or new.ipv4 != old.ipv4
            c = ConntrackCleanup(
                drop_ipv4=(old.ipv4,) if moved and old.ipv4 else (),
                ipv4=(new.ipv4 or None) if new else None,
                ranges=tuple(map(tuple, new.ranges)) if new else (),
                # From DS-Lite (no NAT of ours) to a method that NATs: a flow the tunnel carried
                # un-NATed would go on so, and the guard and the far end drop it.
                unnated_via=self.config.tunnel.name if new and new.ipv4 and rec.unnated else None,
                why=f"the mapping moved from {old.text}" if new else f"{old.text} is no longer ours",
            )
            if (c.drop_ipv4 or c.ipv4) and c not in pending:
                yield c
        elif old is None and new is not None and new.ipv4 and rec.unnated:
            # The same after DS-Lite was torn down (a reload), with no mapping left to move from.
            yield ConntrackCleanup(ipv4=new.ipv4, ranges=tuple(map(tuple, new.ranges)),
                                   unnated_via=self.config.tunnel.name, why="DS-Lite's flows, not NATed")  # fmt: skip
        elif new is not None and new.ipv4 and old is not None and self._repairs_nat(plan):
            c = ConntrackCleanup(
                ipv4=new.ipv4,
                ranges=tuple(map(tuple, new.ranges)),
                unnated_via=self.config.tunnel.name,
                why="SNAT or the guard had to be restored",
            )
            if c not in pending:
                yield c

    @staticmethod
    def _repairs_nat(plan: Plan) -> bool:
        return any(a.repairs_nat for a in plan.actions)

    def _settle(self, computed: Computed) -> None:
        """After a whole plan went through: the mapping now in place, and record entries of objects
        that neither exist nor are wanted dropped."""
        rec, want, obs = self.record, computed.desired, computed.observed
        if not computed.selection.held:  # a held mapping keeps the address it came from
            rec.mapping = mapping_of(computed.selection) if want is not NOTHING else None
            if rec.mapping is not None:  # kept through a teardown: the next NAT method forgets DS-Lite's flows
                rec.unnated = not rec.mapping.ipv4
        wanted = {t.name for t in want.tunnels}
        rec.tunnels = [n for n in rec.tunnels if n in wanted or n in obs.tunnels]
        # A CE /128 that went with the WAN (a flap, a network manager) and is no longer wanted.
        kept = {(a.ifname, a.address) for a in obs.addresses | want.addresses}
        rec.addresses = [a for a in rec.addresses if a in kept]
        rec.rp_filter = {i: v for i, v in rec.rp_filter.items() if i in obs.rp_filter}  # gone with its interface
        if want is NOTHING:
            rec.backend = None

    def sync(self, teardown: bool = False) -> SyncResult:
        """One pass. Never raises for kernel trouble: the result carries the error.

        The record, not the config, says where our netfilter state lives: when it names another
        backend (the config changed it, or `auto` now picks another), our state is first removed
        through the recorded backend, so nothing is orphaned; a teardown uses it whatever the
        config says."""
        recorded = self.record.backend
        if recorded and recorded != self.kernel.backend and self.kernel_for is not None:
            current, self.kernel = self.kernel, self.kernel_for(recorded)
            try:
                moved = self._sync(teardown=True)
            finally:
                self.kernel = current
            if teardown or not moved.ok:
                return moved
            result = self._sync(teardown)
            result.moved_from = (recorded, len(moved.plan.actions))
            return result
        return self._sync(teardown)

    def _sync(self, teardown: bool) -> SyncResult:
        t0 = time.monotonic()
        writes0, deleted0 = self.kernel.writes, self.kernel.conntrack_deleted
        previous = self.record.mapping
        with self.kernel.session():
            try:
                computed = self.compute(teardown)
            except Exception as e:
                reason = str(e)
                return SyncResult(Selection(None, reason=reason), Plan(()), error=e, seconds=time.monotonic() - t0,
                                  previous=previous)  # fmt: skip
            result = SyncResult(
                computed.selection,
                computed.plan,
                conflicts=computed.conflicts,
                recheck_in=computed.recheck_in,
                previous=previous,
                wan=computed.observed.wan,
            )
            try:
                for action in computed.plan.actions:
                    action.note_intent(self.record, computed.observed.rp_filter, self.kernel.backend)
                    self.records.save()  # written down before it exists (a no-op when unchanged)
                    self.before_apply(action)
                    self.kernel.apply(action)
                    action.note_done(self.record)
                    result.applied += 1
                self._settle(computed)
            except Exception as e:
                result.error = e
            finally:
                try:
                    self.records.save()
                except OSError as e:  # the kernel state stands; the next sync writes the record again
                    result.error = result.error or RetryableError(f"writing {self.records.path}: {e.strerror or e}")
        result.writes = self.kernel.writes - writes0
        result.conntrack_deleted = self.kernel.conntrack_deleted - deleted0
        result.seconds = time.monotonic() - t0
        return result
