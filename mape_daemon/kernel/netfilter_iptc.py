"""Netfilter through python-iptables (libiptc): hosts whose iptables is the legacy xtables.

Rules arrive as iptables-save text; each is built into an iptc.Rule and rendered back from what
the extension itself reports, so desired and observed rules compare in one normal form (e.g.
`--set-mark 1000` reads back as `--set-xmark 0x3e8/0xffffffff`). libiptc takes no xtables lock,
so every commit holds /run/xtables.lock like iptables does; one commit per table.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shlex
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache

import iptc

from ..actions import FirewallChange
from ..errors import RetryableError, TerminalError
from ..state import BUILTIN_CHAINS, CHAIN_PREFIX, TABLES, Chain, Jump

LOCK_PATH = "/run/xtables.lock"
BASIC = (("src", "-s"), ("dst", "-d"), ("in_interface", "-i"), ("out_interface", "-o"), ("protocol", "-p"))
UNSET = {
    "src": "0.0.0.0/0.0.0.0",
    "dst": "0.0.0.0/0.0.0.0",
    "in_interface": None,
    "out_interface": None,
    "protocol": "ip",
}


class RuleSyntaxError(TerminalError):
    pass


def build(text: str) -> iptc.Rule:
    """An iptc.Rule from iptables-save rule text (the subset our chains use)."""
    rule, words, neg, cur = iptc.Rule(), shlex.split(text), False, None
    i = 0
    try:
        while i < len(words):
            w = words[i]
            if w == "!":
                neg, i = True, i + 1
                continue
            flag = dict((f, a) for a, f in BASIC).get(w)
            if flag:
                setattr(rule, flag, ("!" if neg else "") + words[i + 1])
                neg, i = False, i + 2
            elif w == "-m":
                cur, i = rule.create_match(words[i + 1]), i + 2
            elif w in ("-j", "-g"):
                cur, i = rule.create_target(words[i + 1], goto=w == "-g"), i + 2
            elif w.startswith("--") and cur is not None and not neg:
                j = i + 1
                while j < len(words) and not words[j].startswith("-") and words[j] != "!":
                    j += 1
                values = words[i + 1 : j]
                cur.set_parameter(w[2:], values[0] if len(values) == 1 else (values or None))
                i = j
            else:
                raise RuleSyntaxError(f"cannot build rule {text!r}: unexpected {w!r}")
    except (ValueError, iptc.IPTCError, IndexError) as e:
        raise RuleSyntaxError(f"cannot build rule {text!r}: {e}") from None
    return rule


def _addr(value: str) -> str:
    ip, _, mask = value.partition("/")
    return str(ipaddress.IPv4Network(f"{ip}/{mask}", strict=False)) if mask else ip


def render(rule: iptc.Rule) -> str:
    """Rule text from what libiptc and the extensions report: the normal form we compare."""
    parts: list[str] = []
    for attr, flag in BASIC:
        value = getattr(rule, attr)
        if value == UNSET[attr]:
            continue
        neg = value.startswith("!")
        value = value.lstrip("!")
        if attr in ("src", "dst"):
            value = _addr(value)
        parts += (["!"] if neg else []) + [flag, value]
    for m in rule.matches:
        parts += ["-m", m.name]
        for key, values in m.get_all_parameters().items():
            parts += [f"--{key}", *values]
    target = rule.target
    if target is not None and target.name:
        parts += ["-g" if getattr(target, "goto", False) else "-j", target.name]
        for key, values in target.get_all_parameters().items():
            parts += [f"--{key}", *values]
    return shlex.join(parts)


@lru_cache(maxsize=4096)
def normal(text: str) -> str:
    """The normal form of rule text. A jump to one of our chains cannot be built before the
    chain exists (libiptc resolves it), so its matches are normalised and the jump kept as is."""
    head, sep, target = text.rpartition(" -j ")
    if sep and target.startswith(CHAIN_PREFIX) and " " not in target:
        return f"{render(build(head))} -j {target}".lstrip()
    if text.startswith("-j ") and text[3:].startswith(CHAIN_PREFIX):
        return text
    return render(build(text))


@contextmanager
def xtables_lock(timeout: float = 10) -> Iterator[None]:
    """The lock iptables itself takes, so a concurrent firewalld or docker write is not lost."""
    fd = os.open(LOCK_PATH, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RetryableError(f"{LOCK_PATH} is held by another process") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


class IptcChains:
    name = "iptables-legacy"
    in_nf_tables = False  # x_tables: no generation number, no events; read on every sync

    def __init__(self) -> None:
        self.writes = 0

    def normalize(self, chains: frozenset[Chain], jumps: tuple[Jump, ...]) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        return (
            frozenset(replace(c, rules=tuple(normal(r) for r in c.rules)) for c in chains),  # keeps its words
            tuple(Jump(j.table, j.chain, normal(j.rule)) for j in jumps),
        )

    @staticmethod
    def _table(name: str) -> iptc.Table:
        table = iptc.Table(name)
        table.autocommit = False
        table.refresh()  # a fresh handle: libiptc reads the kernel (and this namespace) again
        return table

    @staticmethod
    def committed(pid: int) -> bool:
        return False  # legacy x_tables: no nf_tables commit is ours to recognise

    def observe(self, tables: Iterable[str] = TABLES) -> tuple[frozenset[Chain], tuple[Jump, ...]]:
        chains, jumps = [], []
        try:
            for name in tables:
                table = self._table(name)
                for chain in table.chains:
                    if chain.name.startswith(CHAIN_PREFIX):
                        chains.append(Chain(name, chain.name, tuple(render(r) for r in chain.rules)))
                    elif chain.name in BUILTIN_CHAINS:
                        jumps += [
                            Jump(name, chain.name, render(r))
                            for r in chain.rules
                            if r.target is not None and r.target.name.startswith(CHAIN_PREFIX)
                        ]
        except iptc.IPTCError as e:
            raise RetryableError(f"reading iptables: {e}") from None
        return frozenset(chains), tuple(jumps)

    def apply(self, change: FirewallChange) -> None:
        self.writes += 1
        with xtables_lock():
            table = self._table(change.table)
            try:
                for j in change.del_jumps:
                    chain = iptc.Chain(table, j.chain)
                    found = next((r for r in chain.rules if render(r) == j.rule), None)
                    if found is not None:
                        chain.delete_rule(found)
                for c in change.replace:
                    if table.is_chain(c.name):
                        iptc.Chain(table, c.name).flush()
                    else:
                        table.create_chain(c.name)
                for name in change.delete:
                    if table.is_chain(name):
                        iptc.Chain(table, name).flush()
                for name in change.delete:
                    if table.is_chain(name):
                        table.delete_chain(name)
                for c in change.replace:
                    chain = iptc.Chain(table, c.name)
                    for text in c.rules:
                        chain.append_rule(build(text))
                for j in change.add_jumps:
                    iptc.Chain(table, j.chain).insert_rule(build(j.rule))
                table.commit()
            except iptc.IPTCError as e:
                table.refresh()  # drop the half-built transaction: nothing is half-applied
                raise RetryableError(f"iptables {change.table} commit failed: {e}") from None
