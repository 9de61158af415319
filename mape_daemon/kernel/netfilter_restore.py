"""Netfilter through iptables-save / iptables-restore --noflush (hosts whose iptables is nf_tables).

Rules are data (text in iptables-save form); one `iptables-restore --noflush -w` per table applies
a whole FirewallChange atomically. Our text is written in the form iptables-save prints, so
observed and desired compare as strings; the converge-then-noop contract test guards that.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections import deque
from collections.abc import Iterable

from ..actions import FirewallChange
from ..errors import CannotRunHere, RetryableError
from ..state import BUILTIN_CHAINS, CHAIN_PREFIX, TABLES, Chain, Jump


def parse_save(table: str, text: str) -> tuple[list[Chain], list[Jump]]:
    """Our chains and the jumps into them, from `iptables-save -t table` output."""
    rules: dict[str, list[str]] = {}
    jumps: list[Jump] = []
    for line in text.splitlines():
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIX):
                rules.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            if chain.startswith(CHAIN_PREFIX):
                rules.setdefault(chain, []).append(rest)
            elif chain in BUILTIN_CHAINS and _target(rest).startswith(CHAIN_PREFIX):
                jumps.append(Jump(table, chain, rest))
    return [Chain(table, name, tuple(r)) for name, r in rules.items()], jumps


def _target(rule: str) -> str:
    words = shlex.split(rule)
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return ""


def restore_script(change: FirewallChange) -> str:
    """One transaction: declare (and so flush) replaced chains, drop old jumps, delete old chains,
    fill the replaced chains, then insert new jumps at the top of the built-in chains."""
    lines = [f"*{change.table}"]
    lines += [f":{c.name} - [0:0]" for c in change.replace]
    lines += [f"-D {j.chain} {j.rule}" for j in change.del_jumps]
    for name in change.delete:
        lines += [f"-F {name}"]
    lines += [f"-X {name}" for name in change.delete]
    for c in change.replace:
        lines += [f"-A {c.name} {r}" for r in c.rules]
    # At the top: a user's catch-all MASQUERADE further down must not take our tunnel traffic.
    lines += [f"-I {j.chain} 1 {j.rule}" for j in change.add_jumps]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class RestoreChains:
    """`binary` is the command family: iptables-nft (default) or iptables-legacy."""

    def __init__(self, binary: str = "iptables-nft"):
        self.name = binary
        self.save, self.restore = f"{binary}-save", f"{binary}-restore"
        self.in_nf_tables = binary != "iptables-legacy"
        self.writes = 0
        self.forks = 0
        self.writers: deque[int] = deque(maxlen=16)  # pids of our recent restores: their commits are ours

    def _run(self, argv: list[str], stdin: str | None = None) -> str:
        self.forks += 1
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)  # fmt: skip
        except FileNotFoundError:
            raise CannotRunHere(f"{argv[0]} not found (install the Debian package iptables)") from None
        if stdin is not None:
            self.writers.append(proc.pid)
        try:
            out, err = proc.communicate(stdin, timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RetryableError(f"{argv[0]} did not finish in 60 s (xtables lock held?)") from None
        if proc.returncode:
            raise RetryableError(_explain(argv[0], err, stdin))
        return out

    def normalize(self, chains: frozenset[Chain], jumps: tuple[Jump, ...]) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        return chains, jumps  # our text is already in iptables-save form

    def observe(self, tables: Iterable[str] = TABLES) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        chains: list[Chain] = []
        jumps: list[Jump] = []
        for table in tables:
            c, j = parse_save(table, self._run([self.save, "-t", table]))
            chains += c
            jumps += j
        return frozenset(chains), tuple(jumps)

    def apply(self, change: FirewallChange) -> None:
        self.writes += 1
        self._run([self.restore, "--noflush", "-w", "10"], restore_script(change))

    def committed(self, pid: int) -> bool:
        return pid in self.writers


def _explain(cmd: str, stderr: str, script: str | None) -> str:
    """The failing line with its neighbours, so the log says what the kernel refused."""
    msg = f"{cmd} failed: {stderr.strip()}"
    if script:
        m = re.search(r"line:? (\d+)", stderr)
        if m:
            n, lines = int(m.group(1)), script.splitlines()
            ctx = "\n".join(f"  {i + 1:4d} {lines[i]}" for i in range(max(0, n - 3), min(len(lines), n + 2)))
            msg += f"\n{ctx}"
    return msg
