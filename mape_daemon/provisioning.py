"""HB46PP in the daemon: when to ask (spec section 3.6), what an answer changes, and the cache;
and the AFTR's name, resolved on the line's resolvers.

An answer's parameters for the method chosen (hb46pp.Provisioned: MAP-E rules, a DS-Lite AFTR, an
IPIP tunnel) become the config's `isp.provisioned` (the service swaps the config in between two
syncs, as a reload does). What never happens: a bad, empty or unreachable answer replacing
parameters that work; those keep the last good answer, from the cache across restarts (the spec
allows using it while the server is unreachable). Only "this line has no record" (NXDOMAIN/NODATA)
withdraws HB46PP's parameters, as the spec says (c.2). An AFTR given by name is looked up on the
same resolvers (only the line's know the provider's names) and again every AFTR_EVERY seconds; a
failed lookup keeps the address in force. `access` makes one access over the wire
(kernel/provision); the Provisioner takes it injected, so the loop's logic is tested without a
network.
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
from ipaddress import IPv6Address
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from . import hb46pp
from .config import Config, IspConfig
from .files import write_atomic
from .hb46pp import Offer, Outcome, Pointer, Provisioned, ProvisioningError
from .lines import HB46PP_NAMES

log = logging.getLogger("mape-daemon")
LIB_DIR = Path(os.environ.get("MAPE_LIB_DIR", "/var/lib/mape-daemon"))
CACHE = "hb46pp.json"
MAX_REDIRECTS = 3
CAPABILITY = ("map_e", "dslite", "ipip")  # the methods this daemon runs, for the server's `capability`
AFTR_EVERY = 900.0  # seconds between two lookups of the AFTR's name (a moved AFTR is followed)
AFTR_RETRY = 60.0  # ... after a failed one
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
    """The line's DNS servers: the RAs' RDNSS (a Router Solicitation, and the RA that answers),
    else, when that RA says more comes by DHCPv6 (its M or O flag), a stateless DHCPv6
    Information-Request's (NTT NGN gives them only so), or none."""
    from .kernel import provision

    try:
        servers, by_dhcpv6 = provision.router_dns(wan)
        return servers or (provision.dhcpv6_dns(wan) if by_dhcpv6 else [])
    except OSError as e:
        log.warning("HB46PP: cannot ask %s's router for its DNS servers: %s", wan, e.strerror or e, extra=EVENT)
        return []


def resolve_aftr(name: str, resolvers: list[str]) -> str:
    """The AFTR name's first AAAA on the line's resolvers."""
    from .kernel import provision as wire

    try:
        return str(IPv6Address(wire.query(name, wire.AAAA, resolvers)[0]))
    except (wire.NoRecord, wire.DnsFailed) as e:
        raise LookupError(f"{name}: no AAAA on the line's resolvers ({e})") from None


def chosen(offer: Offer, isp: IspConfig) -> Provisioned | None:
    """The parameters of the method to run from `offer`: the user's fixed one if on offer, else
    the first of its `order` we run."""
    fixed = HB46PP_NAMES.get(isp.method)
    method = hb46pp.choose(offer, CAPABILITY, fixed)
    return None if method is None else hb46pp.provisioned(offer, method)


