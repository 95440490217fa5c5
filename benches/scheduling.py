"""Every scheduling figure of the README in one go: dispatch order on one engine, the fleet against
its oracle, and the definitive and mixed-turn agent workloads against the naive loop and their lower
bound. Each bench writes its own JSON into `--out-dir`; this script adds `scheduling.json` with the
ratios side by side and the machine's load while they ran.

    python benches/scheduling.py --out-dir benches/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (name, script, arguments): the commands the README's tables name.
BENCHES: list[tuple[str, str, list[str]]] = [
    ("ordering", "ordering.py", ["--time-scale", "0.1", "--repeat", "2"]),
    ("workloads-fleet", "workloads.py", ["--workload", "fleet", "--time-scale", "0.1"]),
    ("workloads-definitive", "workloads.py", ["--workload", "definitive", "--repeat", "3"]),
    ("workloads-mixed", "workloads.py", ["--workload", "mixed", "--repeat", "3"]),
]


def load() -> list[float]:
    return list(os.getloadavg())


def summary(name: str, result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ratios", "speedup", "vs_oracle"):
        if key in result:
            out[key] = result[key]
    if "bound" in result:
        bound = result["bound"]
        out["lower_bound_s"] = bound["lower_bound_s"]
        out["share_of_bound"] = bound["share_of_bound"]
    out["makespans_s"] = {side: r.get("makespan_s") for side, r in result.get("sides", {}).items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    p.add_argument("--only", action="append", help="run only these benches (by name); repeatable")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    started = time.time()
    for name, script, extra in BENCHES:
        if args.only and name not in args.only:
            continue
        out = args.out_dir / f"{name}.json"
        command = [sys.executable, str(HERE / script), *extra, "--out", str(out)]
        before = load()
        began = time.perf_counter()
        subprocess.run(command, check=True)
        result = json.loads(out.read_text())
        runs[name] = {
            "command": " ".join(["python", f"benches/{script}", *extra, "--out", str(out)]),
            "seconds": time.perf_counter() - began,
            "load_average_before": before,
            "load_average_after": load(),
            **summary(name, result),
        }
    report = {
        "name": "scheduling",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "measured in one invocation, one bench after the other, on a machine shared with "
            "other builds (see each bench's load averages): wall times stretch with the load, the "
            "ratios within one bench are taken side by side and hold better",
        },
        "benches": runs,
    }
    path = args.out_dir / "scheduling.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
