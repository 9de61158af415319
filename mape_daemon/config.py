"""The configuration file (TOML), validated before anything touches the kernel.

Every model is frozen and forbids unknown keys, so a typo is an error that names the key; a rule
that ties several keys together names the key it blames, with the value and the rule.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import maprules
from .lines import NoParameters, Provisioned, check_aftr
from .mapcalc import IidLayout, MappingError, MapRule, range_text

DEFAULT_PATH = Path("/etc/mape-daemon/mape.toml")
IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, the key and the problem."""


def key_error(key: str, message: str) -> ValueError:
    """An error about `key` (relative to the section whose validator raises it)."""
    return ValueError(f"@{key} {message}")


# The kernel allows them in a name, but nftables' and iptables-restore's text cannot carry them
# (a double quote ends nft's string; iptables-restore strips quotes and backslashes).
UNQUOTABLE = "\"'\\"


def check_ifname(name: str) -> str:
    """The kernel's rules for an interface name (dev_valid_name), plus what the firewall text
    cannot carry (quotes, backslash) and the two characters it reads as wildcards. VLANs
    (`eth0.10`), bridges and every other ASCII punctuation (`-_.@#;{}+=...`) are fine: a test loads
    our table and chains with each of them (tests/test_firewall_contract.py)."""
    size = len(name.encode())
    if not 0 < size < IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is {size} bytes; Linux allows 1 to {IFNAMSIZ - 1}")
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid interface name")
    bad = sorted({c for c in name if c in "/:" or c.isspace()})
    if bad:
        raise ValueError(f"interface name {name!r} has {', '.join(map(repr, bad))}, which Linux does not allow")
    if quotes := sorted({c for c in name if c in UNQUOTABLE}):
        raise ValueError(f"interface name {name!r} has {', '.join(map(repr, quotes))}, which nftables and iptables "
                         "rules cannot carry: rename the interface")  # fmt: skip
    if name.endswith("+") or "*" in name:
        raise ValueError(f"interface name {name!r}: iptables and nftables read a trailing + or a * as a wildcard")
    return name