class Provisioner:
    def __init__(self, lib_dir: Path | None = None, ask: Callable[..., Access] = access,
                 learn: Callable[[str], list[str]] | None = None, clock: Callable[[], float] = time.time,
                 resolve: Callable[[str, list[str]], str] = resolve_aftr):  # fmt: skip
        self.cache = (lib_dir or LIB_DIR) / CACHE
        self.ask, self.learn, self.resolve = ask, learn or learn_resolvers, resolve
        self.clock = clock
        self.table: Provisioned | None = None  # HB46PP's parameters in force
        self.aftr: tuple[str, IPv6Address] | None = None  # the AFTR name's address in force
        self.aftr_problem: str | None = None
        self.token: str | None = None
        self.report = Report()
        self.wake = asyncio.Event()
        self.asked_for: frozenset[str] | None = None  # the WAN addresses the last access was made for

    # --- the cache ---------------------------------------------------------------------------
    def load_cache(self, isp: IspConfig) -> Provisioned | None:
        """The last good answer, if there is one we can read (a damaged cache is said and ignored)."""
        try:
            data = json.loads(self.cache.read_text())
            offer = hb46pp.parse_offer(json.dumps(data["answer"]).encode())
            self.table = chosen(offer, isp)
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
    def judge(self, a: Access, isp: IspConfig) -> tuple[Provisioned | None, float]:
        """The parameters in force after access `a`, and the seconds until the next access."""
        now = self.clock()
        if a.outcome is Outcome.OK:
            offer = a.offer
            assert offer is not None
            if offer.token:
                self.token = offer.token
            wait = hb46pp.next_wait(Outcome.OK, offer.ttl)
            if (table := chosen(offer, isp)) is not None:
                if table != self.table:
                    log.info("HB46PP: %s, valid %s", table.describe(), f"{offer.ttl} s" if offer.ttl else "a day",
                             extra=EVENT)  # fmt: skip
                self._save(offer)
                self.table = table
                self.report = Report("ok", a.detail, offer.source, now, now + wait)
            else:
                keep = "keeping the parameters in force" if self.table else "the bundled tables stay"
                runs = isp.method if isp.method != "auto" else ", ".join(CAPABILITY)
                log.warning("HB46PP: %s; nothing we run (we run %s); %s", a.detail, runs, keep, extra=EVENT)
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
                  apply: Callable[[Provisioned | None], None],
                  resolved: Callable[[tuple[str, IPv6Address] | None], None] = lambda r: None) -> None:  # fmt: skip
        """Until cancelled: ask, judge, hand changed parameters to `apply` and a changed AFTR
        address to `resolved`, wait for the next access or lookup (or a WAN address change, or a
        reload that may have changed [isp] or [dslite])."""
        while True:
            cfg = config()
            isp = cfg.isp
            waits: list[float] = []
            resolvers: list[str] | None = None
            if not isp.provisions:
                self.report = Report("off", f'isp.name = "{isp.name}"' if isp.name != "auto" else "")
                self._drop(apply)
            elif not (resolvers := await self._resolvers(cfg)):
                waits.append(hb46pp.next_wait(Outcome.NO_RECORD))  # as a line without the record: hours
                self.report = Report("no resolver", "no isp.resolvers, and neither the WAN's router advertisements "
                                     "(RDNSS) nor DHCPv6 name a DNS server", self.report.source,
                                     self.report.fetched_at, self.clock() + waits[-1])  # fmt: skip
            else:
                self.asked_for = addresses()
                ca = str(isp.ca_file) if isp.ca_file else None
                a = await asyncio.to_thread(self.ask, resolvers, CAPABILITY, self.token, ca, credentials(isp))
                before = self.table
                table, wait = self.judge(a, isp)
                waits.append(wait)
                if table != before or table != isp.provisioned:
                    apply(table)
            if (name := config().aftr_name()) is not None and ":" not in name:
                if resolvers is None:
                    resolvers = await self._resolvers(config())
                waits.append(await self._look_up(name, resolvers, resolved))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), min(waits, default=None))
            self.wake.clear()

    async def _resolvers(self, cfg: Config) -> list[str]:
        return list(cfg.isp.resolvers) or await asyncio.to_thread(self.learn, cfg.wan.interface)

    async def _look_up(self, name: str, resolvers: list[str],
                       resolved: Callable[[tuple[str, IPv6Address] | None], None]) -> float:  # fmt: skip
        """One lookup of the AFTR's name; the seconds until the next."""
        try:
            found = (name, IPv6Address(await asyncio.to_thread(self.resolve, name, resolvers)))
        except LookupError as e:
            if str(e) != self.aftr_problem:
                keep = f"keeping {self.aftr[1]}" if self.aftr and self.aftr[0] == name else "DS-Lite waits for it"
                log.warning("DS-Lite: the AFTR %s; %s (next try in %.0f s)", e, keep, AFTR_RETRY, extra=EVENT)
            self.aftr_problem = str(e)
            return AFTR_RETRY
        self.aftr_problem = None
        if found != self.aftr:
            log.info("DS-Lite: the AFTR %s is %s", name, found[1], extra=EVENT)
            self.aftr = found
            resolved(found)
        return AFTR_EVERY

    def _drop(self, apply: Callable[[Provisioned | None], None]) -> None:
        if self.table is not None:
            self.table = None
            apply(None)
