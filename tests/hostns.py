"""A fresh network namespace for the current thread, on this machine's own kernel.

For kernel tests that need no ip6tnl (netfilter, veth, routes): they run on the host directly,
each in its own namespace, so nothing they do can reach the machine's real tables.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.lab.netns import CLONE_NEWNET, _libc, setns


@contextmanager
def inside(name: str | None) -> Iterator[str | None]:
    """This thread (and what it starts) in namespace `name` until the block ends."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(name)
        yield name
    finally:
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError("could not return to the original network namespace")
        os.close(home)


@contextmanager
def fresh_netns() -> Iterator[str]:
    name = f"mape-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        with inside(name):
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
