"""Plan -> map -> reduce over 1,000 inputs on the simulator, killed with SIGKILL in its map stage
and run again, side by side with the same workflow run straight through.

    python benches/plan_map_reduce.py --inputs 1000 --out benches/results/plan_map_reduce.json

The workflow is `examples/plan_map_reduce.py`: a planner call lists the inputs, a worker Batch
studies each (one call each), a reducer combines the notes (fan-in 16), each stage on a simulator
of its own.
Each side gets fresh simulators with the same seeds. Reported: makespan of each side (the killed
side's is both runs together), model requests on each simulator before the kill and after the
resume, and the ratios to the straight run: a resume that sent nothing twice has a request ratio
of 1.00 (the map jobs in flight at the kill are the only ones sent twice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchagent_rs import sim

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plan_map_reduce.py"


def vllm(server: Any) -> str:
    return "vllm://" + server.url.removeprefix("http://")


def requests(server: Any) -> int:
    return int(server.stats()["requests"]["total"])


def count(path: Path, sql: str) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def side(n: int, scale: float, kill_at: float | None, folder: Path) -> dict[str, Any]:
    journal = folder / ("killed.sqlite" if kill_at is not None else "straight.sqlite")
    with (
        sim.start(time_scale=scale, seed=6) as planner,
        sim.start(time_scale=scale, seed=7, output_tokens="uniform:8:24") as work,
        sim.start(time_scale=scale, seed=8, output_tokens="fixed:40") as reducer,
    ):
        servers = {"planner": planner, "map": work, "reduce": reducer}
        args = [sys.executable, str(EXAMPLE), vllm(planner), vllm(work), vllm(reducer), str(journal), str(n)]
        out: dict[str, Any] = {}
        started = time.perf_counter()
        if kill_at is not None:
            first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while count(journal, "SELECT count(*) FROM results") < int(n * kill_at):
                if first.poll() is not None:
                    raise SystemExit("the workflow finished before the kill point; lower --kill-at")
                time.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            out["first_run_s"] = round(time.perf_counter() - started, 3)
            out["map_results_at_kill"] = count(journal, "SELECT count(*) FROM results")
            out["requests_before_kill"] = {k: requests(v) for k, v in servers.items()}
        before = {k: requests(v) for k, v in servers.items()}
        resumed = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        out["summary"] = json.loads(done.stdout)
        out["makespan_s"] = round(time.perf_counter() - started, 3)
        if kill_at is not None:
            out["resumed_run_s"] = round(time.perf_counter() - resumed, 3)
            out["requests_after_resume"] = {k: requests(v) - before[k] for k, v in servers.items()}
        out["requests"] = {k: requests(v) for k, v in servers.items()}
        out["requests_total"] = sum(out["requests"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=0.05)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of map jobs done at the kill")
    parser.add_argument("--out", default=str(ROOT / "benches" / "results" / "plan_map_reduce.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        straight = side(args.inputs, args.time_scale, None, Path(tmp))
        killed = side(args.inputs, args.time_scale, args.kill_at, Path(tmp))
    report = {
        "benchmark": "plan_map_reduce",
        "inputs": args.inputs,
        "time_scale": args.time_scale,
        "kill_at": args.kill_at,
        "straight": straight,
        "killed_and_resumed": killed,
        "ratios": {
            "requests_killed_over_straight": round(killed["requests_total"] / straight["requests_total"], 3),
            "makespan_killed_over_straight": round(killed["makespan_s"] / straight["makespan_s"], 3),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "note": "2-core development machine shared with other builds: wall times stretch with the load",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"]), json.dumps(killed.get("requests_after_resume")))


if __name__ == "__main__":
    main()
