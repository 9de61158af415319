"""Connection tracking: forget connections NATed to an address we no longer have."""

from __future__ import annotations

import subprocess

from ..errors import RetryableError


def flush_nat_to(ipv4: str) -> int:
    """Delete entries whose reply goes to `ipv4` (SNATed to it); returns how many went."""
    try:
        r = subprocess.run(["conntrack", "-D", "--reply-dst", ipv4], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise RetryableError("conntrack is not installed (Debian package conntrack)") from None
    # conntrack exits 1 when nothing matched; its summary line says how many were deleted.
    for line in r.stderr.splitlines():
        if "flow entries have been deleted" in line:
            return int(line.split()[-6]) if line.split()[-6].isdigit() else 0
    if r.returncode not in (0, 1):
        raise RetryableError(f"conntrack -D failed: {r.stderr.strip()}")
    return 0