IfName = Annotated[str, AfterValidator(check_ifname)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExplicitRule(Model):
    ipv6_prefix: IPv6Network
    ipv4_prefix: IPv4Network
    ea_len: int = Field(ge=0, le=48)
    psid_offset: int = Field(default=6, ge=0, le=15)
    psid_len: int | None = Field(default=None, ge=0, le=16)
    br: IPv6Address
    iid: IidLayout = IidLayout.DRAFT03

    def to_rule(self) -> MapRule:
        return MapRule(
            self.ipv6_prefix, self.ipv4_prefix, self.ea_len, self.psid_offset, self.psid_len, self.br, None, self.iid
        )


def check_resolver(text: str) -> str:
    """A resolver address; link-local with its interface (fe80::1%wan0), as an RA announces it."""
    addr, _, zone = text.partition("%")
    try:
        ip = ip_address(addr)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if ip.version == 6 and ip.is_link_local and not zone:
        raise ValueError(f"{text!r} is link-local: add its interface, as in {addr}%wan0")
    if zone:
        check_ifname(zone)
    return text


class IspConfig(Model):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: Literal["auto", "ocn", "v6plus", "biglobe", "nuro", "explicit"] = "auto"
    method: Literal["auto", "map-e", "ds-lite", "ipip"] = Field(
        default="auto", description="auto: the method HB46PP offers first, else MAP-E by the rule tables"
    )
    rule: ExplicitRule | None = None
    psid: int | None = Field(default=None, ge=0, le=65535, description="provisioned PSID (EA bits carry none)")
    provisioning: Literal["auto", "hb46pp", "off"] = Field(
        default="auto", description="HB46PP: auto = its rules if the line answers, else the bundled tables"
    )
    resolvers: tuple[Annotated[str, AfterValidator(check_resolver)], ...] = Field(
        default=(), description="the line's own DNS servers, where the HB46PP record is (none: the RA's RDNSS)"
    )
    ca_file: Path | None = Field(default=None, description="a private CA for the provisioning server (t=b)")
    provisioning_user: str | None = Field(default=None, pattern=r"^[0-9A-Za-z_-]{1,32}$")
    provisioning_password: str | None = Field(default=None, pattern=r"^[0-9A-Za-z_-]{1,32}$", repr=False)
    provisioning_server: str | None = Field(default=None, description="the host the credentials are for (https only)")
    # What HB46PP provisioned: set by the daemon (with_provisioned), never by the file.
    provisioned: Provisioned | None = Field(default=None, exclude=True, repr=False)

    @field_validator("provisioned", mode="before")
    @classmethod
    def _not_from_the_file(cls, value: object) -> None:
        if value is not None:
            raise ValueError("is set by the daemon from HB46PP answers, not in the config")
        return None

    @model_validator(mode="after")
    def _rule_iff_explicit(self) -> IspConfig:
        if self.name == "explicit" and self.rule is None:
            raise key_error("rule", 'is required when isp.name = "explicit"')
        if self.name != "explicit" and self.rule is not None:
            raise key_error("rule", f'is only used with isp.name = "explicit" (not {self.name!r})')
        if self.method in ("ds-lite", "ipip") and self.name != "auto":
            raise key_error("name", f"{self.name!r} names MAP-E rules, and isp.method is {self.method!r}: leave it out")
        if self.rule is not None:
            try:
                self.rule.to_rule()
            except MappingError as e:
                raise key_error("rule", str(e)) from None
        return self

    @model_validator(mode="after")
    def _user_with_password(self) -> IspConfig:
        if (self.provisioning_user is None) != (self.provisioning_password is None):
            raise key_error("provisioning_password", "and provisioning_user go together (HB46PP sends both or neither)")
        if self.provisioning_server is not None and self.provisioning_user is None:
            raise key_error("provisioning_server", "names where provisioning_user may be sent: set that too")
        return self

    @property
    def provisions(self) -> bool:
        """HB46PP may give the rules: asked for, and no ISP or rule fixed by the user."""
        return self.provisioning != "off" and self.name == "auto"

    def with_provisioned(self, offered: Provisioned | None) -> IspConfig:
        return self.model_copy(update={"provisioned": offered})

    def offered(self, method: str) -> Provisioned | None:
        """HB46PP's parameters for `method`, if it provisions and offered that method."""
        p = self.provisioned
        return p if self.provisions and p is not None and p.method == method else None

    def rule_table(self) -> maprules.RuleTable:
        """The rules this config may map a WAN prefix with (before HB46PP's, see `match`)."""
        if self.rule is not None:
            return maprules.RuleTable((self.rule.to_rule(),))
        return maprules.bundled()

    def match(self, prefix: IPv6Network | IPv6Address) -> MapRule:
        """The rule for `prefix`: HB46PP's when it provisions one (the bundled tables after it,
        unless provisioning = "hb46pp"), else the configured or bundled rules."""
        if self.provisions:
            if (offered := self.offered("map-e")) is not None:
                try:
                    return maprules.RuleTable(offered.rules).match(prefix)
                except maprules.NoRuleError:
                    if self.provisioning == "hb46pp":
                        raise
            elif self.provisioning == "hb46pp":
                raise maprules.NoRuleError(f'{prefix}: no HB46PP answer yet (isp.provisioning = "hb46pp")')
        return self.rule_table().match(prefix, self.isp_filter)

    @property
    def isp_filter(self) -> str | None:
        return None if self.name in ("auto", "explicit") else self.name


class WanConfig(Model):
    interface: IfName
    prefix_from: Literal["auto", "slaac", "pd"] = Field(
        default="auto", description="where the prefix comes from: the WAN's SLAAC addresses, a DHCPv6-PD delegation, "
        "or both (auto: a delegation first)")  # fmt: skip


class LanConfig(Model):
    interfaces: tuple[IfName, ...] = Field(default=(), description="LAN-facing interfaces (PPPoE replies)")


class TunnelConfig(Model):
    name: IfName = "ip6tnl1"
    mtu: int = Field(default=1460, ge=1280, le=65000)
    encap_limit: str | int = Field(default="none", description="the Linux default of 4 adds a header some ISPs drop")
    hop_limit: int = Field(default=64, ge=1, le=255)

    @field_validator("encap_limit")
    @classmethod
    def _encap_limit(cls, v: str | int) -> str | int:
        if v != "none" and not (isinstance(v, int) and 0 <= v <= 255):
            raise ValueError(f'{v!r}: give "none" (no encapsulation-limit option; what the ISPs expect) or 0-255')
        return v


def _daemon_only(value: object) -> None:
    if value is not None:
        raise ValueError("is set by the daemon, not in the config")
    return None


class DsliteConfig(Model):
    aftr: str | None = Field(default=None, description="the AFTR: an IPv6 address, or a name the line's resolvers know")
    interface_id: IPv6Address = Field(default=IPv6Address("::b4"), description="the B4 address in the prefix's /64")
    # The AFTR name's address, resolved on the line's resolvers: set by the daemon, never by the file.
    resolved: tuple[str, IPv6Address] | None = Field(default=None, exclude=True, repr=False)
    _resolved = field_validator("resolved", mode="before")(_daemon_only)

    @field_validator("aftr")
    @classmethod
    def _aftr(cls, v: str | None) -> str | None:
        return None if v is None else check_aftr(v)

    @field_validator("interface_id")
    @classmethod
    def _iid(cls, v: IPv6Address) -> IPv6Address:
        return check_iid(v)


def check_iid(v: IPv6Address) -> IPv6Address:
    if int(v) >= 1 << 64 or int(v) == 0:
        raise ValueError(f"{v} is not an interface identifier (nonzero, within the last 64 bits, as ::feed)")
    return v


class IpipConfig(Model):
    """A fixed IPv4 over IPIP; what is unset comes from HB46PP where the line provisions."""

    remote: IPv6Address | None = Field(default=None, description="the provider's tunnel end")
    ipv4: IPv4Address | None = Field(default=None, description="the fixed IPv4 address")
    interface_id: IPv6Address | None = Field(default=None, description="ours in the prefix's /64, as the provider says")
    update_url: str | None = Field(default=None, description="called after each change of our tunnel address")
    update_user: str | None = None
    update_password: str | None = Field(default=None, repr=False)
    update_ca_file: Path | None = Field(default=None, description="a private CA for the update endpoint")

    @field_validator("interface_id")
    @classmethod
    def _iid(cls, v: IPv6Address | None) -> IPv6Address | None:
        return None if v is None else check_iid(v)

    @field_validator("update_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/?#]+", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        try:
            v.format(ipv6="::", ipv4="0.0.0.0", user="", password="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{v!r}: only {{ipv6}}, {{ipv4}}, {{user}} and {{password}} are filled in (not {e})"
            ) from None
        return v

    @model_validator(mode="after")
    def _user_with_password(self) -> IpipConfig:
        if (self.update_user is None) != (self.update_password is None):
            raise key_error("update_password", "and update_user go together")
        if self.update_user is not None and self.update_url is None:
            raise key_error("update_user", "is for update_url: set that too")
        return self


class RouteConfig(Model):
    default: bool = True
    metric: int = Field(default=0, ge=0, le=2**32 - 1)


def parse_port_spec(spec: int | str) -> tuple[int, int]:
    if isinstance(spec, int):
        lo = hi = spec
    else:
        lo_s, _, hi_s = spec.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s or lo_s)
        except ValueError:
            raise ValueError(f"bad port or range {spec!r} (a number 1-65535, or lo-hi)") from None
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port or range {spec!r} (1-65535, lo-hi)")
    return lo, hi


Protocol = Literal["tcp", "udp", "icmp"]


class SnatConfig(Model):
    protocols: tuple[Protocol, ...] = ("tcp", "udp", "icmp")
    # RFC 4787: one LAN socket keeps one external port for every destination (games, calls) ...
    udp_mapping: Literal["endpoint-independent", "per-connection"] = "endpoint-independent"
    # ... and who may send to it: anyone once it has sent out, the hosts it sent to, or only the
    # exact address and port it sent to (conntrack alone, the safest).
    udp_filtering: Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"] = (
        "address-and-port-dependent"
    )
    reserved_ports: tuple[int | str, ...] = Field(default=(), description="kept out of the SNAT pool (port forwards)")

    @field_validator("reserved_ports")
    @classmethod
    def _ports(cls, v: tuple[int | str, ...]) -> tuple[int | str, ...]:
        for spec in v:
            parse_port_spec(spec)
        return v

    @field_validator("protocols")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} names a protocol twice")
        if not v:
            raise ValueError("is empty: nothing could cross the tunnel")
        return v

    def reserved_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(parse_port_spec(s) for s in self.reserved_ports)


