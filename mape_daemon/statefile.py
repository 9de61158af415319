"""The daemon's state file (`/run/mape-daemon/state.json`): what the last sync found and did, for
`mape-daemon status`, `ports` and scripts. Written by the daemon after every sync and read back by
the same type, so writer and readers cannot drift apart."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import write_atomic

STATE_DIR = Path(os.environ.get("MAPE_STATE_DIR", "/run/mape-daemon"))
NAME = "state.json"


@dataclass
class DaemonState:
    pid: int
    last_sync: float  # time.time() when the last sync started
    ok: bool
    error: str | None
    changes: int
    reason: str  # why the mapping is what it is (or why there is none)
    tunnel_name: str
    wan: str
    backend: str | None = None  # the netfilter backend our rules are in (nftables, iptables-nft, iptables-legacy)
    last_change_seconds: float | None = None  # how long the last sync that changed something took
    held: bool = False  # the prefix is gone and the last mapping is held (flap hold-down)
    prefix: str | None = None
    prefix_from: str | None = None  # what it was taken from: the WAN's address or the delegation (and what not)
    method: str | None = None  # map-e, ds-lite, ipip
    summary: str | None = None  # the parameters in a line ("DS-Lite via AFTR ...")
    remote: str | None = None  # the tunnel's far end: the BR, the AFTR, the provider's end
    isp: str | None = None
    rule: str | None = None
    ipv4: str | None = None
    psid: int | None = None
    psid_len: int | None = None
    psid_offset: int | None = None
    ce_ipv6: str | None = None
    ports: int | None = None
    port_ranges: list[tuple[int, int]] | None = None  # the port set, inclusive ranges
    conflicts: list[str] = field(default_factory=list)
    forwards: dict[str, list[str]] = field(default_factory=lambda: {"active": [], "unavailable": []})
    history: list[dict[str, Any]] = field(default_factory=list)
    repairs: dict[str, int] = field(default_factory=dict)
    watcher_restarts: int = 0
    firewalld: dict[str, Any] | None = None
    upnp: dict[str, Any] | None = None
    config_loaded_at: float | None = None
    ports_running_out: dict[str, str] = field(default_factory=dict)  # protocol -> why (an open episode)
    provisioning: dict[str, Any] | None = None  # HB46PP: the last access and whose rules are in force
    update: dict[str, Any] | None = None  # IPIP: the provider's update endpoint, last call

    def write(self, state_dir: Path = STATE_DIR) -> None:
        write_atomic(state_dir / NAME, json.dumps(asdict(self)))

    @classmethod
    def read(cls, state_dir: Path = STATE_DIR) -> DaemonState | None:
        """The file as the daemon last wrote it, or None when there is none or it is unreadable
        (a daemon of another version: its keys are not ours)."""
        try:
            data = json.loads((state_dir / NAME).read_text())
            known = {f.name for f in fields(cls)}
            state = cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            return None
        if state.port_ranges is not None:
            state.port_ranges = [(lo, hi) for lo, hi in state.port_ranges]
        return state
