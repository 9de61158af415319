"""HB46PP on the wire: the TXT lookup on the line's own resolvers, and an HTTP(S) GET over IPv6
(provisioning.access makes one access of them). Blocking; the service runs it in a thread.

Our own small DNS client, not the host's resolver: the record lives only on the resolvers the
line announces (a host pointed at a public resolver would never see it), and NXDOMAIN/NODATA
("this line does not provision") must be told apart from a failure ("ask again soon").
"""

from __future__ import annotations

import fcntl
import http.client
import secrets
import socket
import ssl
import struct
import time
from ipaddress import IPv6Address
from urllib.parse import urlsplit

TXT, AAAA = 16, 28
NOERROR, NXDOMAIN = 0, 3
RCODES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}
BODY_LIMIT = 1 << 20  # 256 rules of MAP-E are about 30 KiB


class NoRecord(Exception):
    """NXDOMAIN or NODATA: the name has no record of that type on this resolver."""


class DnsFailed(Exception):
    """No usable answer from any resolver (timeout, SERVFAIL, REFUSED, garbage)."""


class FetchFailed(Exception):
    """No HTTP answer: no connection, TLS refused (a certificate that does not verify), a reply
    that is not HTTP."""


def _name(qname: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in qname.rstrip(".").split(".")) + b"\0"


def _skip_name(msg: bytes, at: int) -> int:
    while True:
        n = msg[at]
        if n == 0:
            return at + 1
        if n & 0xC0 == 0xC0:
            return at + 2
        at += n + 1


def parse_reply(msg: bytes, qid: int, qtype: int) -> list[bytes]:
    """The answer section's RDATA of type `qtype`. Raises NoRecord for NXDOMAIN or an empty
    NOERROR answer, DnsFailed for any other rcode or a reply that is not ours."""
    if len(msg) < 12:
        raise DnsFailed("a truncated DNS reply")
    rid, flags, qd, an = struct.unpack_from("!HHHH", msg)
    if rid != qid or not flags & 0x8000:
        raise DnsFailed("a DNS reply that is not ours")
    rcode = flags & 0xF
    if rcode == NXDOMAIN:
        raise NoRecord("NXDOMAIN")
    if rcode != NOERROR:
        raise DnsFailed(RCODES.get(rcode, f"rcode {rcode}"))
    at = 12
    for _ in range(qd):
        at = _skip_name(msg, at) + 4
    out = []
    for _ in range(an):
        at = _skip_name(msg, at)
        rtype, _, _, length = struct.unpack_from("!HHIH", msg, at)
        at += 10
        if rtype == qtype:
            out.append(msg[at : at + length])
        at += length
    if not out:
        raise NoRecord("NODATA")
    return out


def txt(qname: str, resolvers: list[str]) -> list[str]:
    """The TXT records of `qname`, each one's character-strings joined (a long one comes split)."""
    return [_txt_strings(r) for r in query(qname, TXT, resolvers)]


def _txt_strings(rdata: bytes) -> str:
    """A TXT record's character-strings, joined (a long record comes split)."""
    parts, at = [], 0
    while at < len(rdata):
        n = rdata[at]
        parts.append(rdata[at + 1 : at + 1 + n].decode("utf-8", "replace"))
        at += n + 1
    return "".join(parts)


def _sockaddr(server: str, port: int = 53) -> tuple:
    """A resolver address, link-local with its zone (fe80::1%wan0, as an RA's RDNSS gives it)."""
    return socket.getaddrinfo(server, port, socket.AF_INET6 if ":" in server else socket.AF_INET,
                              socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]  # fmt: skip


def query(qname: str, qtype: int, resolvers: list[str], timeout: float = 3.0) -> list[bytes]:
    """Ask each resolver in turn (over TCP when the reply is truncated). NoRecord from the first
    resolver that says so; DnsFailed when none answered usefully."""
    if not resolvers:
        raise DnsFailed("no resolver learned on the WAN")
    failures = []
    for server in resolvers:
        qid = secrets.randbits(16)
        packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _name(qname) + struct.pack("!HH", qtype, 1)
        try:
            addr = _sockaddr(server)
            family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.connect(addr)
                s.send(packet)
                reply = s.recv(4096)
            if struct.unpack_from("!H", reply, 2)[0] & 0x0200:  # TC: the whole answer over TCP
                with socket.socket(family, socket.SOCK_STREAM) as t:
                    t.settimeout(timeout)
                    t.connect(addr)
                    t.sendall(struct.pack("!H", len(packet)) + packet)
                    reply = _read_tcp(t)
            return parse_reply(reply, qid, qtype)
        except NoRecord:
            raise
        except (OSError, DnsFailed, struct.error, IndexError) as e:
            failures.append(f"{server}: {getattr(e, 'strerror', None) or e or type(e).__name__}")
    raise DnsFailed("; ".join(failures))


