"""Agent-aware KV on the engine simulator (the scheduler and block manager the embedded engine runs):
tool-wait retention and eviction by next use, each on and off, under KV memory pressure.

    python benches/agent_kv.py --agents 300 1000 --out benches/results/agent-kv.json

The definitive workload's agents (a ~2,048-token shared system prompt, 0.8 s tools) with 2 to 6
turns each (1 to 5 tool rounds, scripted per agent through `extra_body={"sim": {"tool_rounds": k}}`,
uncached tools so every round waits), max_inflight=32, through `Batch(engine_hints=True)` against
sim:// (the client sends each agent's id, the run's P75 tool wait and the predicted gap to its next
call, by slot priority). The simulator runs the h100-qwen2.5-7b step costs with a KV cache of
`--kv-tokens` (default 32,768 tokens), far below what the agents alive at once hold, so blocks are
evicted all the time. Four configurations, each on a
fresh simulator with the same seed:

    retention off, eviction lru        (the baseline: what vLLM does with the same requests)
    retention off, eviction next_use
    retention on,  eviction lru        (kv_pin_ttl=30: blocks pinned for min(30 s, 2 x the wait))
    retention on,  eviction next_use

Retention off is `kv_pin_ttl=0` (the hints are sent, nothing is pinned). A fifth run with the
profile's own KV cache (1.03 M tokens: nothing is ever evicted) gives the prefill no eviction can
avoid (each turn's new tokens); what a configuration computes beyond it is recomputation. For each:
makespan, prompt tokens and the prefill tokens the engine computed, recomputed, the prefix-cache hit
rate, preemptions, evictions, pins, and ratios against the baseline. The KV bytes per live sequence
with and without sharing come from the simulator's /sim/stats (`kv`: the KV tokens held, and the
tokens in the holders' page tables), sampled every 100 ms over each run.

Then the default configuration again with smaller KV pages (`--page-sizes`, default 4 and 1: the
simulator's `kv_page_size`; blocks stay 16 tokens), where a block that departs partway from a cached
one is stored as a diff of it (its pages up to there are the cached block's) and an agent's last
partial block stays cached for its next turn: the KV bytes per sequence and the prefill each saves.

`--time-scale` scales the simulated engine and the tool sleeps alike (1, the workload benches'
default: real time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import PROFILE

from batchagent_rs import Batch, sim, tool
from batchagent_rs.demo import TOPICS, Finding, system_prompt

TOOL_SECONDS = 0.8
PREFIX_TOKENS = 2048
MAX_INFLIGHT = 32
# Qwen2.5-7B's KV per token: 28 layers x (K and V) x 4 KV heads x 128 x 2 bytes (bf16).
KV_BYTES_PER_TOKEN = 28 * 2 * 4 * 128 * 2
CONFIGS = [
    ("off", "lru"),
    ("off", "next_use"),
    ("on", "lru"),
    ("on", "next_use"),
]


def inputs(n: int) -> list[dict[str, Any]]:
    """Agent i makes 1 + i % 5 tool rounds: 2 to 6 turns, interleaved."""
    return [
        {"id": f"a-{i:04d}", "topic": TOPICS[i % len(TOPICS)], "n": i, "rounds": 1 + i % 5} for i in range(n)
    ]


def probe_tool(seconds: float) -> Any:
    @tool(cache=False)
    async def probe(target: str) -> str:
        """Probe a target and report what was found (not cached: every call is a new probe)."""
        await asyncio.sleep(seconds)
        return json.dumps({"target": target, "found": f"state of {target}"})

    return probe


def calibrated_profile() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    profile: dict[str, Any] = json.loads((root / "benches" / "calibration" / f"{PROFILE}.json").read_text())
    return profile


def profile_kv_tokens() -> int:
    return int(calibrated_profile()["kv_capacity_tokens"])


def small_kv_profile(kv_tokens: int, directory: str) -> str:
    profile = calibrated_profile()
    profile["name"] = f"{PROFILE}-kv{kv_tokens}"
    profile["kv_capacity_tokens"] = kv_tokens
    path = Path(directory) / f"{profile['name']}.json"
    path.write_text(json.dumps(profile))
    return str(path)


class KvSampler:
    """Polls /sim/stats every `period` seconds on a thread of its own: the KV blocks held and in
    block tables while sequences hold any."""

    def __init__(self, server: Any, period: float = 0.1) -> None:
        self.server = server
        self.period = period
        self.samples: list[dict[str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.wait(self.period):
            kv = self.server.stats()["kv"]
            if kv["sequences"]:
                self.samples.append(kv)

    def __enter__(self) -> KvSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def run_config(
    agents: int,
    retention: str,
    eviction: str,
    profile: str,
    scale: float,
    seed: int,
    page_size: int | None = None,
) -> dict[str, Any]:
    options: dict[str, str | int | float | bool] = {
        "tool_rounds": 1,
        "distinct_args": 1_000_000,
        "output_tokens": "uniform:30:90",
        "kv_pin_ttl": 30 if retention == "on" else 0,
        "kv_eviction": eviction,
    }
    if page_size is not None:
        options["kv_page_size"] = page_size
    with sim.start(profile=profile, time_scale=scale, seed=seed, **options) as server:
        batch = Batch(
            "Case {n}: find out what is wrong with {topic}. Probe as you need, then answer.",
            system=system_prompt(PREFIX_TOKENS),
            tools=[probe_tool(TOOL_SECONDS * scale)],
            output=Finding,
            model="sim-model",
            backend="sim://" + server.url.removeprefix("http://"),
            max_inflight=MAX_INFLIGHT,
            max_turns=8,
            seed=seed,
            engine_hints=True,
            extra_body=lambda item: {"sim": {"tool_rounds": item["rounds"]}},
        )
        with KvSampler(server) as sampler:
            started = time.perf_counter()
            results = batch.run(inputs(agents), progress=False)
            wall = time.perf_counter() - started
        stats = server.stats()
    engine, cache = stats["engine"], stats["cache"]
    queries = cache["prefix_queries_tokens"]
    samples = sampler.samples
    seqs = sum(s["sequences"] for s in samples)
    held = sum(s["used_tokens"] for s in samples)
    tables = sum(s["table_tokens"] for s in samples)
    # Little's law: agents alive on average = the sum of their lifetimes over the makespan.
    alive = sum(r.total for r in results) / wall
    return {
        "retention": retention,
        "eviction": eviction,
        "kv_page_size": stats["kv"]["page_size"],
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "turns": sum(r.turns for r in results),
        "makespan_s": wall,
        "sim_seconds": engine["sim_time_seconds"],
        "engine_busy_s": engine["busy_seconds"] * scale,
        "prompt_tokens": stats["tokens"]["prompt"],
        "prefill_tokens_computed": engine["step_prefill_tokens"],
        "prefix_cache_hit_rate": cache["prefix_hits_tokens"] / queries if queries else 0.0,
        "prefix_cache_hit_tokens": cache["prefix_hits_tokens"],
        "preemptions": engine["preemptions"],
        "evictions": stats["kv"]["evictions"],
        "kv_pins": engine["kv_pins"],
        "agents_alive_mean": alive,
        "mean_prompt_tokens_per_call": statistics.fmean(
            r.usage.prompt_tokens / max(r.turns, 1) for r in results
        ),
        "kv_samples": len(samples),
        "kv_sequences_mean": seqs / len(samples) if samples else 0.0,
        "kv_bytes_per_sequence": {
            "shared": held / seqs * KV_BYTES_PER_TOKEN if seqs else None,
            "without_sharing": tables / seqs * KV_BYTES_PER_TOKEN if seqs else None,
            "ratio": held / tables if tables else None,
        },
    }


def ratios(side: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        return side[key] / base[key] if base[key] else None

    return {
        "makespan": ratio("makespan_s"),
        "prefill_tokens_computed": ratio("prefill_tokens_computed"),
        "prefill_tokens_recomputed": ratio("prefill_tokens_recomputed"),
        "engine_busy": ratio("engine_busy_s"),
        "preemptions": ratio("preemptions"),
    }


def bench(
    agents: int, kv_tokens: int, profile: str, scale: float, seed: int, page_sizes: list[int]
) -> dict[str, Any]:
    unbounded = run_config(agents, "off", "lru", PROFILE, scale, seed)
    floor = unbounded["prefill_tokens_computed"]
    print(f"{agents} agents, unbounded KV: prefill {floor:,}", file=sys.stderr, flush=True)
    sides = {}
    for retention, eviction in CONFIGS:
        name = f"retention_{retention}+{eviction}"
        sides[name] = run_config(agents, retention, eviction, profile, scale, seed)
        s = sides[name]
        s["prefill_tokens_recomputed"] = s["prefill_tokens_computed"] - floor
        print(
            f"{agents} agents {name}: {s['makespan_s']:.1f} s, prefill {s['prefill_tokens_computed']:,} of "
            f"{s['prompt_tokens']:,} prompt tokens, hit rate {s['prefix_cache_hit_rate']:.3f}, "
            f"preemptions {s['preemptions']}, pins {s['kv_pins']}",
            file=sys.stderr,
            flush=True,
        )
    default = sides["retention_on+next_use"]
    for page in page_sizes:
        name = f"retention_on+next_use+kv_page_{page}"
        s = sides[name] = run_config(agents, "on", "next_use", profile, scale, seed, page)
        s["prefill_tokens_recomputed"] = s["prefill_tokens_computed"] - floor
        bytes_16, bytes_p = default["kv_bytes_per_sequence"]["shared"], s["kv_bytes_per_sequence"]["shared"]
        s["vs_kv_page_16"] = {
            "kv_bytes_per_sequence": bytes_p / bytes_16 if bytes_16 else None,
            "prefill_tokens_computed": s["prefill_tokens_computed"] / default["prefill_tokens_computed"],
            "prefix_cache_hit_tokens": s["prefix_cache_hit_tokens"] / default["prefix_cache_hit_tokens"],
            "makespan": s["makespan_s"] / default["makespan_s"],
        }
        print(
            f"{agents} agents {name}: {s['makespan_s']:.1f} s, prefill {s['prefill_tokens_computed']:,}, "
            f"KV per sequence {bytes_p / 1e6:.2f} MB against {bytes_16 / 1e6:.2f} MB with pages of 16",
            file=sys.stderr,
            flush=True,
        )
    base = sides["retention_off+lru"]
    for s in sides.values():
        s["vs_baseline"] = ratios(s, base)
    # The agents alive at once and what each holds at its mean call: the shared prompt once, each
    # agent's own history once per agent.
    alive = base["agents_alive_mean"]
    own = base["mean_prompt_tokens_per_call"] - PREFIX_TOKENS
    return {
        "agents": agents,
        "kv_capacity_tokens": kv_tokens,
        "unbounded_kv": unbounded | {"kv_capacity_tokens": profile_kv_tokens()},
        "working_set_estimate_tokens": round(PREFIX_TOKENS + alive * own),
        "working_set_note": (
            "the shared system prompt once plus, for the agents alive at once (Little's law over the "
            "baseline run: the sum of their lifetimes over the makespan), each one's own history at its "
            "mean call (mean prompt tokens per call less the shared prompt); an agent's history grows "
            "over its turns, so its last turns need more"
        ),
        "sides": sides,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--kv-tokens", type=int, default=32_768, help="the simulator's KV cache, in tokens")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engine and tool sleeps alike (1 = real time)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--page-sizes", type=int, nargs="*", default=[4, 1], help="KV page sizes to run the default with"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results") / "agent-kv.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        profile = small_kv_profile(args.kv_tokens, tmp)
        runs = [
            bench(n, args.kv_tokens, profile, args.time_scale, args.seed, args.page_sizes)
            for n in args.agents
        ]
    result = {
        "name": "agent-kv",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "time_scale": args.time_scale,
        "seed": args.seed,
        "workload": {
            "turns": "2-6 (1 + i % 5 tool rounds for agent i)",
            "shared_prompt_tokens": PREFIX_TOKENS,
            "tool_seconds": TOOL_SECONDS,
            "max_inflight": MAX_INFLIGHT,
            "output_tokens": "uniform:30:90",
            "profile": f"{PROFILE} step costs, kv_capacity_tokens={args.kv_tokens}",
            "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
            "client": (
                "Batch(engine_hints=True) on sim://: each call carries its agent id"
                ", the run's P75 tool wait and the P75 gap to the next call at its slot priority"
            ),
            "retention_off": "kv_pin_ttl=0",
            "retention_on": "kv_pin_ttl=30 (simulated s)",
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
