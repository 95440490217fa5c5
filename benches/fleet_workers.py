"""The Redis worker fleet on one machine: jobs/s with 1, 2 and 4 `batchagent worker` processes
against a fast simulator (time scale 0), next to the same batch run in one process
(`Batch.run`), and what Redis costs per job.

    python benches/fleet_workers.py --jobs 2000 --out benches/results/fleet_workers.json
    python benches/fleet_workers.py --jobs 2000 --turns 6 --system-tokens 2048 --workers 2 \
        --checkpoints diff,full --no-single --out benches/results/fleet_checkpoints.json

Each job is an agent of `--turns` turns (tool calls, then the answer; two by default), with a
system prompt of `--system-tokens` tokens (about four characters a token) shared by every job.
Checkpoints are written as block-hash diffs (`diff`, the default) or whole states (`full`,
`BATCHAGENT_FLEET_CHECKPOINTS=full`); `--checkpoints diff,full` runs every worker count both ways.
The simulator is served by this process; every side gets the same one. Redis is a `redis-server` of
the bench's own (no persistence). Reported per side: the wall time from the workers' start to the
last result (worker start-up included), jobs/s over it, and for the fleet sides Redis commands and
bytes per job, read from `INFO commandstats` and `INFO stats` (`total_net_input_bytes`,
`total_net_output_bytes`) after a `CONFIG RESETSTAT`, for the submission and the work separately.
Commands are not round trips: a pipeline or a script sends several in one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchagent_rs import Batch, sim

ROOT = Path(__file__).resolve().parent.parent

TOOLS = '''
from batchagent_rs import tool


@tool
def lookup(topic: str) -> str:
    """Look up the notes on a topic."""
    return "notes on " + topic
'''


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.02)


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True
    ).stdout


def redis_cost(port: int) -> dict[str, Any]:
    """Commands by name and network bytes since the last `CONFIG RESETSTAT`."""
    calls: dict[str, int] = {}
    for line in redis_cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            stats = dict(item.split("=", 1) for item in fields.split(","))
            calls[name.removeprefix("cmdstat_")] = int(stats["calls"])
    info = dict(line.split(":", 1) for line in redis_cli(port, "INFO", "stats").splitlines() if ":" in line)
    # The INFO and CONFIG calls of this function itself are not the fleet's.
    for own in ("info", "config"):
        calls.pop(own, None)
    return {
        "commands": sum(calls.values()),
        "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "bytes_in": int(info["total_net_input_bytes"]),
        "bytes_out": int(info["total_net_output_bytes"]),
    }


def per_job(cost: dict[str, Any], jobs: int) -> dict[str, float]:
    return {
        "commands": round(cost["commands"] / jobs, 2),
        "bytes_in": round(cost["bytes_in"] / jobs, 1),
        "bytes_out": round(cost["bytes_out"] / jobs, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--turns", type=int, default=2, help="model turns per agent")
    parser.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt's tokens")
    parser.add_argument("--checkpoints", default="diff", help="diff, full, or both: diff,full")
    parser.add_argument("--no-single", action="store_true", help="skip the one-process run")
    parser.add_argument("--out", default=str(ROOT / "benches" / "results" / "fleet_workers.json"))
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")

    folder = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    (folder / "fleet_bench_tools.py").write_text(TOOLS)
    sys.path.insert(0, str(folder))
    import fleet_bench_tools

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    inputs = [{"id": f"job-{i}", "topic": f"topic {i % 100}"} for i in range(args.jobs)]
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < 4 * args.system_tokens:
        words.append(f"w{len(words) * 7919 % 5000}")
    system = " ".join(words) or None
    formats = [f.strip() for f in args.checkpoints.split(",")]
    sides: list[dict[str, Any]] = []
    redis, port = start_redis(folder)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        with sim.start(time_scale=0, seed=4, tool_rounds=args.turns - 1, output_tokens="fixed:8") as server:
            backend = "vllm://" + server.url.removeprefix("http://")

            def batch() -> Batch:
                return Batch(
                    "Research {topic}.",
                    system=system,
                    max_turns=args.turns + 1,
                    tools=[fleet_bench_tools.lookup],
                    backend=backend,
                    model="sim-model",
                    max_inflight=args.max_inflight,
                )

            if not args.no_single:
                start = time.perf_counter()
                results = batch().run(inputs)
                wall = time.perf_counter() - start
                assert all(r.ok for r in results)
                sides.append(
                    {
                        "side": "Batch.run (one process)",
                        "workers": 0,
                        "wall_s": round(wall, 3),
                        "jobs_per_s": round(args.jobs / wall, 1),
                    }
                )
                print(json.dumps(sides[-1]), file=sys.stderr)

            runs = [(int(x), f) for x in args.workers.split(",") for f in formats]
            for k, checkpoints in runs:
                env["BATCHAGENT_FLEET_CHECKPOINTS"] = checkpoints
                redis_cli(port, "FLUSHALL")
                redis_cli(port, "CONFIG", "RESETSTAT")
                start = time.perf_counter()
                handle = batch().submit(inputs, redis=url)
                submit_s = time.perf_counter() - start
                submit_cost = redis_cost(port)
                redis_cli(port, "CONFIG", "RESETSTAT")
                requests_before = int(server.stats()["requests"]["total"])
                start = time.perf_counter()
                procs = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "batchagent_rs.cli",
                            "worker",
                            "--redis",
                            url,
                            "--run",
                            handle.run_id,
                            "--name",
                            f"w{j}",
                        ],
                        cwd=folder,
                        env=env,
                    )
                    for j in range(k)
                ]
                for proc in procs:
                    assert proc.wait() == 0
                wall = time.perf_counter() - start
                work_cost = redis_cost(port)
                status = handle.status()
                assert status["done"] == args.jobs, status
                sides.append(
                    {
                        "side": f"{k} worker{'s' if k > 1 else ''}, {checkpoints} checkpoints",
                        "workers": k,
                        "checkpoints": checkpoints,
                        "wall_s": round(wall, 3),
                        "jobs_per_s": round(args.jobs / wall, 1),
                        "results_per_s_first_to_last": status["rate_overall"],
                        "submit_s": round(submit_s, 3),
                        "model_requests": int(server.stats()["requests"]["total"]) - requests_before,
                        "redis_per_job": {
                            "submit": per_job(submit_cost, args.jobs),
                            "work": per_job(work_cost, args.jobs),
                        },
                        "redis_bytes_in_per_agent_turn": round(
                            work_cost["bytes_in"] / (args.jobs * args.turns), 1
                        ),
                        "redis_commands_work": work_cost["by_command"],
                        "per_worker_results": {w["name"]: w["results"] for w in status["workers"]},
                    }
                )
                print(
                    json.dumps({k: v for k, v in sides[-1].items() if k != "redis_commands_work"}),
                    file=sys.stderr,
                )
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)
    if not args.no_single:
        single = sides[0]["jobs_per_s"]
        for s in sides[1:]:
            s["vs_one_process"] = round(s["jobs_per_s"] / single, 2)
    report = {
        "bench": "fleet_workers",
        "jobs": args.jobs,
        "turns_per_job": args.turns,
        "system_prompt_chars": len(system or ""),
        "max_inflight": args.max_inflight,
        "sim": {"time_scale": 0, "tool_rounds": args.turns - 1, "output_tokens": "fixed:8"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "sides": sides,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
