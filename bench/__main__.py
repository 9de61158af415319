"""`make bench`: every benchmark with its baseline from the same run; a table and a JSON file.

The figure that counts is the ratio to the baseline: absolute times depend on where they ran
(the host kernel in namespaces, or the lab VM under TCG, many times slower)."""

import json
import os
import platform
import sys
import time
from pathlib import Path

from . import datapath

ROOT = Path(__file__).resolve().parents[1]


def lab_rows() -> list[dict]:
    from tests.lab import vm

    out = vm.CACHE / "bench-lab.json"
    out.unlink(missing_ok=True)
    print("bench: booting the lab VM for the control-plane benchmarks (a few minutes under TCG)", flush=True)
    result = vm.run([sys.executable, "-m", "bench.lab_bench", str(out)], timeout=1800, echo=sys.stdout.write)
    if result.status != 0 or not out.exists():
        raise SystemExit(f"bench: the lab VM run failed with status {result.status}")
    return json.loads(out.read_text())


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    text = str(value)
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table(rows: list[dict]) -> str:
    lines = [
        "| benchmark | where | ours | baseline | ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = r.get("unit", "")
        base = f"{fmt(r.get('baseline'), unit)} ({r['baseline_name']})" if "baseline_name" in r else "-"
        notes = ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if k not in {
            "name", "where", "value", "unit", "baseline", "baseline_name", "ratio_to_baseline", "seconds", "n",
        })  # fmt: skip
        ratio = fmt(r.get("ratio_to_baseline"))
        lines.append(f"| {r['name']} | {r['where']} | {fmt(r['value'], unit)} | {base} | {ratio} | {notes} |")
    return "\n".join(lines)


def main() -> int:
    started = time.time()
    rows = []
    if "--lab-only" not in sys.argv:  # --no-lab / --lab-only: half of it, while working on that half
        print("bench: data path on the host kernel (namespaces)", flush=True)
        rows += datapath.run()
    if "--no-lab" not in sys.argv:
        rows += lab_rows()
    text = table(rows)
    print(text)
    machine = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
    }
    out = ROOT / "bench-results.json"
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    (ROOT / "bench-results.md").write_text(f"Machine: {machine}\n\n{text}\n")
    print(f"wrote {out} and bench-results.md")
    return 0


sys.exit(main())
