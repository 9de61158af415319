"""Our own nftables table (`ip mape`), through libnftables in this process (no fork per sync).

The table is ours by its name: no other program's `iptables -F` or firewalld's flush of the
iptables tables reaches it. It is replaced whole, in one transaction (delete and re-create in one
batch), so a packet sees either the old table or the new one. What the kernel lists back is
compared with what we wrote: nft prints a ruleset in its own canonical form (sets merged and
sorted), so the canonical text of each script we apply is learned once, right after applying it,
and kept with the ownership record (see `canonical`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from functools import cache

from ..errors import CannotRunHere, RetryableError

FAMILY, TABLE = "ip", "mape"
OUTPUT_STATELESS = 1 << 2  # list without counter values: they change with every packet
OUTPUT_TERSE = 1 << 11  # ... and without the elements the packet path adds to our learned maps
CANONICAL_KEPT = 8  # learned listings kept (one per table script seen lately), in memory and in the record


class Libnftables:
    """The few calls of libnftables' C API we need (its JSON and text front ends take the same)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise CannotRunHere("libnftables is not installed (Debian package libnftables1, or nftables)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        lib.nft_ctx_output_set_flags(self.ctx, OUTPUT_STATELESS | OUTPUT_TERSE)

    def run(self, script: str) -> tuple[int, str, str]:
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode()
        return rc, out, err


def libnftables() -> Libnftables:
    """A context for the calling thread's network namespace: libnftables opens its netlink socket
    when the context is made, and the socket stays in the namespace it was opened in."""
    return _context(os.stat("/proc/thread-self/ns/net").st_ino)


@cache
def _context(netns: int) -> Libnftables:
    return Libnftables()


def digest(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:16]


class NftTable:
    """Observe and replace our table. `canonical` maps digest(script) -> the text nft lists back
    for it; the reconciler keeps it in the ownership record so it survives a restart."""

    def __init__(self, canonical: dict[str, str] | None = None) -> None:
        self.canonical = canonical if canonical is not None else {}
        self.writes = 0

    def observe(self) -> str | None:
        """The table as nft lists it (stateless), or None when it does not exist (or this host has
        no libnftables, which only a config without the guard tolerates)."""
        try:
            nft = libnftables()
        except CannotRunHere:
            return None
        rc, out, err = nft.run(f"list table {FAMILY} {TABLE}")
        if rc == 0:
            return out
        if "No such file or directory" in err:
            return None
        raise RetryableError(f"reading nftables table {FAMILY} {TABLE}: {err.strip()}")

    def expected(self, script: str | None) -> str | None:
        """What `observe` returns once `script` is in place (its learned canonical form)."""
        if script is None:
            return None
        return self.canonical.get(digest(script), script)

    def replace(self, script: str | None) -> None:
        """Put `script` (a whole `table ip mape {...}`) in place atomically, or remove the table."""
        self.writes += 1
        batch = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"  # create-then-delete: never ENOENT
        if script is not None:
            batch += script
        rc, _, err = libnftables().run(batch)
        if rc != 0:
            raise RetryableError(f"nftables: replacing table {FAMILY} {TABLE} failed: {err.strip()}")
        if script is not None:
            listed = self.observe()
            if listed is not None:
                self.canonical.pop(digest(script), None)  # the newest last: the oldest goes first
                self.canonical[digest(script)] = listed
                while len(self.canonical) > CANONICAL_KEPT:
                    del self.canonical[next(iter(self.canonical))]
