"""Our egress guard on the tunnel's tc egress hook (egress.py builds it): put in place with `tc`
(only when it changes; the tunnel is ours, and so is its clsact qdisc), read back over netlink.
A no-op sync forks nothing."""

from __future__ import annotations

import subprocess

from ..errors import CannotRunHere, RetryableError
from ..state import EgressGuard, bpf_text
from .rtnl import Reader

PRIORITY = 1  # our filter's place on the hook (pref); one filter, ours
DIRECT_ACTION = 1  # TCA_BPF_FLAG_ACT_DIRECT: the program's return value is the verdict


def observe(reader: Reader, ifname: str, ifindex: int) -> EgressGuard | None:
    for f in reader.bpf_filters(ifindex):
        if f.priority == PRIORITY and f.flags & DIRECT_ACTION:
            return EgressGuard(ifname, bpf_text(f.ops))
    return None


def _tc(*args: str, ok: tuple[str, ...] = ()) -> None:
    try:
        done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CannotRunHere("tc not found (install the Debian package iproute2)") from None
    except subprocess.TimeoutExpired:
        raise RetryableError(f"tc {' '.join(args[:3])} did not finish in 30 s") from None
    if done.returncode and not any(o in done.stderr for o in ok):
        raise RetryableError(f"tc {' '.join(args[:4])} ...: {done.stderr.strip()}")


def put(guard: EgressGuard) -> None:
    """Add or replace the guard in one step: never a moment without one."""
    _tc("qdisc", "add", "dev", guard.ifname, "clsact", ok=("File exists", "Exclusivity flag on"))
    _tc("filter", "replace", "dev", guard.ifname, "egress", "pref", str(PRIORITY), "handle", "1", "bpf", "da",
        "bytecode", guard.program)  # fmt: skip


def remove(guard: EgressGuard) -> None:
    _tc("filter", "del", "dev", guard.ifname, "egress", "pref", str(PRIORITY),
        ok=("No such file", "Cannot find", "Invalid argument"))  # fmt: skip
