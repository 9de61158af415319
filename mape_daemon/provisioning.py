"""HB46PP in the daemon: when to ask (spec section 3.6), what an answer changes, and the cache.

An answer's MAP-E rules become the config's `isp.provisioned` (the service swaps the config in
between two syncs, as a reload does). What never happens: a bad, empty or unreachable answer
replacing rules that work; those keep the last good answer, from the cache across restarts
(the spec allows using it while the server is unreachable). Only "this line has no record"
(NXDOMAIN/NODATA) withdraws HB46PP's rules, as the spec says (c.2). `access` makes one access
over the wire (kernel/provision); the Provisioner takes it injected, so the loop's logic is
tested without a network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from . import hb46pp
from .config import Config, IspConfig
from .files import write_atomic
from .hb46pp import Offer, Outcome, Pointer, ProvisioningError
from .maprules import RuleTable

log = logging.getLogger("mape-daemon")
LIB_DIR = Path(os.environ.get("MAPE_LIB_DIR", "/var/lib/mape-daemon"))
CACHE = "hb46pp.json"
MAX_REDIRECTS = 3
CAPABILITY = ("map_e",)  # the methods this daemon runs, for the server's `capability`
EVENT = {"MAPE_EVENT": "provisioning", "MAPE_CAUSE": "provisioning"}


@dataclass
class Report:
    """What `status` shows: the last access and the rules in force."""

    state: str = "waiting"  # waiting (no access yet) | ok | failed | no record | no resolver | off
    detail: str = ""
    source: str | None = None  # whose rules are in force ("A VNE Highspeed 4over6"), if HB46PP's
    fetched_at: float | None = None  # when the answer in force was fetched
    next_at: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Access:
    """One access's end: the outcome (it decides the next wait), what was learned, and a line
    that says what happened (never a credential: the token is not in it)."""

    outcome: Outcome
    offer: Offer | None = None
    detail: str = ""
    pointer: Pointer | None = None


def access(resolvers: list[str], capability: tuple[str, ...], token: str | None = None,
           cafile: str | None = None, credentials: hb46pp.Credentials | None = None) -> Access:  # fmt: skip
    """Steps b to i of section 3.6, once: the record, the GET (307s followed, never from https
    down to http when the record asked for verification), the answer checked."""
    from .kernel import provision as wire  # the wire, only where it is used

    try:
        pointer = hb46pp.parse_txt(wire.txt(hb46pp.TXT_NAME, resolvers))
    except wire.NoRecord as e:
        return Access(Outcome.NO_RECORD, detail=f"no {hb46pp.TXT_NAME} TXT record on the line's resolvers ({e})")
    except wire.DnsFailed as e:
        return Access(Outcome.DNS_FAILED, detail=f"the {hb46pp.TXT_NAME} TXT lookup failed: {e}")
    except ProvisioningError as e:
        return Access(Outcome.NO_RECORD, detail=str(e))  # c.2 covers a record not of the spec's form
    base = pointer.url
    for _ in range(MAX_REDIRECTS + 1):
        # Our parameters go to each server, credentials only where section 3.3 lets them.
        url = hb46pp.query_url(Pointer(base, pointer.verify), capability, token, credentials)
        shown = base.split("?")[0]
        try:
            status, location, body = wire.get(url, pointer.verify, resolvers, cafile)
        except (wire.FetchFailed, wire.DnsFailed, wire.NoRecord) as e:
            return Access(Outcome.NO_REPLY, detail=f"no answer from {shown}: {e}", pointer=pointer)
        if status == 307 and location:
            nxt = urljoin(base, location)
            if pointer.verify and urlsplit(nxt).scheme != "https":
                return Access(Outcome.BAD_REPLY, detail=f"{shown} redirected to plain http", pointer=pointer)
            base = nxt
            continue
        if status != 200:
            return Access(Outcome.BAD_REPLY, detail=f"{shown} answered HTTP {status}", pointer=pointer)
        try:
            offer = hb46pp.parse_offer(body)
        except ProvisioningError as e:
            return Access(Outcome.BAD_REPLY, detail=f"{shown}: {e}", pointer=pointer)
        return Access(Outcome.OK, offer, f"{shown} offers {', '.join(offer.order) or 'nothing'}", pointer)
    return Access(Outcome.BAD_REPLY, detail=f"more than {MAX_REDIRECTS} redirects from {shown}", pointer=pointer)


def credentials(isp: IspConfig) -> hb46pp.Credentials | None:
    """The user/pass of [isp], for the requests that may carry them."""
    if isp.provisioning_user is None or isp.provisioning_password is None:
        return None
    return hb46pp.Credentials(isp.provisioning_user, isp.provisioning_password, isp.provisioning_server)


def learn_resolvers(wan: str) -> list[str]:
    """The WAN's RDNSS servers (a Router Solicitation, and the RAs that answer), or none."""
    from .kernel import provision

    try:
        return provision.rdnss(wan)
    except OSError as e:
        log.warning("HB46PP: cannot ask %s's router for its DNS servers: %s", wan, e.strerror or e, extra=EVENT)
        return []


