"""Workers of the Redis fleet sharing one rate limit: single-turn prompts against a simulator that
enforces 3,000 requests / 1M tokens a minute (the limits of `benches/ratelimit.py`), run by 2 (and
more) `batchagent worker` processes on one key.

    python benches/ratelimit_fleet.py --prompts 5000 --workers 2,4 --out benches/results/ratelimit-fleet.json

Each worker count gets a fresh simulator (same seed and limits, the bucket full at the start as a
hosted API's is after a quiet minute) and a fresh run on the bench's own `redis-server`. The
workers learn the limits from the answers' `x-ratelimit-*` headers and pace themselves from one
budget in Redis (`batchagent:budget:*`): what any worker reads updates what all of them may send.
`max_inflight` is the fleet's, summed over the workers.

Reported per worker count, as in `benches/ratelimit.py`: the wall time from the workers' start to
the last result, requests the simulator saw and how many it answered 429, and throughput as a share
of the limit over the run (admitted / what the buckets allowed in that time: their capacity plus
the refill) and over the steady part (the last 30% of results, from `status()` polled every 0.2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_workers import redis_cli, start_redis
from ratelimit import KEY, limits, measure, prompt

from batchagent_rs import Batch, sim


def fleet_side(
    args: argparse.Namespace, workers: int, url: str, port: int, folder: Path, inputs: list[dict[str, str]]
) -> dict[str, Any]:
    redis_cli(port, "FLUSHALL")
    with sim.start(time_scale=args.time_scale, seed=1, **limits(args)) as server:
        batch = Batch(
            "{prompt}",
            model="sim-model",
            backend=f"openai+http://{server.url.removeprefix('http://')}/v1",
            max_turns=1,
            max_tokens=args.max_tokens,
            max_inflight=args.concurrency,
            max_attempts=20,
        )
        handle = batch.submit(inputs, redis=url)
        # Workers take the key from the environment, as on a machine of their own.
        env = dict(os.environ, OPENAI_API_KEY=KEY)
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "batchagent_rs.cli", "worker"),
                    *("--redis", url, "--run", handle.run_id, "--name", f"w{j}"),
                ],
                cwd=folder,
                env=env,
            )
            for j in range(workers)
        ]
        samples: list[tuple[float, int]] = []
        while any(p.poll() is None for p in procs):
            samples.append((time.monotonic() - start, int(handle.status()["done"])))
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
        status = handle.status()
        samples.append((elapsed, int(status["done"])))
        # A result's time: the first sample that counted it.
        times: list[float] = []
        for t, done in samples:
            times.extend([t] * (done - len(times)))
        result = measure(args, dict(server.stats()), elapsed, times, int(status["failed"]))
        result["workers"] = workers
        result["per_worker_results"] = {w["name"]: w["results"] for w in status["workers"]}
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=5000)
    p.add_argument("--workers", default="2,4")
    p.add_argument("--rpm", type=int, default=3000)
    p.add_argument("--tpm", type=int, default=1_000_000)
    p.add_argument("--burst", type=float, default=60.0, help="seconds of allowance the buckets hold")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=0.01)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    inputs = [{"prompt": prompt(i)} for i in range(args.prompts)]
    folder = Path(tempfile.mkdtemp(prefix="ratelimit-fleet-"))
    redis, port = start_redis(folder)
    sides = []
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            side = fleet_side(args, workers, f"redis://127.0.0.1:{port}/0", port, folder, inputs)
            print(json.dumps(side), flush=True)
            sides.append(side)
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        "bench": "ratelimit_fleet",
        "config": {
            "prompts": args.prompts,
            "rpm": args.rpm,
            "tpm": args.tpm,
            "burst_s": args.burst,
            "max_tokens": args.max_tokens,
            "max_inflight_fleet": args.concurrency,
            "time_scale": args.time_scale,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "sides": sides,
        "target": {"limit_use_at_least": 0.9, "share_429_at_most": 0.01},
        "target_met": all(s["limit_use"] >= 0.9 and s["share_429"] <= 0.01 for s in sides),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
