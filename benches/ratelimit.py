"""Single-turn prompts against a rate-limited simulator (3,000 requests / 1M tokens a minute by
default), BatchAgent side by side with the openai SDK's own retries under `asyncio.gather`.

    python benches/ratelimit.py --prompts 5000 --out benches/results/ratelimit.json

Each side gets a fresh simulator with the same seed and limits. The engine runs on a fast time
scale; the rate limit is enforced in real time, as a hosted API's is: a token bucket per limit that
holds `--burst` seconds of allowance (60: a whole minute's, full at the start) and refills
continuously. Each prompt is about 300 characters and asks for `max_tokens` 256, so it counts about
330 tokens against the limit and both limits bind.

- BatchAgent: `Batch(max_inflight=64)` against `openai+http://` (the hosted `OpenAI` protocol), with
  no `rpm=` / `tpm=`: the limits are learned from the answers' `x-ratelimit-*` headers.
- Baseline: `AsyncOpenAI(max_retries=8)` (it honours `retry-after`), one task per prompt under
  `asyncio.gather`, an `asyncio.Semaphore(64)`, as people write it.

Reported per side: wall time, answers, failures, requests the simulator saw and how many it
answered 429, and throughput as a share of the limit: the binding limit's use over the run (what
was admitted / what the buckets allowed in that time: their capacity plus the refill) and over the
steady part (after the initial bucket is spent: the last 30% of answers, per minute, over the
limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from batchagent_rs import Batch, sim

KEY = "sk-bench"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()


def prompt(i: int) -> str:
    # About 300 characters, different for each prompt.
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(44)]
    return f"Question {i}: summarise in one line: " + " ".join(words)


def limits(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "rate_limit_rpm": args.rpm,
        "rate_limit_tpm": args.tpm,
        "rate_limit_burst": args.burst,
        "output_tokens": "uniform:20:80",
    }


def measure(
    args: argparse.Namespace, stats: dict[str, Any], elapsed: float, times: list[float], failed: int
) -> dict[str, Any]:
    limit = stats["rate_limit"]
    admitted, refused, tokens = limit["admitted"], limit["refused"], limit["admitted_tokens"]
    sent = admitted + refused
    burst = args.burst / 60.0
    allowed_requests = args.rpm * burst + args.rpm / 60.0 * elapsed
    allowed_tokens = args.tpm * burst + args.tpm / 60.0 * elapsed
    use = max(admitted / allowed_requests, tokens / allowed_tokens)
    times = sorted(times)
    steady: float | None = None
    tail = times[int(len(times) * 0.7) :]
    if len(tail) >= 2 and tail[-1] > tail[0]:
        per_minute = (len(tail) - 1) / (tail[-1] - tail[0]) * 60.0
        tokens_per_request = tokens / admitted if admitted else 0.0
        steady = max(per_minute / args.rpm, per_minute * tokens_per_request / args.tpm)
    return {
        "elapsed_s": round(elapsed, 2),
        "answered": len(times),
        "failed": failed,
        "requests_sent": sent,
        "answered_429": refused,
        "share_429": round(refused / sent, 4) if sent else 0.0,
        "tokens_admitted": tokens,
        "limit_use": round(use, 4),
        "steady_limit_use": round(steady, 4) if steady is not None else None,
    }


def batchagent_side(args: argparse.Namespace, inputs: list[dict[str, str]]) -> dict[str, Any]:
    with sim.start(time_scale=args.time_scale, seed=1, **limits(args)) as server:
        times: list[float] = []
        batch = Batch(
            "{prompt}",
            model="sim-model",
            backend=f"openai+http://{server.url.removeprefix('http://')}/v1",
            api_key=KEY,
            max_turns=1,
            max_tokens=args.max_tokens,
            max_inflight=args.concurrency,
            max_attempts=20,
            on_result=lambda result: times.append(time.monotonic()),
        )
        start = time.monotonic()
        results = batch.run(inputs)
        elapsed = time.monotonic() - start
        failed = sum(1 for r in results if not r.ok)
        return measure(args, dict(server.stats()), elapsed, [t - start for t in times], failed)


async def openai_gather(
    base_url: str, args: argparse.Namespace, inputs: list[dict[str, str]]
) -> tuple[float, list[float], int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=args.sdk_retries)
    semaphore = asyncio.Semaphore(args.concurrency)
    times: list[float] = []
    failed = 0
    start = time.monotonic()

    async def one(item: dict[str, str]) -> None:
        nonlocal failed
        async with semaphore:
            try:
                await client.chat.completions.create(
                    model="sim-model",
                    messages=[{"role": "user", "content": item["prompt"]}],
                    max_tokens=args.max_tokens,
                )
            except openai.APIError:
                failed += 1
                return
            times.append(time.monotonic() - start)

    try:
        await asyncio.gather(*(one(item) for item in inputs))
    finally:
        await client.close()
    return time.monotonic() - start, times, failed


def openai_side(args: argparse.Namespace, inputs: list[dict[str, str]]) -> dict[str, Any]:
    with sim.start(time_scale=args.time_scale, seed=1, **limits(args)) as server:
        elapsed, times, failed = asyncio.run(openai_gather(server.url + "/v1", args, inputs))
        return measure(args, dict(server.stats()), elapsed, times, failed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=5000)
    p.add_argument("--rpm", type=int, default=3000)
    p.add_argument("--tpm", type=int, default=1_000_000)
    p.add_argument("--burst", type=float, default=60.0, help="seconds of allowance the buckets hold")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sdk-retries", type=int, default=8)
    p.add_argument("--time-scale", type=float, default=0.01)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    inputs = [{"prompt": prompt(i)} for i in range(args.prompts)]
    batchagent = batchagent_side(args, inputs)
    print("batchagent", json.dumps(batchagent), flush=True)
    baseline = openai_side(args, inputs)
    print("openai_gather", json.dumps(baseline), flush=True)
    report = {
        "bench": "ratelimit",
        "config": {
            "prompts": args.prompts,
            "rpm": args.rpm,
            "tpm": args.tpm,
            "burst_s": args.burst,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "sdk_max_retries": args.sdk_retries,
            "time_scale": args.time_scale,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "batchagent": batchagent,
        "openai_gather": baseline,
        "target": {"limit_use_at_least": 0.9, "share_429_at_most": 0.01},
        "target_met": batchagent["limit_use"] >= 0.9 and batchagent["share_429"] <= 0.01,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
