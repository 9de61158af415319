"""Connection tracking: forget connections NATed to an address we no longer have."""

from __future__ import annotations

import subprocess

from ..errors import RetryableError


def _conntrack(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["conntrack", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RetryableError("conntrack is not installed (Debian package conntrack)") from None


def flush_nat_to(ipv4: str) -> int:
    """Delete entries whose reply goes to `ipv4` (SNATed to it); returns how many went."""
    r = _conntrack("-D", "--reply-dst", ipv4)
    # conntrack exits 1 when nothing matched; its summary line says how many were deleted.
    for line in r.stderr.splitlines():
        if "flow entries have been deleted" in line:
            return int(line.split()[-6]) if line.split()[-6].isdigit() else 0
    if r.returncode not in (0, 1):
        raise RetryableError(f"conntrack -D failed: {r.stderr.strip()}")
    return 0


def nat_ports(ipv4: str) -> list[tuple[str, int]]:
    """(protocol, port) of every tracked connection NATed to `ipv4`: the ports of the set in use."""
    return parse_nat_ports(_conntrack("-L", "--reply-dst", ipv4).stdout)


def parse_nat_ports(text: str) -> list[tuple[str, int]]:
    """From `conntrack -L` lines: the reply direction's destination port (or ICMP id)."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("tcp", "udp", "icmp"):
            continue
        key = "id=" if words[0] == "icmp" else "dport="
        values = [w[len(key) :] for w in words if w.startswith(key)]
        if len(values) >= 2:  # original direction first, then the reply direction
            out.append((words[0], int(values[-1])))
    return out
