"""Servers that record every peer they see, and clients; run inside namespaces via tests.lab.netns.

The servers answer with the peer address and port as they saw it ("ip port"), and append one JSON
line per TCP connection, UDP datagram and ICMP echo request to a log, for assertions.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import time
from pathlib import Path

TCP_PORT, UDP_PORT = 80, 7
ECHO_REQUEST = 8


def serve(log_path: str, address: str = "0.0.0.0", tcp_port: int = TCP_PORT) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def record(**event) -> None:
        log.write(json.dumps(event) + "\n")

    sel = selectors.DefaultSelector()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET  # "::" listens on IPv4 too
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, tcp_port))
    tcp.listen(4096)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((address, UDP_PORT))
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)  # sees copies of echo requests
    for s in (tcp, udp, icmp):
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is tcp:
                conn, (ip, port, *_) = tcp.accept()
                mss = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)  # what the client's SYN allowed
                record(proto="tcp", src=ip, sport=port, dst=conn.getsockname()[0], mss=mss)
                try:
                    conn.sendall(f"{ip} {port}\n".encode())
                except OSError:  # a client that only connects and goes (doctor's test) must not stop it
                    conn.close()
                    continue
                sel.register(conn, selectors.EVENT_READ)  # held open until the client closes
            elif s is udp:
                _, (ip, port, *_) = udp.recvfrom(2048)
                record(proto="udp", src=ip, sport=port)
                with contextlib.suppress(OSError):  # a source it cannot answer (not NATed) must not stop it
                    udp.sendto(f"{ip} {port}\n".encode(), (ip, port))
            elif s is icmp:
                pkt, (ip, _) = icmp.recvfrom(2048)
                ihl = (pkt[0] & 0x0F) * 4
                kind, _code, _sum, ident = struct.unpack("!BBHH", pkt[ihl : ihl + 6])
                if kind == ECHO_REQUEST:
                    record(proto="icmp", src=ip, sport=ident)
            else:
                try:
                    data = s.recv(1024)
                    if data:
                        s.sendall(data)  # an echo, for long-lived connections
                except OSError:  # reset by a client that connected and went (doctor's test)
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tcp_sequential(
    dst: str, n: int, port: int = TCP_PORT, timeout: float = 5, source: str | None = None, sport: int = 0
) -> list:
    """n connections one after the other; each result is the server's view "ip port" or an error."""
    out = []
    bind = (source or "0.0.0.0", sport) if source or sport else None
    for _ in range(n):
        try:
            with socket.create_connection((dst, port), timeout=timeout, source_address=bind) as s:
                out.append(s.makefile().readline().strip())
        except OSError as e:
            out.append(f"error: {e}")
    return out


def tcp_concurrent(dst: str, n: int, port: int = TCP_PORT, timeout: float = 20) -> list:
    """n connections held open at once (non-blocking connects, then all answers)."""
    socks, out = [], []
    sel = selectors.DefaultSelector()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((dst, port))
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
    answers: dict[socket.socket, str] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < n and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                answers[s] = s.recv(100).decode().strip() or "error: closed"
            except OSError as e:
                answers[s] = f"error: {e}"
            sel.unregister(s)
    for s in socks:
        out.append(answers.get(s, "error: timeout"))
        s.close()
    return out


def udp_query(dst: str, port: int = UDP_PORT, timeout: float = 3) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"hello", (dst, port))
        try:
            return s.recv(100).decode().strip()
        except OSError as e:
            return f"error: {e}"


def udp_sequential(dst: str, n: int, port: int = UDP_PORT, timeout: float = 3) -> list:
    """n UDP flows one after the other, each a new socket (so a new source port and a new
    conntrack entry); each result is the server's view "ip port" or an error."""
    return [udp_query(dst, port, timeout) for _ in range(n)]


