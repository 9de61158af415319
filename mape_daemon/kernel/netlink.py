"""Links, addresses, routes, routing rules and sysctls through rtnetlink (pyroute2).

Observation returns only what is ours: the tunnel by its configured name, the CE /128 that the
caller recognises, addresses on our tunnel, routes and rules that carry our protocol number.
Every primitive is idempotent by errno: EEXIST on add and ENOENT/ESRCH on delete are success.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import RetryableError, TerminalError
from ..state import RT_PROTO, Address, Route, RoutingRule, Sysctl, Tunnel, WanAddress

IFA_F_NODAD, IFA_F_DEPRECATED, IFA_F_TENTATIVE, IFA_F_NOPREFIXROUTE = 0x02, 0x20, 0x40, 0x200
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1
IPPROTO_IPIP, IPPROTO_IPV6 = 4, 41
MODES = {IPPROTO_IPIP: "ipip6", IPPROTO_IPV6: "ip6ip6", 0: "any"}
SUPPRESS_UNSET = 0xFFFFFFFF
RT_SCOPE_NOWHERE = 255
OK_ON_ADD = {errno.EEXIST}
OK_ON_DEL = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV}


def _attr(msg, name, default=None):
    value = msg.get_attr(name)
    return default if value is None else value


def _flags(msg) -> int:
    return _attr(msg, "IFA_FLAGS", msg["flags"])


class Netlink:
    """One rtnetlink socket for one sync; use as a context manager."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.writes = 0

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.ipr.close()

    # --- observation -----------------------------------------------------------------------
    def links(self) -> dict[str, int]:
        return {link.get_attr("IFLA_IFNAME"): link["index"] for link in self.ipr.get_links()}

    def tunnel(self, name: str, links: dict[str, int]) -> Tunnel | None:
        if name not in links:
            return None
        (link,) = self.ipr.get_links(links[name])
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "ip6tnl":
            raise TerminalError(
                f"interface {name} exists and is not an ip6tnl tunnel (it is {kind or 'a device'}); "
                "set tunnel.name to a free name"
            )
        data = info.get_attr("IFLA_INFO_DATA")
        names = {v: k for k, v in links.items()}
        flags = _attr(data, "IFLA_IP6TNL_FLAGS", 0)
        return Tunnel(
            name=name,
            local=_attr(data, "IFLA_IP6TNL_LOCAL", "::"),
            remote=_attr(data, "IFLA_IP6TNL_REMOTE", "::"),
            link=names.get(_attr(data, "IFLA_IP6TNL_LINK", 0), ""),
            mtu=link.get_attr("IFLA_MTU"),
            hop_limit=_attr(data, "IFLA_IP6TNL_TTL", 0),
            mode=MODES.get(_attr(data, "IFLA_IP6TNL_PROTO", 0), "unknown"),
            encap_limit="none" if flags & IP6_TNL_F_IGN_ENCAP_LIMIT else str(_attr(data, "IFLA_IP6TNL_ENCAP_LIMIT", 4)),
        )

    def wan_addresses(self, wan_index: int) -> list[WanAddress]:
        out = []
        for a in self.ipr.get_addr(family=socket.AF_INET6, index=wan_index):
            if a["scope"] != 0:  # global only
                continue
            flags = _flags(a)
            cache = a.get_attr("IFA_CACHEINFO")
            out.append(
                WanAddress(
                    address=a.get_attr("IFA_ADDRESS"),
                    prefixlen=a["prefixlen"],
                    deprecated=bool(flags & IFA_F_DEPRECATED) or bool(cache and cache["ifa_preferred"] == 0),
                    tentative=bool(flags & IFA_F_TENTATIVE),
                    ours_shape=a["prefixlen"] == 128
                    and flags & (IFA_F_NODAD | IFA_F_NOPREFIXROUTE) == (IFA_F_NODAD | IFA_F_NOPREFIXROUTE),
                )
            )
        return out

    def tunnel_addresses(self, tunnel: str, index: int) -> list[Address]:
        return [
            Address(tunnel, a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            for a in self.ipr.get_addr(family=socket.AF_INET, index=index)
        ]

    def routes(self, links: dict[str, int]) -> list[Route]:
        names = {v: k for k, v in links.items()}
        out = []
        for family, fam in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for r in self.ipr.get_routes(family=family):  # no table given: every table
                if r["proto"] != RT_PROTO:
                    continue
                dst = r.get_attr("RTA_DST")
                out.append(
                    Route(
                        dst="default" if r["dst_len"] == 0 else f"{dst}/{r['dst_len']}",
                        dev=names.get(_attr(r, "RTA_OIF", 0), "?"),
                        table=_attr(r, "RTA_TABLE", r["table"]),
                        metric=_attr(r, "RTA_PRIORITY", 0),
                        family=fam,
                    )
                )
        return out

    def rules(self) -> list[RoutingRule]:
        out = []
        for r in self.ipr.get_rules(family=socket.AF_INET):
            if _attr(r, "FRA_PROTOCOL", 0) != RT_PROTO:
                continue
            sup = _attr(r, "FRA_SUPPRESS_PREFIXLEN", SUPPRESS_UNSET)
            out.append(
                RoutingRule(
                    priority=_attr(r, "FRA_PRIORITY", 0),
                    fwmark=_attr(r, "FRA_FWMARK", 0),
                    mask=_attr(r, "FRA_FWMASK", 0xFFFFFFFF),
                    table=_attr(r, "FRA_TABLE", r["table"]),
                    suppress_prefixlength=-1 if sup == SUPPRESS_UNSET else sup,
                )
            )
        return out

    @staticmethod
    def sysctls(keys: Iterable[str]) -> list[Sysctl]:
        out = []
        for key in keys:
            # A missing file: the interface is gone, and the desired state will not ask for it.
            with contextlib.suppress(OSError):
                out.append(Sysctl(key, Path("/proc/sys", key.replace(".", "/")).read_text().strip()))
        return out

    # --- changes ----------------------------------------------------------------------------
    def _call(self, ok: set[int], what: str, fn: Callable, *args, **kw) -> None:
        self.writes += 1
        try:
            fn(*args, **kw)
        except NetlinkError as e:
            if e.code in ok:
                return
            if e.code == errno.EOPNOTSUPP or (e.code == errno.ENOENT and what.startswith("create tunnel")):
                raise TerminalError(f"{what}: this kernel has no ip6tnl support ({e})") from None
            raise RetryableError(f"{what}: {e}") from None

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
            "ip6tnl_flags": IP6_TNL_F_IGN_ENCAP_LIMIT,  # encapsulation limit none
        }
        self._call(OK_ON_ADD, f"create tunnel {t.name}", self.ipr.link, "add", ifname=t.name, kind="ip6tnl", **attrs)
        self._call(set(), f"bring up {t.name}", self.ipr.link, "set", index=self._index(t.name), mtu=t.mtu, state="up")

    def set_mtu(self, t: Tunnel) -> None:
        self._call(set(), f"set mtu of {t.name}", self.ipr.link, "set", index=self._index(t.name), mtu=t.mtu)

    def del_tunnel(self, t: Tunnel) -> None:
        found = self.ipr.link_lookup(ifname=t.name)
        if found:
            self._call(OK_ON_DEL, f"delete tunnel {t.name}", self.ipr.link, "del", index=found[0])

    def address(self, op: str, a: Address) -> None:
        flags = IFA_F_NODAD | IFA_F_NOPREFIXROUTE if a.family == 6 else 0
        if op == "del" and not self.ipr.link_lookup(ifname=a.ifname):
            return
        self._call(
            OK_ON_ADD if op == "add" else OK_ON_DEL,
            f"{op} {a.describe()}",
            self.ipr.addr,
            op,
            index=self._index(a.ifname),
            address=a.address,
            prefixlen=a.prefixlen,
            flags=flags,
        )

    def route(self, op: str, r: Route) -> None:
        family = socket.AF_INET if r.family == 4 else socket.AF_INET6
        dst = "0.0.0.0/0" if r.family == 4 and r.dst == "default" else ("::/0" if r.dst == "default" else r.dst)
        kw = {"dst": dst, "table": r.table, "priority": r.metric, "proto": RT_PROTO, "family": family}
        if op == "del":
            # Scope "nowhere" matches any scope, as `ip route del` does: a route added by hand as
            # `dev X` has scope link, and a delete that names another scope misses it.
            self._call(OK_ON_DEL, f"delete {r.describe()}", self.ipr.route, "del", scope=RT_SCOPE_NOWHERE, **kw)
        else:
            self._call(set(), f"set {r.describe()}", self.ipr.route, "replace", oif=self._index(r.dev), **kw)

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
        self._call(OK_ON_ADD if op == "add" else OK_ON_DEL, f"{op} {r.describe()}", self.ipr.rule, op, **kw)

    def set_sysctl(self, s: Sysctl) -> None:
        self.writes += 1
        try:
            Path("/proc/sys", s.key.replace(".", "/")).write_text(s.value)
        except OSError as e:
            raise RetryableError(f"sysctl {s.key}={s.value}: {e.strerror or e}") from None
