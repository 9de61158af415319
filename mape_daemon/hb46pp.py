"""HB46PP (v6mig-prov spec 1.1, CC BY 4.0): the Japanese provisioning protocol that tells a
router which IPv4-over-IPv6 method its line offers, and the parameters. Pure: no I/O.

A TXT record `4over6.info` on the line's own resolver names a server (`v=v6mig-1 url=... t=a|b`);
a GET with our identity and capabilities answers JSON. Every answer is checked before it may
replace anything: a bad or empty one never replaces a working configuration (the caller keeps
the last good one). The spec's access sequence (section 3.6) decides when to ask again.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import metadata
from ipaddress import IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from urllib.parse import urlencode, urlsplit

from .lines import Ipip, Provisioned, check_aftr
from .mapcalc import IidLayout, MappingError, MapRule
from .maprules import RuleTable

TXT_NAME = "4over6.info"
VENDOR_ID = "acde48-mape_daemon"  # acde48: the OUI reserved for private use (spec section 3.3's own example)
PRODUCT = "mape-daemon"
METHODS = ("464xlat", "dslite", "ipip", "lw4o6", "map_e", "map_t")
MAX_TTL = 604800  # section 3.4: at most 7 days


class ProvisioningError(ValueError):
    """An answer that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Pointer:
    """The TXT record: where to ask, and whether the server's certificate is checked (t=b)."""

    url: str
    verify: bool


def parse_txt(records: list[str]) -> Pointer:
    """The first record that is ours (`v=v6mig-1 ...`): its URL and certificate mode. Records
    split into several character-strings come joined."""
    for text in records:
        if not text.startswith("v=v6mig-1 "):
            continue
        fields = dict(part.split("=", 1) for part in text.split()[1:] if "=" in part)
        url, mode = fields.get("url", ""), fields.get("t", "")
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ProvisioningError(f"the {TXT_NAME} record names no usable URL: {text!r}")
        if mode not in ("a", "b"):
            raise ProvisioningError(f"the {TXT_NAME} record's t= is {mode!r}, not a or b: {text!r}")
        if scheme == "http" and mode == "b":
            raise ProvisioningError(f"the {TXT_NAME} record asks to verify a certificate over http: {text!r}")
        return Pointer(url, mode == "b")
    raise ProvisioningError(f"no v=v6mig-1 record among the {TXT_NAME} TXT records {records!r}")


def _version() -> str:
    try:
        return metadata.version("mape-daemon")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "0"


@dataclass(frozen=True)
class Credentials:
    """user/pass a provider handed out (section 3.3), and the server they are for, if named."""

    user: str
    password: str = field(repr=False)
    server: str | None = None


def may_send(credentials: Credentials, pointer: Pointer) -> bool:
    """Section 3.3: with a server named, only over https, verified (t=b), to that host; with none
    named, on any request."""
    if credentials.server is None:
        return True
    parts = urlsplit(pointer.url)
    return parts.scheme == "https" and pointer.verify and parts.hostname == credentials.server.lower()


def query_url(pointer: Pointer, capability: tuple[str, ...], token: str | None = None,
              credentials: Credentials | None = None) -> str:  # fmt: skip
    """The GET URL: the required parameters (section 3.3), the token of the last answer, and
    user/pass where they may go. Never logged whole: it may carry the password."""
    params = {"vendorid": VENDOR_ID, "product": PRODUCT, "version": re.sub(r"[^0-9]", "_", _version())[:32],
              "capability": ",".join(capability)}  # fmt: skip
    if token:
        params["token"] = token
    if credentials is not None and may_send(credentials, pointer):
        params["user"], params["pass"] = credentials.user, credentials.password
    sep = "&" if urlsplit(pointer.url).query else "?"
    return f"{pointer.url}{sep}{urlencode(params)}"


@dataclass(frozen=True)
class MapE:
    br: IPv6Address
    rules: tuple[MapRule, ...]
    mesh: bool = False