class ForwardConfig(Model):
    """One `[[forward]]`: IPv4 arriving by the tunnel on an external port (or range) of the set,
    sent on to a LAN host."""

    name: str = ""
    protocol: Literal["tcp", "udp"]
    port: int | str  # external: 25952, or "25952-25967"
    to: IPv4Address
    to_port: int | None = Field(default=None, ge=1, le=65535)  # default: the same port

    @field_validator("port")
    @classmethod
    def _port(cls, v: int | str) -> int | str:
        parse_port_spec(v)
        return v

    @field_validator("to")
    @classmethod
    def _host(cls, v: IPv4Address) -> IPv4Address:
        if v.is_unspecified or v.is_multicast or v.is_loopback or v == IPv4Address("255.255.255.255"):
            raise ValueError(f"{v} is not a LAN host")
        return v

    @model_validator(mode="after")
    def _range_keeps_ports(self) -> ForwardConfig:
        lo, hi = self.external
        if hi > lo and self.to_port not in (None, lo):
            raise key_error("to_port", f"a range ({self.port}) is forwarded to the same ports: leave to_port out")
        return self

    @property
    def external(self) -> tuple[int, int]:
        return parse_port_spec(self.port)

    def describe(self) -> str:
        lo, _ = self.external
        ext = range_text(self.external)
        to = f"{self.to}:{self.to_port}" if self.to_port and self.to_port != lo else str(self.to)
        return f"{self.name + ' ' if self.name else ''}{self.protocol} {ext} -> {to}"


