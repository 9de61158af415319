"""calc throughput: 10,000 WAN prefixes mapped in one process.

Baseline in the same run: the same mapping with a linear scan of the rule table, the way the
web calculators and shell scripts look rules up.
"""

from __future__ import annotations

import random
import time
from ipaddress import IPv6Network

from mape_daemon import rules
from mape_daemon.mapcalc import compute

N = 10_000


def sample_prefixes(n: int, seed: int = 7) -> list[IPv6Network]:
    rng = random.Random(seed)
    table = rules.bundled().rules
    out = []
    for _ in range(n):
        r = rng.choice(table)
        host = rng.getrandbits(56 - r.ipv6_prefix.prefixlen) << 72
        out.append(IPv6Network((int(r.ipv6_prefix.network_address) | host, 56)))
    return out


def linear_match(prefix: IPv6Network) -> rules.Rule:
    best = None
    for r in rules.bundled().rules:
        if prefix.subnet_of(r.ipv6_prefix) and (best is None or r.ipv6_prefix.prefixlen > best.ipv6_prefix.prefixlen):
            best = r
    assert best is not None
    return best


def run() -> list[dict]:
    prefixes = sample_prefixes(N)
    table = rules.bundled()
    results = []
    for name, match in (
        ("calc: indexed rule match (ours)", table.match),
        ("calc: linear scan (baseline)", linear_match),
    ):
        t0 = time.perf_counter()
        out = [compute(match(p), p) for p in prefixes]
        dt = time.perf_counter() - t0
        results.append({"name": name, "n": len(out), "per_s": N / dt})
    ours, base = results
    return [{"name": f"calc: {N:,} prefixes in one process", "where": "host, one process", "value": ours["per_s"],
             "unit": "prefixes/s", "baseline": base["per_s"], "baseline_name": "linear scan of the rule table",
             "ratio_to_baseline": ours["per_s"] / base["per_s"]}]  # fmt: skip
