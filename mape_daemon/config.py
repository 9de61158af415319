"""The configuration file (TOML), validated before anything touches the kernel.

Every model is frozen and forbids unknown keys, so a typo is an error that names the key.
"""

from __future__ import annotations

import tomllib
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import rules
from .mapcalc import IidLayout, MapError, Rule

DEFAULT_PATH = Path("/etc/mape-daemon/mape.toml")
IFNAME = Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[^\s/:]+$")]


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, the key and the problem."""


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

    def to_rule(self) -> Rule:
        return Rule(
            self.ipv6_prefix, self.ipv4_prefix, self.ea_len, self.psid_offset, self.psid_len, self.br, None, self.iid
        )


class Isp(Model):
    name: Literal["auto", "ocn", "v6plus", "biglobe", "nuro", "explicit"] = "auto"
    rule: ExplicitRule | None = None
    psid: int | None = Field(default=None, ge=0, le=65535, description="provisioned PSID (EA bits carry none)")

    @model_validator(mode="after")
    def _rule_iff_explicit(self) -> Isp:
        if (self.name == "explicit") != (self.rule is not None):
            raise ValueError('give [isp.rule] exactly when name = "explicit"')
        if self.rule is not None:
            try:
                self.rule.to_rule()
            except MapError as e:
                raise ValueError(str(e)) from None
        return self

    def rule_table(self) -> rules.RuleTable:
        """The rules this config may map a WAN prefix with."""
        if self.rule is not None:
            return rules.RuleTable((self.rule.to_rule(),))
        return rules.bundled()

    @property
    def isp_filter(self) -> str | None:
        return None if self.name in ("auto", "explicit") else self.name


class Wan(Model):
    interface: IFNAME


class Tunnel(Model):
    name: IFNAME = "ip6tnl1"
    mtu: int = Field(default=1460, ge=1280, le=65000)
    encap_limit: Literal["none"] = Field(default="none", description="the Linux default of 4 is dropped by some ISPs")
    hop_limit: int = Field(default=64, ge=1, le=255)


class RouteConf(Model):
    default: bool = True
    metric: int = Field(default=0, ge=0, le=2**32 - 1)


def _parse_port_spec(spec: int | str) -> tuple[int, int]:
    if isinstance(spec, int):
        lo = hi = spec
    else:
        lo_s, _, hi_s = spec.partition("-")
        lo, hi = int(lo_s), int(hi_s or lo_s)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port or range {spec!r} (1-65535, lo-hi)")
    return lo, hi


class Snat(Model):
    protocols: tuple[Literal["tcp", "udp", "icmp"], ...] = ("tcp", "udp", "icmp")
    reserved_ports: tuple[int | str, ...] = Field(default=(), description="kept out of the SNAT pool (port forwards)")

    @field_validator("reserved_ports")
    @classmethod
    def _ports(cls, v: tuple[int | str, ...]) -> tuple[int | str, ...]:
        for spec in v:
            _parse_port_spec(spec)
        return v

    @field_validator("protocols")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("protocols repeat")
        return v

    def reserved_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(_parse_port_spec(s) for s in self.reserved_ports)


class Mss(Model):
    clamp: bool = True


class Firewall(Model):
    backend: Literal["auto", "iptables-legacy", "iptables-nft"] = "auto"


class Pppoe(Model):
    interface: IFNAME = "ppp0"
    fwmark: int = Field(default=1000, ge=1, le=2**32 - 1)
    mask: int = Field(default=0xFFFF, ge=1, le=2**32 - 1, description="only these mark bits are ours")
    table: int = Field(default=10, ge=1, le=2**32 - 1)
    rule_priority: int = Field(default=5000, ge=1, le=32765)
    lan_interfaces: tuple[IFNAME, ...] = ()
    hosts: tuple[IPv4Network, ...] = Field(default=(), description="LAN hosts or subnets that always use PPPoE")
    mark_incoming: bool = True
    masquerade: bool = True
    rp_filter: Literal["loose", "keep"] = "loose"

    @model_validator(mode="after")
    def _mark_in_mask(self) -> Pppoe:
        if self.fwmark & ~self.mask:
            raise ValueError(f"fwmark {self.fwmark:#x} has bits outside mask {self.mask:#x}")
        if self.table in (253, 254, 255):
            raise ValueError(f"table {self.table} is a kernel table (default, main, local)")
        return self


class Daemon(Model):
    on_stop: Literal["remove", "keep"] = "remove"
    sync_interval: float = Field(default=60, ge=1, le=86400, description="periodic full sync, seconds")


class Config(Model):
    wan: Wan
    isp: Isp = Isp()
    tunnel: Tunnel = Tunnel()
    route: RouteConf = RouteConf()
    snat: Snat = Snat()
    mss: Mss = Mss()
    firewall: Firewall = Firewall()
    pppoe: Pppoe | None = None
    daemon: Daemon = Daemon()

    @model_validator(mode="after")
    def _names_apart(self) -> Config:
        if self.tunnel.name == self.wan.interface:
            raise ValueError("tunnel.name and wan.interface are the same interface")
        if self.pppoe and self.pppoe.interface in (self.tunnel.name, self.wan.interface):
            raise ValueError("pppoe.interface must differ from the tunnel and the WAN interface")
        return self


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-after", "tagged-union")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


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
