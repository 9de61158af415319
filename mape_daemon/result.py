"""What one sync found and did: the reconciler's answer, which the journal, the state file and
the command line read."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .actions import Plan
from .mapcalc import MapParams
from .prefix import Selection
from .record import AppliedMapping
from .state import WanAddress


@dataclass
class SyncResult:
    selection: Selection
    plan: Plan
    applied: int = 0  # actions applied before stopping
    writes: int = 0
    seconds: float = 0.0
    error: Exception | None = None
    started: float = field(default_factory=time.time)
    conflicts: tuple[str, ...] = ()
    recheck_in: float | None = None
    previous: AppliedMapping | None = None  # the mapping before this sync
    wan: tuple[WanAddress, ...] = ()  # the WAN's addresses as this sync saw them
    conntrack_deleted: int = 0
    moved_from: tuple[str, int] | None = None  # (backend, objects removed there) when the backend changed

    @property
    def params(self) -> MapParams | None:
        return self.selection.params

    @property
    def ok(self) -> bool:
        return self.error is None
