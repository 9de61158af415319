import json
import platform
import sys
from pathlib import Path

from . import calc


def main() -> int:
    rows = calc.run()
    print(f"{'benchmark':45} {'where':20} {'n':>7} {'seconds':>9} {'per s':>10} {'x baseline':>10}")
    for r in rows:
        ratio = f"{r['ratio_to_baseline']:.1f}" if "ratio_to_baseline" in r else "(base)"
        print(f"{r['name']:45} {r['where']:20} {r['n']:>7} {r['seconds']:>9.3f} {r['per_s']:>10.0f} {ratio:>10}")
    out = Path("bench-results.json")
    machine = {"python": sys.version.split()[0], "machine": platform.machine(), "kernel": platform.release()}
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


sys.exit(main())