class InboundConfig(Model):
    # New IPv4 connections arriving by the tunnel reach only [[forward]]s (replies and ICMP errors
    # of our own flows pass); false: the host firewall decides. Native IPv6 is never touched.
    closed: bool = True


class UpnpConfig(Model):
    # A miniupnpd config kept in step with the mapping (see upnp.py and the README's "UPnP").
    enabled: bool = False
    base: Path = Field(default=Path("/etc/miniupnpd/miniupnpd.conf"), description="your miniupnpd settings")
    file: Path = Field(default=Path("/run/mape-daemon/miniupnpd.conf"), description="what miniupnpd reads (-f)")
    # --no-block: miniupnpd.service starts After= us, so a waiting start would wait on our own start.
    # start: when the file first appears (at boot miniupnpd was skipped for want of it); restart:
    # on every change after (try-restart: never starts a miniupnpd you stopped); check: whether it
    # runs, asked 10 s after either.
    start: str = Field(default="systemctl --no-block start miniupnpd.service", min_length=1)
    restart: str = Field(default="systemctl --no-block try-restart miniupnpd.service", min_length=1)
    check: str = Field(default="systemctl is-active --quiet miniupnpd.service", min_length=1)

    @field_validator("base", "file")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"{str(v)!r} is not an absolute path")
        return v

    @field_validator("start", "restart", "check")
    @classmethod
    def _command(cls, v: str) -> str:
        try:
            words = shlex.split(v)
        except ValueError as e:
            raise ValueError(f"{v!r} is not a command line: {e}") from None
        if not words:
            raise ValueError("empty command")
        return v

    @model_validator(mode="after")
    def _apart(self) -> UpnpConfig:
        if self.base == self.file:
            raise key_error("file", f"{str(self.file)!r} is also upnp.base: we rewrite it, so it cannot hold yours")
        return self


class MssConfig(Model):
    clamp: bool = True


class FirewallConfig(Model):
    backend: Literal["auto", "nftables", "iptables-nft", "iptables-legacy"] = "auto"
    guard: bool = Field(default=True, description="the nftables and tc egress guards: nothing leaves the tunnel wrong")


class FirewalldConfig(Model):
    zone: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,17}$",  # firewalld's own limit for zone names
        description="bind the tunnel to this firewalld zone at runtime, again after every reload",
    )


class PppoeConfig(Model):
    interface: IfName = "ppp0"
    fwmark: int = Field(default=1000, ge=1, le=2**32 - 1)
    mask: int = Field(default=0xFFFF, ge=1, le=2**32 - 1, description="only these mark bits are ours")
    table: int = Field(default=10, ge=1, le=2**32 - 1)
    rule_priority: int = Field(default=5000, ge=2, le=32765)
    lan_interfaces: tuple[IfName, ...] = Field(default=(), description="deprecated: use [lan] interfaces")
    hosts: tuple[IPv4Network, ...] = Field(default=(), description="LAN hosts or subnets that always use PPPoE")
    mark_incoming: bool = True
    masquerade: bool = True
    rp_filter: Literal["loose", "keep"] = "loose"

    @model_validator(mode="after")
    def _mark_in_mask(self) -> PppoeConfig:
        if self.fwmark & ~self.mask:
            raise key_error(
                "fwmark", f"{self.fwmark:#x} has bits outside pppoe.mask {self.mask:#x} (only the mask's bits are ours)"
            )
        if self.table in (0, 253, 254, 255):
            raise key_error("table", f"{self.table} is a kernel table (default, main, local); pick another, e.g. 10")
        return self