def udp_concurrent(
    dst: str, n: int, port: int = UDP_PORT, batch: int = 50, timeout: float = 1.0, sports: list[int] | None = None
) -> list:
    """n UDP sockets (from `sports` if given) that each send one datagram and keep their flow (and
    so their external port) while the others start, `batch` at a time (so no socket buffer
    overflows); then each one that got no answer tries once more. Each result: the server's view
    "ip port", "retry: ip port" when only the second datagram got through, or an error."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
    socks: list[socket.socket] = []
    answers: dict[int, str] = {}

    def collect(pending: list[int], prefix: str) -> None:
        sel = selectors.DefaultSelector()
        for i in pending:
            sel.register(socks[i], selectors.EVENT_READ, i)
        deadline = time.monotonic() + timeout
        while len(sel.get_map()) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                answers[key.data] = prefix + key.fileobj.recv(100).decode().strip()
                sel.unregister(key.fileobj)
        sel.close()

    for start in range(0, n, batch):
        new = list(range(start, min(n, start + batch)))
        for i in new:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            if sports:
                s.bind(("0.0.0.0", sports[i]))
            s.sendto(b"hello", (dst, port))
            socks.append(s)
        collect(new, "")
    lost = [i for i in range(n) if i not in answers]
    for i in lost:
        socks[i].sendto(b"again", (dst, port))
    collect(lost, "retry: ")
    for s in socks:
        s.close()
    return [answers.get(i, "error: timeout") for i in range(n)]


def udp_refused(dst: str, port: int, timeout: float = 3) -> bool:
    """A datagram to a closed port: True once the ICMP port-unreachable has come back (the
    connected socket's receive is refused), False if nothing came."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((dst, port))
        s.send(b"anyone?")
        try:
            s.recv(100)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False


def udp_hairpin(server: str, host: str, peer: str, timeout: float = 3) -> list[str]:
    """A LAN socket on `host` learns its external address from the server; a socket on `peer`
    (the same LAN) sends to that address and is answered. Returns [the mapping, the source `host`
    saw, the source `peer`'s answer came from], each "ip port" or an error."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        for sock, addr in ((a, host), (b, peer)):
            sock.settimeout(timeout)
            sock.bind((addr, 0))
        out = []
        try:
            a.sendto(b"where am I?", (server, UDP_PORT))
            out.append(a.recv(100).decode().strip())
            ip, port = out[0].split()
            b.sendto(b"hello", (ip, int(port)))
            _, seen = a.recvfrom(100)
            out.append(f"{seen[0]} {seen[1]}")
            a.sendto(b"hello back", seen)
            _, back = b.recvfrom(100)
            out.append(f"{back[0]} {back[1]}")
        except OSError as e:
            out.append(f"error: {e}")
        return out


def udp_from_port(dst: str, sport: int, port: int = UDP_PORT) -> None:
    """One datagram from a chosen source port (for the BR's out-of-set check); no answer awaited."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", sport))
        s.sendto(b"probe", (dst, port))


def raw_send(dst: str, proto: int, count: int = 3) -> None:
    """Packets of an IP protocol without ports (47 = GRE), for the no-ports path."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as s:
        for _ in range(count):
            s.sendto(b"\x00" * 8, (dst, 0))


def ping_once(dst: str, ident: int, seq: int, timeout: float = 1.0) -> bool:
    """One ICMP echo with a chosen identifier (a long-lived ICMP "flow" when reused)."""
    body = struct.pack("!d", time.time())
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    packet = header + body
    csum = _checksum(packet)
    packet = struct.pack("!BBHHH", ECHO_REQUEST, 0, csum, ident, seq) + body
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (dst, 0))
        try:
            while True:
                data = s.recv(2048)
                ihl = (data[0] & 0x0F) * 4
                if data[ihl] == 0:  # an echo reply (the id may have been mapped back)
                    return True
        except OSError:
            return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echoed(sock: socket.socket, dst: str, payload: bytes) -> bool:
    """One UDP datagram to `dst`'s echo port; True when the answer came back in time."""
    sock.sendto(payload, (dst, UDP_PORT))
    try:
        sock.recv(100)
        return True
    except OSError:
        return False


def write_counts(out_path: str, counts: dict) -> None:
    """Whole or not at all: the test reads the file meanwhile."""
    with open(out_path + ".new", "w") as f:
        json.dump(counts, f)
    os.replace(out_path + ".new", out_path)


def churn(dst: str, out_path: str, stop_path: str, seconds: float = 300) -> None:
    """Continuous TCP, UDP and ICMP to `dst` until `stop_path` exists (or `seconds` pass): a new
    TCP connection each round, and a long-lived UDP flow (source port 45000) and ICMP flow (id
    4242) whose conntrack entries outlive any one change. Counts go to `out_path` as JSON."""
    counts = {"tcp_ok": 0, "tcp_fail": 0, "udp_ok": 0, "udp_fail": 0, "icmp_ok": 0, "icmp_fail": 0}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 45000))
    udp.settimeout(0.5)
    deadline, seq = time.monotonic() + seconds, 0
    while time.monotonic() < deadline and not os.path.exists(stop_path):
        seq += 1
        ok = not tcp_sequential(dst, 1, timeout=1)[0].startswith("error")
        counts["tcp_ok" if ok else "tcp_fail"] += 1
        counts["udp_ok" if echoed(udp, dst, b"churn") else "udp_fail"] += 1
        counts["icmp_ok" if ping_once(dst, 4242, seq, 0.5) else "icmp_fail"] += 1
        write_counts(out_path, counts)
        time.sleep(0.1)
    udp.close()


def hold_tcp(dst: str, out_path: str, stop_path: str, seconds: float = 300) -> None:
    """One TCP connection held open, echoing a line every 0.3 s until `stop_path` exists: writes
    {"sport": the server's view of our port, "echoes": n, "broken": why or None} to `out_path`."""
    state: dict = {"sport": None, "echoes": 0, "broken": None}
    deadline = time.monotonic() + seconds
    try:
        with socket.create_connection((dst, TCP_PORT), timeout=5) as s:
            f = s.makefile("rb")
            state["sport"] = int(f.readline().split()[1])
            s.settimeout(30)  # TCP retransmits through a flap; only a reset or a close breaks it
            while time.monotonic() < deadline and not os.path.exists(stop_path):
                s.sendall(b"ping\n")
                if f.readline() != b"ping\n":
                    state["broken"] = "closed"
                    break
                state["echoes"] += 1
                write_counts(out_path, state)
                time.sleep(0.3)
    except OSError as e:
        state["broken"] = str(e)
    write_counts(out_path, state)


def hold_many(dst: str, n: int, stop_path: str, seconds: float = 300) -> None:
    """n TCP connections held open (each answered once) until `stop_path` exists."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((dst, TCP_PORT), timeout=5)
            s.makefile("rb").readline()
            socks.append(s)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not os.path.exists(stop_path):
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()


def udp_flows(dst: str, out_path: str, stop_path: str, seconds: float = 300) -> None:
    """A stream of new UDP flows to `dst`'s echo port, each from a new socket (a new source port:
    a new conntrack entry, and a new NAT binding), until `stop_path` exists. Counts to `out_path`."""
    counts = {"ok": 0, "fail": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not os.path.exists(stop_path):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            counts["ok" if echoed(s, dst, b"flow") else "fail"] += 1
        write_counts(out_path, counts)
        time.sleep(0.02)
