"""IPIP: telling the provider's update endpoint our tunnel address, once per change of it.

A fixed-IPv4 service routes its IPv4 into a tunnel towards the address it was last told; after a
renumbering the tunnel is dead until the provider learns the new one. So after every sync whose
tunnel address differs from the one last told (kept across restarts, so a restart does not call
again), one GET to `ipip.update_url` with {ipv6}, {ipv4}, {user} and {password} filled in, the
user and password also as HTTP basic authentication, from the tunnel address itself. A 2xx is
the provider's yes; anything else is retried with back-off (BACKOFF). What the journal and
`status` show of the call is the URL without its query and without the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from .config import IpipConfig
from .files import write_atomic

log = logging.getLogger("mape-daemon")
BACKOFF = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)  # seconds between tries; the last repeats
TOLD = "ipip-update.json"
EVENT = {"MAPE_EVENT": "update", "MAPE_CAUSE": "update"}


@dataclass(frozen=True)
class Target:
    """What the provider is to be told: our tunnel address, and the fixed IPv4 it is for."""

    ipv6: str
    ipv4: str


@dataclass(frozen=True)
class Request:
    url: str
    shown: str  # for the journal: no query, no credentials
    headers: dict[str, str]
    cafile: str | None = None


def request(cfg: IpipConfig, target: Target) -> Request:
    assert cfg.update_url is not None
    user, password = cfg.update_user or "", cfg.update_password or ""
    url = cfg.update_url.format(ipv6=quote(target.ipv6), ipv4=target.ipv4, user=quote(user, safe=""),
                                password=quote(password, safe=""))  # fmt: skip
    hidden = urlsplit(cfg.update_url.format(ipv6=target.ipv6, ipv4=target.ipv4, user="*", password="*"))
    shown = hidden._replace(netloc=hidden.netloc.rpartition("@")[2], query="", fragment="").geturl()
    headers = {}
    if cfg.update_user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return Request(url, shown, headers, str(cfg.update_ca_file) if cfg.update_ca_file else None)


def call(req: Request, source: str) -> str | None:
    """One GET from `source`: None for a 2xx, else what went wrong."""
    from .kernel import provision as wire

    try:
        status, _, _ = wire.get(req.url, True, None, req.cafile, headers=req.headers, source=source)
    except wire.FetchFailed as e:
        return f"no answer from {req.shown}: {e}"
    return None if 200 <= status < 300 else f"{req.shown} answered HTTP {status}"


@dataclass
class Report:
    state: str = "waiting"  # waiting | ok | failed
    detail: str = ""
    at: float | None = None  # the last call
    next_at: float | None = None  # the next try, after a failure

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Updater:
    def __init__(self, lib_dir: Path, send: Callable[[Request, str], str | None] = call,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.file = lib_dir / TOLD
        self.send, self.clock = send, clock
        self.told = self._load()
        self.report = Report()
        self.wake = asyncio.Event()
        self.target: Target | None = None

    def _load(self) -> Target | None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(self.file.read_text())
            return Target(data["ipv6"], data["ipv4"])
        return None

    def _save(self, target: Target) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.file, json.dumps(target.__dict__) + "\n")
        except OSError as e:  # the next restart calls once more: harmless
            log.warning("IPIP update: cannot note the address told in %s: %s", self.file, e.strerror or e, extra=EVENT)

    def seen(self, target: Target | None) -> None:
        """After a sync: the tunnel address in force (None: no IPIP, or no update_url)."""
        self.target = target
        if target is not None and target != self.told:
            self.wake.set()

    async def run(self, config: Callable[[], IpipConfig]) -> None:
        """Until cancelled: tell the provider each new address, retrying with back-off."""
        failures = 0
        while True:
            self.wake.clear()  # before reading the target: a sync during the call wakes the next turn
            wait: float | None = None
            target = self.target
            if target is not None and target != self.told and config().update_url is not None:
                req = request(config(), target)
                problem = await asyncio.to_thread(self.send, req, target.ipv6)
                now = self.clock()
                if problem is None:
                    failures = 0
                    self.told = target
                    self._save(target)
                    self.report = Report("ok", f"{req.shown} told {target.ipv6} for {target.ipv4}", now)
                    log.info("IPIP update: %s", self.report.detail, extra=EVENT)
                else:
                    wait = BACKOFF[min(failures, len(BACKOFF) - 1)]
                    failures += 1
                    self.report = Report("failed", f"telling {target.ipv6}: {problem}", now, now + wait)
                    log.warning("IPIP update: %s (next try in %.0f s)", self.report.detail, wait, extra=EVENT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
