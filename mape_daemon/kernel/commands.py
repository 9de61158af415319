"""Programs we run on the user's behalf (miniupnpd's restart command) and interface indexes: the
seam's small calls outside netlink and netfilter."""

from __future__ import annotations

import shlex
import socket
import subprocess

from ..errors import MapeError


class CommandFailed(MapeError):
    pass


def run(command: str, timeout: float) -> None:
    """Run a configured command (no shell); CommandFailed naming it and its last line of output."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CommandFailed(f"`{command}` failed: {e}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise CommandFailed(f"`{command}` exited {done.returncode}" + (f": {said[-1]}" if said else ""))


def ifindex(name: str) -> int:
    """The interface's index, 0 when it does not exist."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0
