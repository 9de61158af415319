"""Links, addresses, routes, routing rules and sysctls through rtnetlink (read raw, changed by pyroute2).

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
from .rtnl import (
    IFA_F_DEPRECATED,
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    IFA_F_TENTATIVE,
    AddrMsg,
    Link,
    Reader,
    RouteMsg,
    address,
    u8,
    u32,
)

IFF_UP = 0x1
IFF_UP_RUNNING = IFF_UP | 0x40
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1
IPPROTO_IPIP, IPPROTO_IPV6 = 4, 41
MODES = {IPPROTO_IPIP: "ipip6", IPPROTO_IPV6: "ip6ip6", 0: "any"}
RTN_UNICAST, RTN_LOCAL, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT = 1, 2, 6, 7, 8
RTPROT_DHCP = 16
IFLA_IPTUN_LINK, IFLA_IPTUN_LOCAL, IFLA_IPTUN_REMOTE, IFLA_IPTUN_TTL = 1, 2, 3, 4
IFLA_IPTUN_ENCAP_LIMIT, IFLA_IPTUN_FLAGS, IFLA_IPTUN_PROTO = 6, 8, 9
SUPPRESS_UNSET = 0xFFFFFFFF
RT_SCOPE_NOWHERE = 255
OK_ON_DEL = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV}
SYSCTL_CONF = Path("/proc/sys/net/ipv4/conf")


def rp_filter_path(ifname: str) -> Path:
    """A path per interface, never a dotted sysctl key: `br0.10` is one name, not two levels."""
    return SYSCTL_CONF / ifname / "rp_filter"


def _route(r: RouteMsg, names: dict[int, str], family: int) -> Route:
    return Route(
        dst="default" if r.dst_len == 0 else f"{r.dst}/{r.dst_len}",
        dev=names.get(r.oif, ""),
        table=r.table,
        metric=r.priority,
        family=family,
        kind="unreachable" if r.type == RTN_UNREACHABLE else "unicast",
    )


class Netlink:
    """One sync's rtnetlink sockets (bound to the thread that opened them): reads go raw
    (rtnl.Reader), changes through pyroute2, whose socket is opened only when a sync changes
    something."""

    def __init__(self) -> None:
        self.reader = Reader()
        self._ipr: IPRoute | None = None
        self.writes = 0
        self._links: list[Link] | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        self.reader.close()
        if self._ipr is not None:
            self._ipr.close()

    # --- observation -----------------------------------------------------------------------
    def link_dump(self, fresh: bool = False) -> list[Link]:
        if self._links is None or fresh:
            self._links = self.reader.links()
        return self._links

    def links(self) -> dict[str, tuple[int, str]]:
        """name -> (index, kind); kind is "" for a device without link info (ethernet, lo)."""
        return {link.name: (link.index, link.kind) for link in self.link_dump(fresh=True)}

    def tunnels(self) -> dict[str, Tunnel]:
        """Every ip6tnl with its parameters (ours or not: a foreign one may block ours)."""
        names = {link.index: link.name for link in self.link_dump()}
        out = {}
        for link in self.link_dump():
            if link.kind != "ip6tnl":
                continue
            d = link.data
            flags = u32(d.get(IFLA_IPTUN_FLAGS))
            out[link.name] = Tunnel(
                name=link.name,
                local=address(socket.AF_INET6, d.get(IFLA_IPTUN_LOCAL)) or "::",
                remote=address(socket.AF_INET6, d.get(IFLA_IPTUN_REMOTE)) or "::",
                link=names.get(u32(d.get(IFLA_IPTUN_LINK)), ""),
                mtu=link.mtu,
                hop_limit=u8(d.get(IFLA_IPTUN_TTL)),
                mode=MODES.get(u8(d.get(IFLA_IPTUN_PROTO)), "unknown"),
                encap_limit="none" if flags & IP6_TNL_F_IGN_ENCAP_LIMIT else str(u8(d.get(IFLA_IPTUN_ENCAP_LIMIT), 4)),
                up=bool(link.flags & IFF_UP),
            )
        return out

    def wan_addresses(self, wan_index: int, ipv6: list[AddrMsg] | None = None) -> list[WanAddress]:
        out = []
        for a in self.reader.addresses(socket.AF_INET6) if ipv6 is None else ipv6:
            if a.index != wan_index or a.scope != 0:  # global only
                continue
            out.append(
                WanAddress(
                    address=a.address,
                    prefixlen=a.prefixlen,
                    deprecated=bool(a.flags & IFA_F_DEPRECATED) or a.preferred == 0,
                    tentative=bool(a.flags & IFA_F_TENTATIVE),
                    ours_shape=a.prefixlen == 128
                    and a.flags & (IFA_F_NODAD | IFA_F_NOPREFIXROUTE) == (IFA_F_NODAD | IFA_F_NOPREFIXROUTE),
                    preferred_lft=a.preferred,
                )
            )
        return out

    def delegations(self) -> list[WanAddress]:
        """Prefixes delegated to this router: a DHCPv6 client (systemd-networkd, dhcpcd) puts an
        unreachable route `proto dhcp` for each delegation shorter than /64, so that the parts it
        did not assign to a LAN go nowhere. The kernel filters the dump by protocol."""
        return [WanAddress(address=r.dst, prefixlen=r.dst_len, deprecated=False, tentative=False, ours_shape=False,
                           origin="pd")
                for r in self.reader.routes(socket.AF_INET6, protocol=RTPROT_DHCP)
                if r.type in (RTN_UNREACHABLE, RTN_BLACKHOLE, RTN_PROHIBIT) and 0 < r.dst_len < 64]  # fmt: skip

    def carriers(self, ipv4: list[AddrMsg]) -> set[str]:
        """Interfaces that can carry IPv4 now: up and running, with an IPv4 address. ppp0 exists
        but is down while pppd negotiates (LCP, auth, IPCP) and between its retries."""
        with_ipv4 = {a.index for a in ipv4}
        return {link.name for link in self.link_dump()
                if link.flags & IFF_UP_RUNNING == IFF_UP_RUNNING and link.index in with_ipv4}  # fmt: skip

    def addresses(self, ifname: str, index: int, family: int, dump: list[AddrMsg] | None = None) -> list[Address]:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        dump = self.reader.addresses(fam) if dump is None else dump
        return [Address(ifname, a.address, a.prefixlen) for a in dump if a.index == index]

    def routes(self, foreign_tables: frozenset[int] = frozenset()) -> tuple[list[Route], list[Route]]:
        """Ours (protocol 203, every table) and, in `foreign_tables`, every other IPv4 route. The
        kernel filters the dumps, so routes of other tables and protocols are never read."""
        names = {link.index: link.name for link in self.link_dump()}
        ours = [_route(r, names, fam) for family, fam in ((socket.AF_INET, 4), (socket.AF_INET6, 6))
                for r in self.reader.routes(family, protocol=RT_PROTO)]  # fmt: skip
        foreign = [_route(r, names, 4) for table in sorted(foreign_tables)
                   for r in self.reader.routes(socket.AF_INET, table=table)
                   if r.protocol != RT_PROTO and r.type != RTN_LOCAL]  # fmt: skip  # a local route is no slot of ours
        return ours, foreign

    def rules(self) -> tuple[list[RoutingRule], list[RoutingRule]]:
        """Ours (protocol 203) and the fwmark rules of others (one identical to ours blocks it)."""
        ours, foreign = [], []
        for r in self.reader.rules(socket.AF_INET):
            rule = RoutingRule(
                priority=r.priority,
                fwmark=r.fwmark,
                mask=r.mask,
                table=r.table,
                suppress_prefixlength=-1 if r.suppress_prefixlength == SUPPRESS_UNSET else r.suppress_prefixlength,
            )
            if r.protocol == RT_PROTO:
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
        if t.name in {link.name for link in self.link_dump()}:
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
            raise ConflictError(f"{holder.describe_foreign() if holder else 'another route'} holds the slot of our "
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
