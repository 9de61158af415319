"""Links, addresses, routes, routing rules and sysctls through rtnetlink (pyroute2).

Creation is exclusive (the kernel refuses to create over an existing object), never `replace`,
so an object of another program is never overwritten; deletion names our protocol number, so it
can only remove ours. An add that finds our own identical object, and a delete that finds ours
already gone, are success: every primitive is idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import CannotRunHere, ConflictError, RetryableError
from ..state import RT_PROTO, Address, Route, RoutingRule, Tunnel, WanAddress

IFA_F_NODAD, IFA_F_DEPRECATED, IFA_F_TENTATIVE, IFA_F_NOPREFIXROUTE = 0x02, 0x20, 0x40, 0x200
IFF_UP = 0x1
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1
IPPROTO_IPIP, IPPROTO_IPV6 = 4, 41
MODES = {IPPROTO_IPIP: "ipip6", IPPROTO_IPV6: "ip6ip6", 0: "any"}
RTN_UNICAST, RTN_UNREACHABLE = 1, 7
SUPPRESS_UNSET = 0xFFFFFFFF
RT_SCOPE_NOWHERE = 255
OK_ON_DEL = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV}
SYSCTL_CONF = Path("/proc/sys/net/ipv4/conf")


def _attr(msg, name, default=None):
    value = msg.get_attr(name)
    return default if value is None else value


def _flags(msg) -> int:
    return _attr(msg, "IFA_FLAGS", msg["flags"])


def rp_filter_path(ifname: str) -> Path:
    """A path per interface, never a dotted sysctl key: `br0.10` is one name, not two levels."""
    return SYSCTL_CONF / ifname / "rp_filter"


def _route(r, names: dict[int, str], family: int) -> Route:
    return Route(
        dst="default" if r["dst_len"] == 0 else f"{r.get_attr('RTA_DST')}/{r['dst_len']}",
        dev=names.get(_attr(r, "RTA_OIF", 0), ""),
        table=_attr(r, "RTA_TABLE", r["table"]),
        metric=_attr(r, "RTA_PRIORITY", 0),
        family=family,
        kind="unreachable" if r["type"] == RTN_UNREACHABLE else "unicast",
    )


def describe_foreign(r: Route, proto: int | None = None) -> str:
    table = "main" if r.table == 254 else str(r.table)
    kind = "unreachable " if r.kind == "unreachable" else ""
    dev = f" dev {r.dev}" if r.dev else ""
    return f"{kind}{r.dst}{dev} table {table} metric {r.metric}" + (f" proto {proto}" if proto is not None else "")


class Netlink:
    """One rtnetlink socket for one sync (it is bound to the thread that opened it)."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.writes = 0
        self._links: list | None = None

    def close(self) -> None:
        self.ipr.close()

    # --- observation -----------------------------------------------------------------------
    def link_dump(self, fresh: bool = False) -> list:
        if self._links is None or fresh:
            self._links = list(self.ipr.get_links())
        return self._links

    def links(self) -> dict[str, tuple[int, str]]:
        """name -> (index, kind); kind is "" for a device without link info (ethernet, lo)."""
        out = {}
        for link in self.link_dump(fresh=True):
            info = link.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
            out[link.get_attr("IFLA_IFNAME")] = (link["index"], kind)
        return out

    def tunnels(self) -> dict[str, Tunnel]:
        """Every ip6tnl with its parameters (ours or not: a foreign one may block ours)."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self.link_dump()}
        out = {}
        for link in self.link_dump():
            info = link.get_attr("IFLA_LINKINFO")
            if not info or info.get_attr("IFLA_INFO_KIND") != "ip6tnl":
                continue
            data = info.get_attr("IFLA_INFO_DATA")
            flags = _attr(data, "IFLA_IP6TNL_FLAGS", 0)
            name = link.get_attr("IFLA_IFNAME")
            out[name] = Tunnel(
                name=name,
                local=_attr(data, "IFLA_IP6TNL_LOCAL", "::"),
                remote=_attr(data, "IFLA_IP6TNL_REMOTE", "::"),
                link=names.get(_attr(data, "IFLA_IP6TNL_LINK", 0), ""),
                mtu=link.get_attr("IFLA_MTU"),
                hop_limit=_attr(data, "IFLA_IP6TNL_TTL", 0),
                mode=MODES.get(_attr(data, "IFLA_IP6TNL_PROTO", 0), "unknown"),
                encap_limit="none"
                if flags & IP6_TNL_F_IGN_ENCAP_LIMIT
                else str(_attr(data, "IFLA_IP6TNL_ENCAP_LIMIT", 4)),
                up=bool(link["flags"] & IFF_UP),
            )
        return out

    def wan_addresses(self, wan_index: int) -> list[WanAddress]:
        out = []
        for a in self.ipr.get_addr(family=socket.AF_INET6, index=wan_index):
            if a["scope"] != 0:  # global only
                continue
            flags = _flags(a)
            cache = a.get_attr("IFA_CACHEINFO")
            preferred = cache["ifa_preferred"] if cache else 0xFFFFFFFF
            out.append(
                WanAddress(
                    address=a.get_attr("IFA_ADDRESS"),
                    prefixlen=a["prefixlen"],
                    deprecated=bool(flags & IFA_F_DEPRECATED) or preferred == 0,
                    tentative=bool(flags & IFA_F_TENTATIVE),
                    ours_shape=a["prefixlen"] == 128
                    and flags & (IFA_F_NODAD | IFA_F_NOPREFIXROUTE) == (IFA_F_NODAD | IFA_F_NOPREFIXROUTE),
                    preferred_lft=preferred,
                )
            )
        return out

    def addresses(self, ifname: str, index: int, family: int) -> list[Address]:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        return [
            Address(ifname, a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in self.ipr.get_addr(family=fam, index=index)
        ]

    def routes(self, foreign_tables: frozenset[int] = frozenset()) -> tuple[list[Route], list[Route]]:
        """Ours (protocol 203, every table) and, in `foreign_tables`, every other IPv4 route."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self.link_dump()}
        ours, foreign = [], []
        for family, fam in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for r in self.ipr.get_routes(family=family):  # no table given: every table
                if r["proto"] == RT_PROTO:
                    ours.append(_route(r, names, fam))
                elif fam == 4 and _attr(r, "RTA_TABLE", r["table"]) in foreign_tables and r["type"] != 2:
                    foreign.append(_route(r, names, fam))  # type 2 = local: never a slot of ours
        return ours, foreign

    def rules(self) -> tuple[list[RoutingRule], list[RoutingRule]]:
        """Ours (protocol 203) and the fwmark rules of others (one identical to ours blocks it)."""
        ours, foreign = [], []
        for r in self.ipr.get_rules(family=socket.AF_INET):
            sup = _attr(r, "FRA_SUPPRESS_PREFIXLEN", SUPPRESS_UNSET)
            rule = RoutingRule(
                priority=_attr(r, "FRA_PRIORITY", 0),
                fwmark=_attr(r, "FRA_FWMARK", 0),
                mask=_attr(r, "FRA_FWMASK", 0xFFFFFFFF),
                table=_attr(r, "FRA_TABLE", r["table"]),
                suppress_prefixlength=-1 if sup == SUPPRESS_UNSET else sup,
            )
            if _attr(r, "FRA_PROTOCOL", 0) == RT_PROTO:
                ours.append(rule)
            elif rule.fwmark:
                foreign.append(rule)
        return ours, foreign

    @staticmethod
    def rp_filter(ifnames) -> dict[str, int]:
        """The per-interface values (and "all"); a missing interface is left out."""
        out = {}
        for name in ("all", *ifnames):
            with contextlib.suppress(OSError, ValueError):
                out[name] = int(rp_filter_path(name).read_text())
        return out

    # --- changes ----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args, ok: frozenset[int] = frozenset(), **kw) -> int:
        """Run one change; returns 0, or the errno the caller said it can handle (`ok`)."""
        self.writes += 1
        try:
            fn(*args, **kw)
            return 0
        except NetlinkError as e:
            if e.code in ok:
                return e.code
            raise RetryableError(f"{what}: {os.strerror(e.code)}") from None

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise RetryableError(f"interface {name} does not exist")
        return found[0]

    def add_tunnel(self, t: Tunnel) -> None:
        attrs = {
            "ip6tnl_local": t.local,
            "ip6tnl_remote": t.remote,
            "ip6tnl_link": self._index(t.link),
            "ip6tnl_ttl": t.hop_limit,
            "ip6tnl_proto": IPPROTO_IPIP,
        }
        if t.encap_limit == "none":
            attrs["ip6tnl_flags"] = IP6_TNL_F_IGN_ENCAP_LIMIT
        else:
            attrs |= {"ip6tnl_flags": 0, "ip6tnl_encap_limit": int(t.encap_limit)}
        code = self._call(f"create tunnel {t.name}", self.ipr.link, "add", ifname=t.name, kind="ip6tnl",
                          ok=frozenset({errno.EEXIST, errno.EOPNOTSUPP, errno.ENOENT}), **attrs)  # fmt: skip
        if code in (errno.EOPNOTSUPP, errno.ENOENT):
            raise CannotRunHere(f"create tunnel {t.name}: this kernel has no ip6tnl support (module ip6_tunnel)")
        if code == errno.EEXIST:
            self._explain_eexist(t)
        self.set_tunnel(t)

    def _explain_eexist(self, t: Tunnel) -> None:
        """The kernel keeps one ip6tnl per (local, remote) and one interface per name."""
        self.link_dump(fresh=True)
        existing = self.tunnels()
        if t.name in existing and existing[t.name].settable(t):
            return  # ours, created by an earlier try whose answer was lost
        if t.name in {link.get_attr("IFLA_IFNAME") for link in self.link_dump()}:
            raise ConflictError(f"interface {t.name} already exists and is not mape-daemon's: set tunnel.name")
        clash = next((o for o in existing.values() if (o.local, o.remote) == (t.local, t.remote)), None)
        name = clash.name if clash else "another ip6tnl"
        raise ConflictError(
            f"ip6tnl {name} already connects {t.local} to {t.remote}, so the kernel refuses a second "
            f"tunnel {t.name}; delete it (ip link del {name}) or give mape-daemon its name (tunnel.name)"
        )

    def set_tunnel(self, t: Tunnel) -> None:
        self._call(f"set {t.name} mtu {t.mtu} up", self.ipr.link, "set", index=self._index(t.name), mtu=t.mtu,
                   state="up")  # fmt: skip

    def del_tunnel(self, t: Tunnel) -> None:
        found = self.ipr.link_lookup(ifname=t.name)
        if found:
            self._call(f"delete tunnel {t.name}", self.ipr.link, "del", index=found[0], ok=frozenset(OK_ON_DEL))

    def address(self, op: str, a: Address) -> None:
        flags = IFA_F_NODAD | IFA_F_NOPREFIXROUTE if a.family == 6 else 0
        if op == "del" and not self.ipr.link_lookup(ifname=a.ifname):
            return
        ok = frozenset({errno.EEXIST}) if op == "add" else frozenset(OK_ON_DEL)
        self._call(f"{op} {a.describe()}", self.ipr.addr, op, index=self._index(a.ifname), address=a.address,
                   prefixlen=a.prefixlen, flags=flags, ok=ok)  # fmt: skip

    @staticmethod
    def _route_args(r: Route) -> dict:
        family = socket.AF_INET if r.family == 4 else socket.AF_INET6
        dst = ("0.0.0.0/0" if r.family == 4 else "::/0") if r.dst == "default" else r.dst
        return {"dst": dst, "table": r.table, "priority": r.metric, "proto": RT_PROTO, "family": family}

    def route(self, op: str, r: Route) -> None:
        kw = self._route_args(r)
        if r.kind == "unreachable":
            kw["type"] = "unreachable"
        if op == "del":
            # Scope "nowhere" matches any scope, as `ip route del` does: a route added by hand as
            # `dev X` has scope link, and a delete that names another scope misses it.
            self._call(f"delete {r.describe()}", self.ipr.route, "del", scope=RT_SCOPE_NOWHERE,
                       ok=frozenset(OK_ON_DEL), **kw)  # fmt: skip
            return
        if r.dev:
            kw["oif"] = self._index(r.dev)
        if self._call(f"add {r.describe()}", self.ipr.route, "add", ok=frozenset({errno.EEXIST}), **kw):
            ours, foreign = self.routes(frozenset({r.table}))
            if r in ours:
                return  # ours, added by an earlier try whose answer was lost
            holder = next((f for f in foreign if f.key == r.key), None)
            raise ConflictError(f"{describe_foreign(holder) if holder else 'another route'} holds the slot of our "
                                f"{r.describe()}")  # fmt: skip

    def rule(self, op: str, r: RoutingRule) -> None:
        kw = {
            "priority": r.priority,
            "fwmark": r.fwmark,
            "fwmask": r.mask,
            "table": r.table,
            "protocol": RT_PROTO,
            "family": socket.AF_INET,
        }
        if r.suppress_prefixlength >= 0:
            kw["suppress_prefixlen"] = r.suppress_prefixlength
        if op == "del":
            self._call(f"delete {r.describe()}", self.ipr.rule, "del", ok=frozenset(OK_ON_DEL), **kw)
        elif self._call(f"add {r.describe()}", self.ipr.rule, "add", ok=frozenset({errno.EEXIST}), **kw) and (
            r not in self.rules()[0]
        ):
            raise ConflictError(f"a rule like our {r.describe()} exists, not ours (the kernel keeps one)")

    def set_rp_filter(self, ifname: str, value: str) -> None:
        self.writes += 1
        try:
            rp_filter_path(ifname).write_text(value)
        except OSError as e:
            raise RetryableError(f"sysctl net.ipv4.conf.{ifname}.rp_filter={value}: {e.strerror or e}") from None
