"""The tunnel's egress guard: a classic BPF program on the tunnel's tc egress hook that drops every
IPv4 packet leaving by MAP-E with a source other than the MAP IPv4, or a TCP/UDP source port or
ICMP echo id outside the port set. Pure: no I/O.

netfilter can be flushed whole by another program (`nft flush ruleset` in Debian's nftables.conf
and its service's stop, firewalld, `iptables -F`): our SNAT and the nftables guard go with it,
and until the repair new LAN flows would leave un-NATed or masqueraded onto other subscribers'
ports. tc on our own tunnel is reached by no firewall manager, so this guard stays.

The port-set test of RFC 7597 is a mask: a port p is in the set of PSID `psid` (length k, offset
a, m = 16 - a - k) when (p >> m) & (2^k - 1) == psid and, with a > 0, p >= 2^(16-a) (A = 0 is
excluded). So the whole set is one AND and one compare, whatever its number of blocks. The
program reads the IPv4 header length (options are fine), lets ICMP errors (destination
unreachable, time exceeded, parameter problem) and non-first fragments (no ports in them) pass
with the right source, and drops protocols we do not SNAT. It runs in direct-action mode: it
returns TC_ACT_OK or TC_ACT_SHOT, so no tc action module is needed.
"""

from __future__ import annotations

from collections.abc import Collection

from .mapcalc import MapParams
from .state import bpf_text

# Classic BPF opcodes (linux/filter.h).
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND, LD_B_IND = 0x48, 0x50
LD_W_LEN = 0x80  # A = the packet's length
SUB_X = 0x1C
LDX_B_MSH = 0xB1  # X = 4 * (packet[k] & 0xf): the IPv4 header length
JA, JEQ_K, JGE_K, JSET_K = 0x05, 0x15, 0x35, 0x45
AND_K = 0x54
RET_K = 0x06
TC_ACT_OK, TC_ACT_SHOT = 0, 2
PROTO = {"tcp": 6, "udp": 17, "icmp": 1}
ICMP_ECHO = (8, 0)  # request, reply: their id is a port of the set
ICMP_ERRORS = (3, 11, 12)  # about a flow: no id of their own

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)


def program(params: MapParams, protos: Collection[str]) -> tuple[Insn, ...]:
    """The guard for this mapping and these SNATed protocols."""
    a, k, psid = params.psid_offset, params.psid_len, params.psid
    m = 16 - a - k
    # Labels are resolved to relative jumps at the end: ("PASS", "DROP", "CHECK", "ICMP", "PORTS").
    code: list[tuple] = [
        (LD_W_ABS, None, None, 12),  # the source address
        (JEQ_K, 0, "DROP", int(params.ipv4)),
        (LD_H_ABS, None, None, 6),  # flags and fragment offset
        (JSET_K, "PASS", 0, 0x1FFF),  # a non-first fragment: no ports to check
        (LD_B_ABS, None, None, 9),  # the protocol
    ]
    l4 = [p for p in ("tcp", "udp") if p in protos]
    code += [(JEQ_K, "PORTS", 0, PROTO[p]) for p in l4]
    code.append((JEQ_K, "ICMP", "DROP", PROTO["icmp"]) if "icmp" in protos else (JA, None, None, "DROP"))
    # A load past the packet's end makes classic BPF return 0, which would pass it: first make sure
    # the 8 bytes after the IPv4 header are there (every TCP, UDP and ICMP header has them).
    whole = [(LDX_B_MSH, None, None, 0), (LD_W_LEN, None, None, 0), (SUB_X, None, None, 0), (JGE_K, 0, "DROP", 8)]
    code += [("ICMP",), *whole, (LD_B_IND, None, None, 0)]  # the ICMP type
    code += [(JEQ_K, "ECHO", 0, t) for t in ICMP_ECHO]
    code += [(JEQ_K, "PASS", 0, t) for t in ICMP_ERRORS]
    code += [(JA, None, None, "DROP"), ("ECHO",), (LD_H_IND, None, None, 4), (JA, None, None, "CHECK")]  # the id
    code += [("PORTS",), *whole, (LD_H_IND, None, None, 0)]  # the source port
    code += [("CHECK",)]
    if a > 0:
        code.append((JGE_K, 0, "DROP", 1 << (16 - a)))  # A = 0: ports below 2^(16-a) are no one's
    code += [(AND_K, None, None, ((1 << k) - 1) << m), (JEQ_K, "PASS", "DROP", psid << m)]
    code += [("PASS",), (RET_K, None, None, TC_ACT_OK), ("DROP",), (RET_K, None, None, TC_ACT_SHOT)]
    return _resolve(code)


def _resolve(code: list[tuple]) -> tuple[Insn, ...]:
    """Labels (1-tuples) to the relative jumps classic BPF takes: an offset from the next insn."""
    labels, insns = {}, []
    for item in code:
        if len(item) == 1:
            labels[item[0]] = len(insns)
        else:
            insns.append(item)

    def rel(target: int | str | None, i: int) -> int:
        return labels[target] - i - 1 if isinstance(target, str) else target or 0

    return tuple((op, 0, 0, rel(k, i)) if op == JA else (op, rel(jt, i), rel(jf, i), k)
                 for i, (op, jt, jf, k) in enumerate(insns))  # fmt: skip


def bytecode(insns: tuple[Insn, ...]) -> str:
    """tc's text for a classic BPF program: `N,code jt jf k,...` (what `tc filter show` prints)."""
    return bpf_text(insns)


def run(insns: tuple[Insn, ...], packet: bytes) -> int:
    """Interpret the program on an IPv4 packet, as the kernel does: its return value. (For tests
    and `plan`'s readers: the kernel runs the same instructions.)"""
    a = x = pc = 0
    while True:
        op, jt, jf, k = insns[pc]
        pc += 1
        if op == RET_K:
            return k
        if op == LD_W_ABS:
            a = int.from_bytes(packet[k : k + 4], "big")
        elif op == LD_H_ABS:
            a = int.from_bytes(packet[k : k + 2], "big")
        elif op == LD_B_ABS:
            a = packet[k]
        elif op == LDX_B_MSH:
            x = 4 * (packet[k] & 0xF)
        elif op == LD_W_LEN:
            a = len(packet)
        elif op == SUB_X:
            a = (a - x) & 0xFFFFFFFF
        elif op == LD_H_IND:
            if x + k + 2 > len(packet):
                return 0  # out of the packet: the kernel's classic BPF returns 0 (TC_ACT_OK)
            a = int.from_bytes(packet[x + k : x + k + 2], "big")
        elif op == LD_B_IND:
            if x + k + 1 > len(packet):
                return 0
            a = packet[x + k]
        elif op == AND_K:
            a &= k
        elif op == JA:
            pc += k
        elif op in (JEQ_K, JGE_K, JSET_K):
            hit = a == k if op == JEQ_K else a >= k if op == JGE_K else bool(a & k)
            pc += jt if hit else jf
        else:
            raise ValueError(f"unknown opcode {op:#x}")