def _read_tcp(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
        chunk = sock.recv(65535)
        if not chunk:
            raise DnsFailed("the resolver closed the TCP connection")
        data += chunk
    return data[2:]


def get(url: str, verify: bool, resolvers: list[str] | None, cafile: str | None = None, timeout: float = 10.0,
        headers: dict[str, str] | None = None, source: str | None = None) -> tuple[int, str | None, bytes]:  # fmt: skip
    """GET over IPv6 only (section 3.3), the host's AAAA from the line's resolvers (None: the
    host's own resolver); SNI and the host name checked when `verify`; from `source` if given.
    (status, Location, body)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    try:
        addr = str(IPv6Address(host))
    except ValueError:
        if resolvers is None:
            try:
                addr = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4][0]
            except OSError as e:
                raise FetchFailed(f"{host}: no IPv6 address ({e.strerror or e})") from None
        else:
            addr = str(IPv6Address(query(host, AAAA, resolvers)[0]))
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sock = socket.create_connection((addr, port), timeout, (source, 0) if source else None)
        if https:
            ctx = ssl.create_default_context(cafile=cafile) if verify else ssl._create_unverified_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
        conn.sock = sock  # already connected (and wrapped): http.client only speaks HTTP on it
        sent = {"Host": parts.netloc.rpartition("@")[2], "User-Agent": "mape-daemon", **(headers or {})}
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else "") or "/", headers=sent)
        r = conn.getresponse()
        return r.status, r.getheader("Location"), r.read(BODY_LIMIT)
    except (OSError, http.client.HTTPException) as e:
        raise FetchFailed(getattr(e, "reason", None) or getattr(e, "strerror", None) or e or type(e).__name__) from None
    finally:
        conn.close()


ND_ROUTER_SOLICIT, ND_ROUTER_ADVERT, ND_OPT_RDNSS = 133, 134, 25
ICMP6_FILTER = 1  # the ICMPv6 socket option (netinet/icmp6.h)


def router_dns(interface: str, timeout: float = 5.0) -> tuple[list[str], bool]:
    """The recursive DNS servers the line's router announces (RFC 8106 RDNSS in a router
    advertisement): a Router Solicitation on `interface`, then the first RA that comes within
    `timeout`. Only an RA with hop limit 255 counts (sent on the link, not routed in from afar).
    Link-local servers come with their zone (fe80::1%wan0). Also whether that RA's M or O flag
    says DHCPv6 has more. Raises OSError (no such interface, no CAP_NET_RAW)."""
    index = socket.if_nametoindex(interface)
    found: dict[str, None] = {}
    other = False  # the RA's M or O flag: more configuration (DNS) by DHCPv6
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        blocked = [0xFFFFFFFF] * 8
        blocked[ND_ROUTER_ADVERT >> 5] &= ~(1 << (ND_ROUTER_ADVERT & 31))  # let only RAs through
        s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *blocked))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        s.sendto(struct.pack("!BBHI", ND_ROUTER_SOLICIT, 0, 0, 0), ("ff02::2", 0, 0, index))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4))
            except TimeoutError:
                break
            hops = next((int.from_bytes(d[:4], "little") for lvl, kind, d in anc
                         if lvl == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT), None)  # fmt: skip
            if hops == 255 and data[:1] == bytes([ND_ROUTER_ADVERT]):
                found.update(dict.fromkeys(_rdnss_options(data, interface)))
                other = len(data) > 5 and bool(data[5] & 0xC0)
                break  # the line's router has answered (a second router on a WAN is not waited for)
    return list(found), other


def _rdnss_options(ra: bytes, interface: str) -> list[str]:
    """The live RDNSS addresses of one RA (options from byte 16; lifetime 0 withdraws)."""
    out, at = [], 16
    while at + 8 <= len(ra):
        kind, units = ra[at], ra[at + 1]
        if units == 0:
            break
        if kind == ND_OPT_RDNSS and struct.unpack_from("!I", ra, at + 4)[0] > 0:
            for a in range(at + 8, at + units * 8, 16):
                ip = IPv6Address(ra[a : a + 16])
                out.append(f"{ip}%{interface}" if ip.is_link_local else str(ip))
        at += units * 8
    return out


# DHCPv6 (RFC 8415): NTT NGN announces no RDNSS; its DNS servers come by DHCPv6 only.
INFORMATION_REQUEST, REPLY = 11, 7
OPT_CLIENTID, OPT_ORO, OPT_ELAPSED, OPT_DNS = 1, 6, 8, 23
ALL_DHCP = "ff02::1:2"
CLIENT_PORT, SERVER_PORT = 546, 547
SIOCGIFHWADDR = 0x8927


def dhcpv6_dns(interface: str, timeout: float = 3.0) -> list[str]:
    """The DNS servers a stateless DHCPv6 Information-Request on `interface` is told (option 23),
    or none (also when the host's DHCPv6 client holds port 546). Raises OSError (no such
    interface, no link-local address yet)."""
    index = socket.if_nametoindex(interface)
    xid = secrets.token_bytes(3)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        # The MAC by ioctl, not sysfs: sysfs shows the namespace it was mounted in.
        mac = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", interface.encode()))[18:24]
        duid = struct.pack("!HH", 3, 1) + mac  # DUID-LL (the FLET'S interface spec asks for it)
        options = (struct.pack("!HH", OPT_CLIENTID, len(duid)) + duid + struct.pack("!HHH", OPT_ORO, 2, OPT_DNS)
                   + struct.pack("!HHH", OPT_ELAPSED, 2, 0))  # fmt: skip
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        # Servers answer to 546. Never shared (no SO_REUSEPORT): the host's DHCPv6 client, if it
        # runs, holds it and keeps every reply; we then learn nothing here (isp.resolvers).
        try:
            s.bind(("::", CLIENT_PORT, 0, index))
        except OSError:
            return []
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.sendto(bytes([INFORMATION_REQUEST]) + xid + options, (ALL_DHCP, SERVER_PORT, 0, index))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(4096)
            except TimeoutError:
                break
            if data[:1] == bytes([REPLY]) and data[1:4] == xid:
                return _dns_option(data[4:])
    return []


def _dns_option(options: bytes) -> list[str]:
    out, at = [], 0
    while at + 4 <= len(options):
        code, length = struct.unpack_from("!HH", options, at)
        if code == OPT_DNS:
            out += [str(IPv6Address(options[a : a + 16])) for a in range(at + 4, at + 4 + length - 15, 16)]
        at += 4 + length
    return out