class Provisioner:
    def __init__(self, lib_dir: Path | None = None, ask: Callable[..., Access] = access,
                 learn: Callable[[str], list[str]] | None = None, clock: Callable[[], float] = time.time):  # fmt: skip
        self.cache = (lib_dir or LIB_DIR) / CACHE
        self.ask, self.learn = ask, learn or learn_resolvers
        self.clock = clock
        self.table: RuleTable | None = None
        self.token: str | None = None
        self.report = Report()
        self.wake = asyncio.Event()
        self.asked_for: frozenset[str] | None = None  # the WAN addresses the last access was made for

    # --- the cache ---------------------------------------------------------------------------
    def load_cache(self) -> RuleTable | None:
        """The last good answer, if there is one we can read (a damaged cache is said and ignored)."""
        try:
            data = json.loads(self.cache.read_text())
            offer = hb46pp.parse_offer(json.dumps(data["answer"]).encode())
            self.table = hb46pp.rule_table(offer)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, ProvisioningError) as e:
            log.warning("HB46PP: ignoring the cached answer %s: %s", self.cache, e, extra=EVENT)
            return None
        self.token = offer.token
        self.report = Report("waiting", "using the cached answer until the server answers", offer.source,
                             data.get("fetched_at"))  # fmt: skip
        return self.table

    def _save(self, offer: hb46pp.Offer) -> None:
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.cache, json.dumps({"fetched_at": self.clock(), "answer": offer.raw}) + "\n")
        except OSError as e:
            log.warning("HB46PP: cannot cache the answer in %s: %s", self.cache, e.strerror or e, extra=EVENT)

    def forget(self) -> None:
        self.cache.unlink(missing_ok=True)

    # --- one access, judged --------------------------------------------------------------------
    def judge(self, a: Access) -> tuple[RuleTable | None, float]:
        """The rules in force after access `a`, and the seconds until the next access."""
        now = self.clock()
        if a.outcome is Outcome.OK:
            offer = a.offer
            method = hb46pp.choose(offer, CAPABILITY)
            if offer.token:
                self.token = offer.token
            wait = hb46pp.next_wait(Outcome.OK, offer.ttl)
            if method == "map_e":
                table = hb46pp.rule_table(offer)
                if table != self.table:
                    log.info("HB46PP: MAP-E rules from %s (%d rule(s), BR %s), valid %s", offer.source,
                             len(table.rules), offer.map_e.br, f"{offer.ttl} s" if offer.ttl else "a day",
                             extra=EVENT)  # fmt: skip
                self._save(offer)
                self.table = table
                self.report = Report("ok", a.detail, offer.source, now, now + wait)
            else:
                keep = "keeping the rules in force" if self.table else "the bundled tables stay"
                log.warning("HB46PP: %s; nothing we run (we run %s); %s", a.detail, ", ".join(CAPABILITY), keep,
                            extra=EVENT)  # fmt: skip
                self.report = Report("ok", f"{a.detail}: nothing we run", self.report.source,
                                     self.report.fetched_at, now + wait)  # fmt: skip
            return self.table, wait
        wait = hb46pp.next_wait(a.outcome)
        if a.outcome is Outcome.NO_RECORD:
            if self.table is not None:
                log.warning("HB46PP: %s: this line no longer provisions; its rules are withdrawn", a.detail,
                            extra=EVENT)  # fmt: skip
            self.table, self.token = None, None
            self.forget()
            self.report = Report("no record", a.detail, None, None, now + wait)
            return None, wait
        keep = "keeping the last good answer" if self.table else "no answer yet"
        log.warning("HB46PP: %s (%s; next try in %.0f min)", a.detail, keep, wait / 60, extra=EVENT)
        self.report = Report("failed", a.detail, self.report.source, self.report.fetched_at, now + wait)
        return self.table, wait

    # --- the loop ------------------------------------------------------------------------------
    def address_seen(self, addresses: frozenset[str]) -> None:
        """After a sync: a WAN address that changed since the last access asks again now (the
        server may answer differently for another prefix)."""
        if not addresses or self.asked_for is None:
            return
        if not self.asked_for:  # asked before the first sync knew the line: these are what it was for
            self.asked_for = addresses
        elif addresses != self.asked_for:
            self.wake.set()

    async def run(self, config: Callable[[], Config], addresses: Callable[[], frozenset[str]],
                  apply: Callable[[RuleTable | None], None]) -> None:  # fmt: skip
        """Until cancelled: ask, judge, hand changed rules to `apply`, wait for the next access
        (or a WAN address change, or a reload that may have changed [isp])."""
        while True:
            cfg = config()
            isp = cfg.isp
            wait: float | None = None
            if not isp.provisions:
                self.report = Report("off", f'isp.name = "{isp.name}"' if isp.name != "auto" else "")
                self._drop(apply)
            elif not (resolvers := list(isp.resolvers) or await asyncio.to_thread(self.learn, cfg.wan.interface)):
                wait = hb46pp.next_wait(Outcome.NO_RECORD)  # as a line without the record: hours
                self.report = Report("no resolver", "no isp.resolvers, and the WAN's router advertisements name no "
                                     "DNS server (RDNSS)", self.report.source, self.report.fetched_at,
                                     self.clock() + wait)  # fmt: skip
            else:
                self.asked_for = addresses()
                ca = str(isp.ca_file) if isp.ca_file else None
                a = await asyncio.to_thread(self.ask, resolvers, CAPABILITY, self.token, ca, credentials(isp))
                before = self.table
                table, wait = self.judge(a)
                if table != before or table != isp.provisioned:
                    apply(table)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
            self.wake.clear()

    def _drop(self, apply: Callable[[RuleTable | None], None]) -> None:
        if self.table is not None:
            self.table = None
            apply(None)
