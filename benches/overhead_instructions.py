"""Client instructions per agent-turn, counted by callgrind: this build beside an earlier one.

CPU time on a shared 2-core machine moves by 10-20% from run to run (the same build measured twice
by `benches/overhead.py` came out 0.91x and 1.09x of itself under load). Instruction counts do not:
callgrind counts the same total for the same binary and input whatever else runs. Each client runs
the workload of `benches/overhead.py` (agents x 2 turns against the simulator at zero latency) under
callgrind at two sizes; the difference divided by the extra agent-turns is the marginal cost of one
agent-turn, free of the run's fixed costs (imports, connecting, the pre-run check), which are
reported apart.

    python benches/overhead_instructions.py --previous ../base/.venv/bin/python \\
        --out benches/results/overhead-instructions.json

Needs valgrind. `--previous` is an interpreter holding the earlier build (see overhead.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from overhead import _start_sim


def _instructions(python: str, url: str, agents: int, stream: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                # The interpreter itself, not a shim script that would exec it out of valgrind's sight.
                os.path.realpath(python),
                str(Path(__file__).parent / "overhead.py"),
                "--child",
                "batchagent",
                "--url",
                url,
                "--agents",
                str(agents),
                "--stream" if stream else "--no-stream",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({python}, {agents} agents):\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", required=True, metavar="PYTHON")
    p.add_argument("--agents", type=int, nargs=2, default=[400, 1200], metavar=("SMALL", "LARGE"))
    p.add_argument("--out", default="bench-results/overhead-instructions.json")
    args = p.parse_args()
    pythons = {"current": sys.executable, "previous": args.previous}
    small, large = args.agents
    rows: list[dict[str, Any]] = []
    for stream in (False, True):
        row: dict[str, Any] = {"stream": stream}
        for side, python in pythons.items():
            proc, url = _start_sim()
            try:
                counts = {n: _instructions(python, url, n, stream) for n in (small, large)}
            finally:
                proc.terminate()
                proc.wait()
            turns = 2 * (large - small)  # two turns per agent: a tool call, then the answer
            per_turn = (counts[large] - counts[small]) / turns
            row[side] = {
                "instructions": counts,
                "per_agent_turn": round(per_turn),
                "fixed": round(counts[small] - per_turn * 2 * small),
            }
        row["per_turn_current_over_previous"] = (
            row["current"]["per_agent_turn"] / row["previous"]["per_agent_turn"]
        )
        rows.append(row)
        mode = "stream" if stream else "plain"
        print(
            f"{mode:>6}  per agent-turn: current {row['current']['per_agent_turn']:,}"
            f"  previous {row['previous']['per_agent_turn']:,}"
            f"  ratio {row['per_turn_current_over_previous']:.3f}   fixed per run: current"
            f" {row['current']['fixed']:,}  previous {row['previous']['fixed']:,}",
            flush=True,
        )
    result = {
        "benchmark": "overhead-instructions",
        "unit": "instructions (callgrind Ir) of the client process, all threads",
        "agents": args.agents,
        "previous": args.previous,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