class MetricsConfig(Model):
    # Prometheus /metrics, served by the daemon (README "Metrics"). Unset: off. An address and a
    # port: "127.0.0.1:9849" or "[::1]:9849" (loopback keeps the mapping to this host).
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            listen_address(v)
        return v

    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else listen_address(self.listen)


def listen_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9849' or '[::1]:9849' -> (address, port); ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{text!r} is not ADDRESS:PORT (e.g. "127.0.0.1:9849" or "[::1]:9849")')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        IPv6Address(host) if ":" in host else IPv4Address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


class PortsConfig(Model):
    # Port exhaustion (README "Metrics"): conntrack is read every check_every seconds (one dump of
    # its table; 60 keeps an idle router quiet, see the README's benchmarks); a protocol
    # using warn_percent of the set, or a full block, is one journal line, and its end another.
    warn_percent: float = Field(default=80, gt=0, le=100)
    check_every: float = Field(default=60, ge=5, le=3600, description="seconds between two readings of conntrack")


class DaemonConfig(Model):
    on_stop: Literal["remove", "keep"] = "remove"
    # Unset: 900 s where our netfilter state announces its changes (nftables, iptables-nft), 60 s
    # on iptables-legacy, whose `iptables -F` only a full sync finds (see runner.full_check_period).
    sync_interval: float | None = Field(default=None, ge=1, le=86400, description="periodic full sync, seconds")
    hold_down: float = Field(default=10, ge=0, le=3600, description="seconds a lost WAN prefix is waited for")


