"""What we created, written down before we create it: the ownership record in the state folder.

Teardown, `cleanup` and reloads find our objects through this record, never through the current
config (which may name another WAN, tunnel or rule by now, or not parse at all). Routes and rules
carry our protocol number and chains our name prefix, so those are found by their marker; the
tunnel, the CE /128, the firewall backend and the sysctls we changed carry no marker, so they are
recorded. Also kept: the mapping last applied (conntrack cleanups and the flap hold-down need it),
conntrack cleanups not yet done (they survive a failed sync and a restart), and the canonical text
nft lists for each table we wrote.

The folder also holds the lock that keeps a second mape-daemon (or `apply`/`cleanup` while the
daemon runs) from changing the kernel beside the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MapeError
from .files import write_atomic

RECORD_NAME, LOCK_NAME = "owned.json", "lock"


@dataclass
class AppliedMapping:
    """The line's parameters last applied (what connections were NATed to)."""

    prefix: str
    source: str  # the WAN address it came from
    ipv4: str  # "" where we NAT to nothing (DS-Lite)
    psid: int | None
    ranges: list[tuple[int, int]]
    method: str = "map-e"
    text: str = ""  # how the journal names it ("192.0.2.5 psid 3", "fixed IPv4 ...")

    def __post_init__(self) -> None:
        self.text = self.text or f"{self.ipv4} psid {self.psid}"  # a record from before methods

    def ports(self) -> set[int]:
        return {p for lo, hi in self.ranges for p in range(lo, hi + 1)}


@dataclass
class Record:
    backend: str | None = None  # where our netfilter state lives (iptables-nft, iptables-legacy, nftables)
    tunnels: list[str] = field(default_factory=list)
    addresses: list[tuple[str, str]] = field(default_factory=list)  # (ifname, CE address) /128s we added
    rp_filter: dict[str, str] = field(default_factory=dict)  # ifname -> the value before we loosened it
    mapping: AppliedMapping | None = None
    pending_conntrack: list[dict[str, Any]] = field(default_factory=list)
    nft_canonical: dict[str, str] = field(default_factory=dict)
    unnated: bool = False  # the last mapping was DS-Lite's: its flows (not NATed by us) may be tracked

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = 1
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        mapping = data.get("mapping")
        return cls(
            backend=data.get("backend"),
            tunnels=list(data.get("tunnels", [])),
            addresses=[tuple(a) for a in data.get("addresses", [])],  # type: ignore[misc]
            rp_filter=dict(data.get("rp_filter", {})),
            mapping=AppliedMapping(**{**mapping, "ranges": [tuple(r) for r in mapping["ranges"]]}) if mapping else None,
            pending_conntrack=list(data.get("pending_conntrack", [])),
            nft_canonical=dict(data.get("nft_canonical", {})),
            unnated=bool(data.get("unnated", False)),
        )


class RecordFile:
    """The record on disk: loaded once, saved atomically whenever it changed."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / RECORD_NAME
        self.record = self._load()
        self._saved = json.dumps(self.record.to_json(), sort_keys=True)

    def _load(self) -> Record:
        try:
            return Record.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return Record()
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise MapeError(f"{self.path}: unreadable ownership record ({e}); remove it only after removing "
                            "mape-daemon's tunnel and /128 by hand") from None  # fmt: skip

    def save(self) -> None:
        text = json.dumps(self.record.to_json(), sort_keys=True)
        if text == self._saved:
            return
        write_atomic(self.path, text)
        self._saved = text


class Busy(MapeError):
    """Another mape-daemon process holds the state folder's lock."""


@contextlib.contextmanager
def exclusive(state_dir: Path, what: str):
    """Hold the state folder's lock for the block, or raise Busy naming the holder."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(
                f"another mape-daemon (pid {holder}) is managing this router ({state_dir}); "
                f"{what} would fight it: stop it first (systemctl stop mape-daemon)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
