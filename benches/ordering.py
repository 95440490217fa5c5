"""Dispatch order on one engine: the same prompts shuffled and sorted by document, side by side.

    python benches/ordering.py --time-scale 0.1 --repeat 3 --out benches/results/ordering.json

600 single-turn prompts over 6 distinct ~20k-token documents that open the user message, one
simulator with the 7B profile's step costs and a KV cache of ~100k tokens (the 7B model on a 24 GB
card), max_inflight=64. Sides:

shuffled        the input in random order, as users' data comes; BatchAgent groups it by prefix
sorted          the same items sorted by document: the oracle order
shuffled_fifo   the shuffled input dispatched in input order (`lookahead=0`): what grouping saves

Each side gets a fresh simulator (same seed), so none inherits another's cache. The ratio that
matters is shuffled / sorted (target: within 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import KV_TOKENS_24GIB, document, fleet_profile, median_run, sim_cache

from batchagent_rs import Batch, sim

TASK = "{document}\n\nQuestion {n} about document {k}: which figure matters most, and why?"


def items(prompts: int, docs: list[str]) -> list[dict[str, Any]]:
    return [{"document": docs[i % len(docs)], "k": i % len(docs), "n": i} for i in range(prompts)]


def run_side(
    name: str, work: list[dict[str, Any]], profile: str, scale: float, seed: int, inflight: int
) -> dict[str, Any]:
    lookahead = 0 if name == "shuffled_fifo" else None
    with sim.start(profile=profile, time_scale=scale, seed=seed, output_tokens="uniform:20:60") as server:
        batch = Batch(
            TASK,
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=inflight,
            max_turns=1,
            seed=seed,
            lookahead=lookahead,
        )
        started = time.perf_counter()
        results = batch.run(work)
        wall = time.perf_counter() - started
        report = batch.report()
        engine = sim_cache(server.stats())
    in_order = [r.index for r in results] == list(range(len(work)))
    return {
        "makespan_s": wall,
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "results_in_input_order": in_order,
        "cache_hit_rate": engine["hit_rate"],
        "preemptions": engine["preemptions"],
        "engine_seconds": engine["sim_seconds"],
        "ttft_p50_s": report.ttft["p50"],
        "engine": engine,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/ordering.json"))
    p.add_argument("--time-scale", type=float, default=0.1, help="engine sleeps (1 = real time)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompts", type=int, default=600)
    p.add_argument("--documents", type=int, default=6)
    p.add_argument("--prefix-tokens", type=int, default=20_000)
    p.add_argument("--kv-tokens", type=int, default=KV_TOKENS_24GIB)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="runs per side; the median makespan is reported")
    p.add_argument("--sides", default="shuffled,sorted,shuffled_fifo")
    args = p.parse_args()

    docs = [document(k, args.prefix_tokens) for k in range(args.documents)]
    ordered = sorted(items(args.prompts, docs), key=lambda x: (x["k"], x["n"]))
    shuffled = list(ordered)
    random.Random(args.seed).shuffle(shuffled)
    inputs = {"shuffled": shuffled, "sorted": ordered, "shuffled_fifo": shuffled}
    names = args.sides.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        profile = fleet_profile(args.kv_tokens, tmp)
        # Interleaved, so a burst of load on the shared machine hits every side alike.
        for _ in range(args.repeat):
            for name in names:
                side = run_side(name, inputs[name], profile, args.time_scale, args.seed, args.max_inflight)
                runs[name].append(side)
                print(
                    f"  {name}: {side['makespan_s']:.2f} s, hit rate {side['cache_hit_rate']:.1%}",
                    file=sys.stderr,
                )
    sides = {name: median_run(r) for name, r in runs.items()}
    ratios = {}
    if "shuffled" in sides and "sorted" in sides:
        ratios["shuffled_vs_sorted"] = sides["shuffled"]["makespan_s"] / sides["sorted"]["makespan_s"]
    if "shuffled_fifo" in sides and "sorted" in sides:
        ratios["shuffled_fifo_vs_sorted"] = (
            sides["shuffled_fifo"]["makespan_s"] / sides["sorted"]["makespan_s"]
        )
    result = {
        "name": "ordering",
        "time_scale": args.time_scale,
        "seed": args.seed,
        "workload": {
            "prompts": args.prompts,
            "documents": args.documents,
            "prefix_tokens": args.prefix_tokens,
            "kv_capacity_tokens": args.kv_tokens,
            "max_inflight": args.max_inflight,
            "profile": "h100-qwen2.5-7b step costs",
            "repeat": args.repeat,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "a development machine shared by several people building at once: wall times are noisy",
        },
        "sides": sides,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':14} {'makespan':>9} {'hit rate':>9} {'preempt':>8} {'engine s':>9}")
    for name, s in sides.items():
        print(
            f"{name:14} {s['makespan_s']:>8.2f}s {s['cache_hit_rate']:>9.1%} {s['preemptions']:>8} "
            f"{s['engine_seconds']:>8.2f}s"
        )
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