class Config(Model):
    wan: WanConfig
    lan: LanConfig = LanConfig()
    isp: IspConfig = IspConfig()
    dslite: DsliteConfig = DsliteConfig()
    ipip: IpipConfig = IpipConfig()
    tunnel: TunnelConfig = TunnelConfig()
    route: RouteConfig = RouteConfig()
    snat: SnatConfig = SnatConfig()
    mss: MssConfig = MssConfig()
    firewall: FirewallConfig = FirewallConfig()
    firewalld: FirewalldConfig = FirewalldConfig()
    pppoe: PppoeConfig | None = None
    daemon: DaemonConfig = DaemonConfig()
    forward: tuple[ForwardConfig, ...] = ()
    inbound: InboundConfig = InboundConfig()
    upnp: UpnpConfig = UpnpConfig()
    metrics: MetricsConfig = MetricsConfig()
    ports: PortsConfig = PortsConfig()

    @model_validator(mode="after")
    def _forwards_apart(self) -> Config:
        seen: dict[tuple[str, int], int] = {}
        for i, f in enumerate(self.forward):
            lo, hi = f.external
            for port in range(lo, hi + 1):
                if (j := seen.get((f.protocol, port))) is not None:
                    raise key_error(f"forward.{i}.port", f"{f.protocol} port {port} is also forwarded by "
                                f"forward.{j} ({self.forward[j].describe()})")  # fmt: skip
                seen[(f.protocol, port)] = i
        return self

    def forwarded_ranges(self) -> tuple[tuple[int, int], ...]:
        """External ports of every forward: out of the SNAT pool, whatever the protocol."""
        return tuple(f.external for f in self.forward)

    @model_validator(mode="after")
    def _names_apart(self) -> Config:
        wan, tunnel = self.wan.interface, self.tunnel.name
        if tunnel == wan:
            raise key_error("tunnel.name", f"{tunnel!r} is also wan.interface: the tunnel needs its own name")
        if tunnel in self.lan_interfaces or wan in self.lan_interfaces:
            raise key_error("lan.interfaces", f"{list(self.lan_interfaces)} names the WAN or the tunnel")
        if self.pppoe and self.pppoe.interface in (tunnel, wan):
            raise key_error("pppoe.interface", f"{self.pppoe.interface!r} must differ from the tunnel and the WAN")
        return self

    def with_provisioned(self, offered: Provisioned | None) -> Config:
        """This config with HB46PP's parameters (kept across reloads by the daemon)."""
        return self.model_copy(update={"isp": self.isp.with_provisioned(offered)})

    def with_resolved(self, resolved: tuple[str, IPv6Address] | None) -> Config:
        """This config with the AFTR name's address (kept across reloads by the daemon)."""
        return self.model_copy(update={"dslite": self.dslite.model_copy(update={"resolved": resolved})})

    @model_validator(mode="after")
    def _method_complete(self) -> Config:
        """A method fixed without HB46PP must have its parameters in the file."""
        if self.isp.provisions:
            return self
        if self.isp.method == "ds-lite" and self.dslite.aftr is None:
            raise key_error("dslite.aftr", 'is required with isp.method = "ds-lite" (HB46PP is off)')
        if self.isp.method == "ipip":
            for key in ("remote", "ipv4", "interface_id"):
                if getattr(self.ipip, key) is None:
                    raise key_error(f"ipip.{key}", 'is required with isp.method = "ipip" (HB46PP is off)')
        return self

    def method(self) -> str:
        """The method in force: the one the user fixed, else HB46PP's, else MAP-E."""
        if self.isp.method != "auto":
            return self.isp.method
        p = self.isp.provisioned
        return p.method if self.isp.provisions and p is not None else "map-e"

    def aftr_name(self) -> str | None:
        """The AFTR as the file or HB46PP gives it (a name or an address), with DS-Lite in force."""
        if self.method() != "ds-lite":
            return None
        offered = self.isp.offered("ds-lite")
        return self.dslite.aftr or (offered.aftr if offered else None)

    def aftr(self) -> IPv6Address:
        name = self.aftr_name()
        if name is None:
            raise NoParameters("no AFTR: set [dslite] aftr, or use a line whose HB46PP answer gives one")
        if ":" in name:
            return IPv6Address(name)
        if self.dslite.resolved is not None and self.dslite.resolved[0] == name:
            return self.dslite.resolved[1]
        raise NoParameters(f"the AFTR {name} has no address yet (asked on the line's resolvers)")

    def ipip_tunnel(self) -> tuple[IPv6Address, IPv4Address, IPv6Address]:
        """(provider end, fixed IPv4, our interface identifier): the file's, else HB46PP's (its
        ipv6_local, whose low 64 bits lines.with_interface_id takes)."""
        c, offered = self.ipip, self.isp.offered("ipip")
        o = offered.ipip if offered else None
        remote = c.remote or (o.remote if o else None)
        ipv4 = c.ipv4 or (o.ipv4.ip if o else None)
        iid = c.interface_id or (o.local if o else None)
        if remote is None or ipv4 is None or iid is None:
            missing = [k for k, v in (("remote", remote), ("ipv4", ipv4), ("interface_id", iid)) if v is None]
            raise NoParameters(f"IPIP has no {', '.join(missing)}: set [ipip] {missing[0]}, or use a line whose "
                               "HB46PP answer gives it")  # fmt: skip
        return remote, ipv4, iid

    @property
    def lan_interfaces(self) -> tuple[str, ...]:
        """[lan] interfaces, plus the deprecated pppoe.lan_interfaces."""
        extra = self.pppoe.lan_interfaces if self.pppoe else ()
        return tuple(dict.fromkeys((*self.lan.interfaces, *extra)))

    def warnings(self) -> list[str]:
        out = []
        if self.pppoe and self.pppoe.lan_interfaces:
            out.append("pppoe.lan_interfaces is deprecated: move the names to [lan] interfaces")
        if self.upnp.enabled and not self.upnp.base.is_file():
            out.append(f"upnp.base {self.upnp.base} does not exist: install miniupnpd, or point upnp.base at "
                       "your miniupnpd settings (its listening_ip at least)")  # fmt: skip
        return out


# Parts of a pydantic error location that name a union member, not a key.
UNION_TAGS = frozenset({"int", "str", "constrained-int"})
UNION_PREFIXES = ("function-after", "tagged-union", "literal[")


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if str(x) not in UNION_TAGS and not str(x).startswith(UNION_PREFIXES))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if msg.startswith("@"):
            key, _, msg = msg[1:].partition(" ")
            loc = f"{loc}.{key}" if loc else key
        elif err["type"] not in ("missing", "extra_forbidden", "value_error") and not isinstance(
            err.get("input"), dict | list | None
        ):
            msg = f"{err['input']!r}: {msg}"  # the value the limit or type refers to
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts))


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def load(path: Path | str = DEFAULT_PATH) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse(text, str(path))