@dataclass(frozen=True)
class Offer:
    """A checked 200 answer. `order` empty: nothing on offer (unknown line, failed auth)."""

    order: tuple[str, ...]
    ttl: int | None = None
    token: str | None = None
    enabler: str = ""
    service: str | None = None
    auth: str | None = None
    map_e: MapE | None = None
    dslite_aftr: str | None = None  # an FQDN or an IPv6 address
    ipip: tuple[Ipip, ...] = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def source(self) -> str:
        """Whose parameters these are, for status and the journal."""
        return " ".join(x for x in (self.enabler, self.service) if x) or "the provisioning server"


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = False):
    value = obj.get(key)
    if value is None:
        if required:
            raise ProvisioningError(f"the answer has no {where}{key}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProvisioningError(f"the answer's {where}{key} is {value!r}, not a {getattr(kind, '__name__', kind)}")
    return value


def _map_e(d: dict) -> MapE:
    version = _get(d, "version", int, "map_e.") or 0
    if version not in (0, 1):
        raise ProvisioningError(f"the answer's map_e.version is {version}, not 0 (draft-03) or 1 (RFC 7597)")
    layout = IidLayout.RFC7597 if version == 1 else IidLayout.DRAFT03
    mesh = d.get("mesh", 0)
    if mesh not in (0, 1, True, False):
        raise ProvisioningError(f"the answer's map_e.mesh is {mesh!r}, not 0 or 1")
    try:
        br = IPv6Address(_get(d, "br", str, "map_e.", required=True))
    except ValueError as e:
        raise ProvisioningError(f"the answer's map_e.br: {e}") from None
    rules = []
    for i, r in enumerate(_get(d, "rules", list, "map_e.", required=True)):
        where = f"map_e.rules[{i}]."
        if not isinstance(r, dict):
            raise ProvisioningError(f"the answer's map_e.rules[{i}] is not an object")
        try:
            rules.append(MapRule(
                ipv6_prefix=IPv6Network(_get(r, "ipv6", str, where, required=True)),
                ipv4_prefix=IPv4Network(_get(r, "ipv4", str, where, required=True)),
                ea_len=_get(r, "ea_length", int, where, required=True),
                psid_offset=_get(r, "psid_offset", int, where, required=True),
                br=br, isp="hb46pp", iid=layout,
            ))  # fmt: skip
        except (ValueError, MappingError) as e:
            raise ProvisioningError(f"the answer's {where[:-1]}: {e}") from None
    if not rules:
        raise ProvisioningError("the answer's map_e has no rules")
    return MapE(br, tuple(rules), bool(mesh))


def _ipip(items: list) -> tuple[Ipip, ...]:
    out = []
    for i, d in enumerate(items):
        where = f"ipip[{i}]."
        if not isinstance(d, dict):
            raise ProvisioningError(f"the answer's ipip[{i}] is not an object")
        try:
            # An address, or (some servers) an address with its prefix length.
            out.append(Ipip(IPv6Interface(_get(d, "ipv6_local", str, where, required=True)).ip,
                            IPv6Interface(_get(d, "ipv6_remote", str, where, required=True)).ip,
                            IPv4Interface(_get(d, "ipv4", str, where, required=True))))  # fmt: skip
        except ValueError as e:
            raise ProvisioningError(f"the answer's ipip[{i}]: {e}") from None
    return tuple(out)


def parse_offer(body: bytes) -> Offer:
    """A 200 answer's JSON, checked (section 3.4). Unknown keys are ignored, as the spec allows;
    a method's object is checked only when `order` offers it (a broken object we would never use
    does not throw away a good answer)."""
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProvisioningError(f"the answer is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ProvisioningError("the answer is not a JSON object")
    order = _get(d, "order", list, "", required=True)
    if not all(isinstance(m, str) for m in order):
        raise ProvisioningError(f"the answer's order {order!r} is not a list of method names")
    ttl = _get(d, "ttl", int, "")
    if ttl is not None and not 0 < ttl <= MAX_TTL:
        raise ProvisioningError(f"the answer's ttl {ttl} is outside 1..{MAX_TTL}")
    token = _get(d, "token", str, "")
    map_e = _map_e(_get(d, "map_e", dict, "", required=True)) if "map_e" in order else None
    aftr = None
    if "dslite" in order:
        aftr = _get(_get(d, "dslite", dict, "", required=True), "aftr", str, "dslite.", required=True)
        try:
            check_aftr(aftr)
        except ValueError as e:
            raise ProvisioningError(f"the answer's dslite.aftr: {e}") from None
    ipip = _ipip(_get(d, "ipip", list, "", required=True)) if "ipip" in order else ()
    if "ipip" in order and not ipip:
        raise ProvisioningError("the answer offers ipip with no tunnel in it")
    return Offer(tuple(order), ttl, token, _get(d, "enabler_name", str, "") or "", _get(d, "service_name", str, ""),
                 _get(d, "auth", str, ""), map_e, aftr, ipip, d)  # fmt: skip


def choose(offer: Offer, supported: tuple[str, ...], fixed: str | None = None) -> str | None:
    """The method to run: the user's fixed one if on offer, else the first of `order` we support."""
    if fixed is not None:
        return fixed if fixed in offer.order else None
    return next((m for m in offer.order if m in supported), None)


def rule_table(offer: Offer) -> RuleTable:
    """The offer's MAP-E rules, matched like the bundled ones (the longest IPv6 prefix covering
    ours is the BMR; PSID length follows from the EA length)."""
    if offer.map_e is None:
        raise ProvisioningError("the answer offers no map_e")
    return RuleTable(offer.map_e.rules, about=f"provisioned by HB46PP ({offer.source})")


def provisioned(offer: Offer, method: str) -> Provisioned:
    """The parameters of `method` (the spec's name, one `choose` returned) in `offer`."""
    if method == "map_e":
        return Provisioned("map-e", offer.source, rules=rule_table(offer).rules)
    if method == "dslite":
        return Provisioned("ds-lite", offer.source, aftr=offer.dslite_aftr)
    return Provisioned("ipip", offer.source, ipip=offer.ipip[0])


class Outcome(StrEnum):
    """How one access ended: the spec's section 3.6 steps."""

    NO_RECORD = "no record"  # c.2: NXDOMAIN or NODATA; the line does not provision
    DNS_FAILED = "dns failed"  # c.3: timeout, SERVFAIL, refused
    NO_REPLY = "no reply"  # f.2: the server did not answer (or TLS failed)
    BAD_REPLY = "bad reply"  # h.2: a status other than 200/307, or an answer we cannot use
    OK = "ok"  # k: a usable answer (maybe with nothing on offer)


# Seconds to wait before the next access, drawn uniformly (a fleet must not ask in step).
WINDOWS = {
    Outcome.NO_RECORD: (3600, 10800),
    Outcome.DNS_FAILED: (60, 600),
    Outcome.NO_REPLY: (600, 1800),
    Outcome.BAD_REPLY: (600, 1800),
}
NO_TTL = (72000, 86400)  # k.2


def next_wait(outcome: Outcome, ttl: int | None = None, rng: random.Random | None = None) -> float:
    """Seconds until the next access (an IPv6 address change asks at once, whatever this says).
    With a ttl: between 90% and 100% of it, so routers that asked together drift apart without
    ever holding an answer past its ttl."""
    rng = rng or random
    if outcome is Outcome.OK:
        return rng.uniform(0.9 * ttl, ttl) if ttl else rng.uniform(*NO_TTL)
    return rng.uniform(*WINDOWS[outcome])
