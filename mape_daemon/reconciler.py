"""observe -> select prefix -> compute -> desired -> diff -> apply. The kernel is injected.

The reconciler re-reads the kernel on every sync, so a lost or reordered event, or a change made
behind our back, cannot leave it wrong; a second sync of an unchanged world writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from . import desired as desired_mod
from .config import Config
from .mapcalc import MapParams
from .plan import Action, Plan, diff
from .prefix import Selection, is_ce_address, select
from .state import NOTHING, Observed, State, Sysctl


class KernelPort(Protocol):
    """What the reconciler needs of a kernel: mape_daemon.kernel.LinuxKernel, or the test fake."""

    writes: int  # kernel writes so far (the no-op oracle: a second sync adds none)

    def observe(self, tunnel: str, wan: str, is_ce: Callable[[str], bool]) -> Observed: ...
    def sysctls(self, keys: Iterable[str]) -> frozenset[Sysctl]: ...
    def normalize(self, state: State) -> State: ...
    def apply(self, action: Action) -> None: ...


@dataclass(frozen=True)
class Computed:
    observed: Observed
    selection: Selection
    desired: State
    plan: Plan


@dataclass
class SyncResult:
    selection: Selection
    plan: Plan
    applied: int = 0  # actions applied before stopping
    writes: int = 0
    seconds: float = 0.0
    error: Exception | None = None
    started: float = field(default_factory=time.time)

    @property
    def params(self) -> MapParams | None:
        return self.selection.params

    @property
    def ok(self) -> bool:
        return self.error is None


class Reconciler:
    def __init__(self, config: Config, kernel: KernelPort):
        self.config = config
        self.kernel = kernel

    def compute(self, teardown: bool = False) -> Computed:
        cfg = self.config
        observed = self.kernel.observe(cfg.tunnel.name, cfg.wan.interface, lambda a: is_ce_address(cfg, a))
        selection = Selection(None, reason="teardown") if teardown else select(cfg, list(observed.wan))
        want = desired_mod.build(cfg, selection.params, observed.links)
        want = self.kernel.normalize(want) if want is not NOTHING else want
        have = observed.state
        sysctls = self.kernel.sysctls(s.key for s in want.sysctls)
        have = State(have.tunnel, have.addresses, have.routes, have.rules, sysctls, have.chains, have.jumps)
        return Computed(observed, selection, want, diff(want, have))

    def sync(self, teardown: bool = False) -> SyncResult:
        """One pass. Never raises for kernel trouble: the result carries the error."""
        t0 = time.monotonic()
        writes0 = self.kernel.writes
        try:
            computed = self.compute(teardown)
        except Exception as e:
            return SyncResult(Selection(None, reason=str(e)), Plan(()), error=e, seconds=time.monotonic() - t0)
        result = SyncResult(computed.selection, computed.plan)
        try:
            for action in computed.plan.actions:
                self.kernel.apply(action)
                result.applied += 1
        except Exception as e:
            result.error = e
        result.writes = self.kernel.writes - writes0
        result.seconds = time.monotonic() - t0
        return result
