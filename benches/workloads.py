"""Scheduling workloads on the engine simulator, BatchAgent and the alternative side by side in one run.

    python benches/workloads.py --workload definitive --out bench-results/workloads-definitive.json
    python benches/workloads.py --workload research   --out bench-results/workloads-research.json
    python benches/workloads.py --workload fleet      --out bench-results/workloads-fleet.json
    python benches/workloads.py --workload overlap    --out bench-results/workloads-overlap.json
    python benches/workloads.py --workload mixed      --out bench-results/workloads-mixed.json

definitive  100 two-turn agents, a ~2,048-token shared system prompt, one 800 ms tool call each over
            10 distinct arguments, max_inflight=32, profile h100-qwen2.5-7b. Baseline: the naive
            `openai` SDK + asyncio.gather loop that holds its semaphore for the whole agent
            (`batchagent_rs.baseline.run_naive`); also the careful variant that holds it only around
            model calls, to show where the win comes from.
research    20 two-turn agents, ~2,048-token prefix, a 400 ms `web_search` over 9 distinct queries.
mixed       120 agents of 1, 4 and 7 turns (40 each, interleaved), scripted per input through
            `extra_body={"sim": {"tool_rounds": k}}` (the openai SDK's `extra_body` on the baseline),
            one 300 ms uncached tool call per tool round, ~2,048-token prefix, max_inflight=32.
fleet       2,000 single-turn prompts sharing five long prefixes over three simulators: the fleet's
            prefix-affinity routing against round-robin, same prompts, same seeds.
overlap     streaming tool dispatch: agents whose turn asks for several tools at once; how much
            earlier a tool starts than the turn's end, with the stream against without.

For the agent workloads (definitive, research, mixed) the JSON and the table also give a lower bound
on the makespan: the engine's busy time (read from the simulator's `sim:engine_busy_seconds_total`,
the least any side needed, at the step costs observed) and the tools' critical path (the longest
chain of tool waits of any agent), and the share of that bound each side reached.

Each simulator is fresh for each side (same seed), so neither side inherits the other's cache.
`--time-scale` scales the simulated engine and every tool sleep alike, so ratios keep their meaning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from batchagent_rs import Batch, Result, sim, tool
from batchagent_rs.baseline import run_naive
from batchagent_rs.demo import TOPICS, Finding, system_prompt

PROFILE = "h100-qwen2.5-7b"


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def sim_cache(stats: dict[str, Any]) -> dict[str, Any]:
    """The engine's own view of its prefix cache (vLLM's prefix_cache_queries/hits, in tokens)."""
    cache = stats["cache"]
    queries = cache["prefix_queries_tokens"]
    return {
        "hit_rate": cache["prefix_hits_tokens"] / queries if queries else 0.0,
        "hit_tokens": cache["prefix_hits_tokens"],
        "query_tokens": queries,
        "requests": stats["requests"]["total"],
        "preemptions": stats["engine"]["preemptions"],
        "sim_seconds": stats["engine"]["sim_time_seconds"],
    }


# -- agent workloads (definitive, research) ------------------------------------------------------


@dataclass
class AgentWorkload:
    name: str
    agents: int
    max_inflight: int
    tool_seconds: float
    distinct_args: int
    task: str
    make_tools: Callable[[float, list[float]], list[Any]]
    output: type[pydantic.BaseModel]
    inputs: Callable[[int], list[dict[str, Any]]]
    prefix_tokens: int = 2048
    sim_options: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    # Per input: its own request-body fields (`extra_body`), and how many tool rounds it makes.
    extra_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    tool_rounds: Callable[[dict[str, Any]], int] = lambda _item: 1


def lookup_tools(seconds: float, starts: list[float]) -> list[Any]:
    @tool(cache=True)
    async def lookup(topic: str) -> str:
        """Look up the team's notes on a topic."""
        starts.append(time.perf_counter())
        await asyncio.sleep(seconds)
        return json.dumps({"topic": topic, "notes": f"Measured notes about {topic}."})

    return [lookup]


def probe_tools(seconds: float, starts: list[float]) -> list[Any]:
    @tool(cache=False)
    async def probe(target: str) -> str:
        """Probe a target and report what was found (not cached: every call is a new probe)."""
        starts.append(time.perf_counter())
        await asyncio.sleep(seconds)
        return json.dumps({"target": target, "found": f"state of {target}"})

    return [probe]


def search_tools(seconds: float, starts: list[float]) -> list[Any]:
    @tool(cache=True)
    async def web_search(query: str) -> str:
        """Search the web; returns the top results for the query."""
        starts.append(time.perf_counter())
        await asyncio.sleep(seconds)
        return json.dumps({"query": query, "results": [f"{query}: result {i}" for i in range(3)]})

    return [web_search]


class Brief(pydantic.BaseModel):
    question: str
    answer: str
    sources: list[str]


RESEARCH_TOPICS = [
    "kv cache offloading",
    "disaggregated prefill",
    "speculative decoding",
    "mixture of experts serving",
    "fp8 inference",
    "long context attention",
    "prefix caching",
    "lora serving",
    "structured generation",
]


def definitive() -> AgentWorkload:
    return AgentWorkload(
        name="definitive",
        agents=100,
        max_inflight=32,
        tool_seconds=0.8,
        distinct_args=10,
        task="Question {n}: what should we know about {topic}? Use the lookup tool, then answer.",
        make_tools=lookup_tools,
        output=Finding,
        inputs=lambda n: [{"id": f"q-{i:04d}", "topic": TOPICS[i % len(TOPICS)], "n": i} for i in range(n)],
    )


def research() -> AgentWorkload:
    return AgentWorkload(
        name="research",
        agents=20,
        max_inflight=32,
        tool_seconds=0.4,
        distinct_args=len(RESEARCH_TOPICS),
        task="Research task {n}: summarise the state of {topic}. Search the web first, then answer.",
        make_tools=search_tools,
        output=Brief,
        inputs=lambda n: [
            {"id": f"r-{i:03d}", "topic": RESEARCH_TOPICS[i % len(RESEARCH_TOPICS)], "n": i} for i in range(n)
        ],
    )


MIXED_ROUNDS = (0, 3, 6)  # tool rounds: agents of 1, 4 and 7 turns


def mixed() -> AgentWorkload:
    return AgentWorkload(
        name="mixed",
        agents=120,
        max_inflight=32,
        tool_seconds=0.3,
        distinct_args=1000,
        task="Case {n}: find out what is wrong with {topic}. Probe as you need, then answer.",
        make_tools=probe_tools,
        output=Finding,
        inputs=lambda n: [
            {
                "id": f"m-{i:04d}",
                "topic": TOPICS[i % len(TOPICS)],
                "n": i,
                "rounds": MIXED_ROUNDS[i % len(MIXED_ROUNDS)],
            }
            for i in range(n)
        ],
        max_turns=8,
        extra_body=lambda item: {"sim": {"tool_rounds": item["rounds"]}},
        tool_rounds=lambda item: int(item["rounds"]),
    )


def engine_steps(url: str, scale: float) -> dict[str, float]:
    """The simulator's busy time and step costs from its Prometheus `/metrics`, in real seconds:
    `busy_s`, `steps`, `base_step_s` (the fixed cost of one step) and `decode_seq_s` (the cost of
    one sequence in a decode step), as observed over the run."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    # `sim:engine_steps_total{model_name="m"} 42`, `sim:engine_step_seconds_total{part="base",...} 0.5`
    line = re.compile(r'^(?P<name>sim:\w+)\{(?:part="(?P<part>\w+)",)?[^}]*\} (?P<value>\S+)$', re.M)
    values = {
        m["name"] + (f".{m['part']}" if m["part"] else ""): float(m["value"]) for m in line.finditer(text)
    }
    steps = values["sim:engine_steps_total"]
    decode_seqs = values["sim:engine_step_decode_seqs_total"]
    per_step = values["sim:engine_step_seconds_total.base"] / steps if steps else 0.0
    per_seq = values["sim:engine_step_seconds_total.decode"] / decode_seqs if decode_seqs else 0.0
    return {
        "busy_s": values["sim:engine_busy_seconds_total"] * scale,
        "steps": steps,
        "base_step_s": per_step * scale,
        "decode_seq_s": per_seq * scale,
    }


def lower_bound(
    w: AgentWorkload, sides: dict[str, dict[str, Any]], completion_tokens: list[int], scale: float
) -> dict[str, Any]:
    """No schedule finishes before the engine has run its steps, nor before the agent with the
    longest chain has run it. The engine's busy time is the least any side needed, its steps at the
    costs observed. An agent's chain is its tool waits (each round at the tool's duration: a call
    that joins an identical one in flight still waits for it) plus its own output tokens, one step
    each at the cheapest step observed (the fixed step cost plus one decode sequence); the tools'
    critical path is the longest such chain. The engine serves other agents during one agent's
    tool waits, so the two overlap in any schedule and the bound is the larger; their sum is
    given too, as a reference that no schedule has to reach."""
    busy = min(side["engine"]["busy_s"] for side in sides.values())
    engine = sides["batchagent"]["engine"]
    token_s = engine["base_step_s"] + engine["decode_seq_s"]
    chains = [
        w.tool_rounds(item) * w.tool_seconds * scale + tokens * token_s
        for item, tokens in zip(w.inputs(w.agents), completion_tokens, strict=True)
    ]
    critical = max(chains)
    bound = max(busy, critical)
    return {
        "engine_busy_s": busy,
        "tools_critical_path_s": critical,
        "tool_waits_on_critical_path_s": max(w.tool_rounds(item) for item in w.inputs(w.agents))
        * w.tool_seconds
        * scale,
        "lower_bound_s": bound,
        "busy_plus_critical_path_s": busy + critical,
        "share_of_bound": {name: bound / side["makespan_s"] for name, side in sides.items()},
    }


def agent_sim_options(w: AgentWorkload) -> dict[str, Any]:
    return {
        "tool_rounds": 1,
        "distinct_args": w.distinct_args,
        "output_tokens": "uniform:30:90",
    } | w.sim_options


def run_batchagent(w: AgentWorkload, scale: float, seed: int, warm_prefix: bool = True) -> dict[str, Any]:
    starts: list[float] = []
    with sim.start(profile=PROFILE, time_scale=scale, seed=seed, **agent_sim_options(w)) as server:
        batch = Batch(
            w.task,
            system=system_prompt(w.prefix_tokens),
            tools=w.make_tools(w.tool_seconds * scale, starts),
            output=w.output,
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=w.max_inflight,
            max_turns=w.max_turns,
            warm_prefix=warm_prefix,
            seed=seed,
            extra_body=w.extra_body,
        )
        started = time.perf_counter()
        results = batch.run(w.inputs(w.agents), progress=False)
        wall = time.perf_counter() - started
        report = batch.report()
        engine = sim_cache(server.stats()) | engine_steps(server.url, scale)
    return {
        "completion_tokens": [r.usage.completion_tokens for r in results],
        "makespan_s": wall,
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "ttft_p50_s": report.ttft["p50"],
        "ttft_p95_s": report.ttft["p95"],
        "cache_hit_rate": engine["hit_rate"],
        "client_cache_hit_rate": report.cache_hit_rate,
        "tool_requests": report.tool_requests,
        "tool_executions": report.tool_executions,
        "tools_started_early": report.tools_started_early,
        "model_calls": report.model_calls,
        "engine": engine,
    }


def run_baseline(w: AgentWorkload, scale: float, seed: int, hold_slot_during_tools: bool) -> dict[str, Any]:
    starts: list[float] = []
    with sim.start(profile=PROFILE, time_scale=scale, seed=seed, **agent_sim_options(w)) as server:
        outcome = asyncio.run(
            run_naive(
                base_url=server.url + "/v1",
                model="sim-model",
                system=system_prompt(w.prefix_tokens),
                task=w.task,
                inputs=w.inputs(w.agents),
                tools=w.make_tools(w.tool_seconds * scale, starts),
                output=w.output,
                max_inflight=w.max_inflight,
                max_turns=w.max_turns,
                hold_slot_during_tools=hold_slot_during_tools,
                extra_body=w.extra_body,
            )
        )
        engine = sim_cache(server.stats()) | engine_steps(server.url, scale)
    return {
        "makespan_s": outcome.wall_seconds,
        "ok": outcome.ok,
        "failed": outcome.failed,
        "ttft_p50_s": percentile(outcome.ttfts, 50),
        "ttft_p95_s": percentile(outcome.ttfts, 95),
        "cache_hit_rate": engine["hit_rate"],
        "tool_requests": outcome.tool_executions,
        "tool_executions": outcome.tool_executions,
        "model_calls": outcome.model_calls,
        "engine": engine,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median makespan, with every run's makespan beside it: on a shared machine the
    Python baseline's makespan swings with the CPU it gets, so one run says little."""
    ordered = sorted(runs, key=lambda r: float(r["makespan_s"]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["makespans_s"] = [r["makespan_s"] for r in runs]
    return chosen


def agent_bench(w: AgentWorkload, scale: float, seed: int, careful: bool, repeat: int) -> dict[str, Any]:
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "batchagent": lambda: run_batchagent(w, scale, seed),
        "naive_hold_slot": lambda: run_baseline(w, scale, seed, hold_slot_during_tools=True),
    }
    if careful:
        runners["naive_per_call_slot"] = lambda: run_baseline(w, scale, seed, hold_slot_during_tools=False)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    # Interleaved, so a burst of load on the machine hits every side alike.
    for _ in range(repeat):
        for name, runner in runners.items():
            runs[name].append(runner())
    sides = {name: median_run(side_runs) for name, side_runs in runs.items()}
    ours = sides["batchagent"]["makespan_s"]
    ratios = {
        f"{name}_vs_batchagent": side["makespan_s"] / ours
        for name, side in sides.items()
        if name != "batchagent"
    }
    return {
        "bound": lower_bound(w, sides, sides["batchagent"].pop("completion_tokens"), scale),
        "workload": {
            "agents": w.agents,
            "max_inflight": w.max_inflight,
            "max_turns": w.max_turns,
            "tool_rounds": sorted({w.tool_rounds(item) for item in w.inputs(w.agents)}),
            "prefix_tokens": w.prefix_tokens,
            "tool_seconds": w.tool_seconds,
            "distinct_tool_args": w.distinct_args,
            "profile": PROFILE,
            "sim_options": agent_sim_options(w),
            "repeat": repeat,
        },
        "sides": sides,
        "speedup": ratios,
    }


# -- fleet ---------------------------------------------------------------------------------------

# The profile's own KV formula (0.9 x memory - weights - activations - non-torch) / 57,344 bytes per
# token, with 24 GiB instead of the H100's 80 GB: the 7b model on an L4/A10G-class card. With the
# H100's 1.03 M tokens five prefixes of realistic length never compete for the cache, and the
# routing policy could not change a hit rate.
KV_TOKENS_24GIB = (int(0.9 * 24 * 2**30) - 15_231_233_024 - 1_803_550_720 - 251_658_240) // 57_344 // 16 * 16

_WORDS = "latency throughput batching cache prefill decode tensor kernel memory scheduler queue token".split()


def document(k: int, tokens: int) -> str:
    """A long text, distinct from the first word on for each `k` (so prefixes share no block)."""
    lines = [f"Document {k}: engineering notes, volume {k}."]
    i = 0
    while sum(len(line) for line in lines) < tokens * 4:
        words = " ".join(_WORDS[(i * 7 + j * (k + 3)) % len(_WORDS)] for j in range(12))
        lines.append(f"{k}.{i}: {words}.")
        i += 1
    return "\n".join(lines)


def fleet_profile(kv_tokens: int, directory: str) -> str:
    root = Path(__file__).resolve().parent.parent
    profile = json.loads((root / "benches" / "calibration" / f"{PROFILE}.json").read_text())
    profile["name"] = f"{PROFILE}-kv{kv_tokens}"
    profile["kv_capacity_tokens"] = kv_tokens
    path = Path(directory) / f"{profile['name']}.json"
    path.write_text(json.dumps(profile))
    return str(path)


FLEET_TASK = "{document}\n\nQuestion {n} about document {k}: which figure matters most, and why?"


def fleet_items(prompts: int, docs: list[str]) -> list[dict[str, Any]]:
    return [{"document": docs[i % len(docs)], "k": i % len(docs), "n": i} for i in range(prompts)]


def run_fleet_side(
    routing: str, prompts: int, docs: list[str], profile: str, scale: float, seed: int, inflight: int
) -> dict[str, Any]:
    """`routing` is a fleet policy, or `sharded_by_prefix`: document k's prompts all go to
    simulator k mod 3 (three runs side by side, one endpoint each, the in-flight budget split
    evenly): where a router that knew each prompt's document would put them."""
    servers = [
        sim.start(profile=profile, time_scale=scale, seed=seed + i, output_tokens="uniform:20:60")
        for i in range(3)
    ]
    urls = ["vllm://" + s.url.removeprefix("http://") for s in servers]
    items = fleet_items(prompts, docs)
    try:
        if routing == "sharded_by_prefix":

            async def sharded() -> tuple[list[Result], list[float]]:
                batches = [
                    Batch(
                        FLEET_TASK,
                        model="sim-model",
                        backend=url,
                        max_inflight=inflight // 3,
                        max_turns=1,
                        seed=seed,
                    )
                    for url in urls
                ]
                shards = [[item for item in items if item["k"] % 3 == i] for i in range(3)]
                runs = await asyncio.gather(
                    *(b.arun(shard) for b, shard in zip(batches, shards, strict=True))
                )
                ttfts = [r.ttft for run in runs for r in run if r.ttft is not None]
                return [r for run in runs for r in run], ttfts

            started = time.perf_counter()
            results, ttfts = asyncio.run(sharded())
            wall = time.perf_counter() - started
            ttft = {"p50": percentile(ttfts, 50), "p95": percentile(ttfts, 95)}
            endpoints = None
        else:
            batch = Batch(
                FLEET_TASK,
                model="sim-model",
                backend=urls,
                routing=routing,
                max_inflight=inflight,
                max_turns=1,
                seed=seed,
            )
            started = time.perf_counter()
            results = batch.run(items, progress=False)
            wall = time.perf_counter() - started
            report = batch.report()
            ttft = {"p50": report.ttft["p50"], "p95": report.ttft["p95"]}
            endpoints = report.raw.get("endpoints")
        per_sim = [sim_cache(s.stats()) for s in servers]
    finally:
        for s in servers:
            s.stop()
    hits = sum(e["hit_tokens"] for e in per_sim)
    queries = sum(e["query_tokens"] for e in per_sim)
    return {
        "makespan_s": wall,
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "cache_hit_rate": hits / queries if queries else 0.0,
        "ttft_p50_s": ttft["p50"],
        "ttft_p95_s": ttft["p95"],
        "preemptions": sum(e["preemptions"] for e in per_sim),
        "endpoints": endpoints,
        "per_sim": per_sim,
    }


def fleet_bench(args: argparse.Namespace) -> dict[str, Any]:
    docs = [document(k, args.prefix_tokens) for k in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        profile = fleet_profile(args.kv_tokens, tmp)
        sides = {
            routing: run_fleet_side(
                routing, args.prompts, docs, profile, args.time_scale, args.seed, args.fleet_inflight
            )
            for routing in ("prefix_affinity", "round_robin", "sharded_by_prefix")
        }
    base = sides["round_robin"]["makespan_s"]
    oracle = sides["sharded_by_prefix"]["makespan_s"]
    return {
        "workload": {
            "prompts": args.prompts,
            "prefixes": len(docs),
            "prefix_tokens": args.prefix_tokens,
            "simulators": 3,
            "max_inflight": args.fleet_inflight,
            "profile": f"{PROFILE} step costs, kv_capacity_tokens={args.kv_tokens}",
            "note": "the shared documents open the user message (a Batch has one system prompt); the "
            "fleet keys affinity on the system prompt and on 1/4/16/64 KiB prefixes of the first user "
            "message; sharded_by_prefix is an oracle that sends each document to one simulator",
        },
        "sides": sides,
        "speedup": {f"round_robin_vs_{name}": base / side["makespan_s"] for name, side in sides.items()},
        "vs_oracle": {
            f"{name}_vs_oracle": side["makespan_s"] / oracle
            for name, side in sides.items()
            if name != "sharded_by_prefix"
        },
    }


# -- streaming tool dispatch overlap -------------------------------------------------------------


def overlap_side(
    stream: bool, agents: int, parallel: int, scale: float, seed: int, slow_first: float
) -> dict[str, Any]:
    """Each agent's first turn asks for `parallel` lookups at once. The last call of a turn is
    complete only at the turn's end (its arguments are the turn's last tokens), so `last start -
    earlier start` is a lower bound on how much earlier the earlier calls started than the turn's
    end. One agent is live at a time (window=1) so each agent's calls are consecutive in `starts`.
    The first call of each turn takes `slow_first` seconds, the others 50 ms: with equal durations
    the last call, which can only start at the turn's end, gates the next turn either way."""
    starts: list[float] = []

    @tool
    async def lookup(topic: str) -> str:
        """Look up the notes on a topic."""
        starts.append(time.perf_counter())
        first_of_turn = (len(starts) - 1) % parallel == 0
        await asyncio.sleep((slow_first if first_of_turn else 0.05) * scale)
        return "notes"

    options = {
        "tool_rounds": 1,
        "parallel_tool_calls": parallel,
        "distinct_args": 1000,
        "output_tokens": "fixed:40",
    }
    with sim.start(profile=PROFILE, time_scale=scale, seed=seed, **options) as server:
        batch = Batch(
            "Agent {n}: look up the topics you need, all at once, then answer.",
            system=system_prompt(512),
            tools=[lookup],
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=1,
            window=1,
            max_turns=3,
            stream=stream,
            seed=seed,
        )
        results: list[Result] = batch.run([{"n": i} for i in range(agents)], progress=False)
        report = batch.report()
    leads = []
    for first in range(0, len(starts) - parallel + 1, parallel):
        turn = starts[first : first + parallel]
        leads.extend(turn[-1] - t for t in turn[:-1])
    return {
        "ok": sum(r.ok for r in results),
        "tool_requests": report.tool_requests,
        "tools_started_early": report.tools_started_early,
        "lead_ms_p50": None if not leads else 1000 * statistics.median(leads),
        "lead_ms_mean": None if not leads else 1000 * statistics.fmean(leads),
        "lead_ms_max": None if not leads else 1000 * max(leads),
        "makespan_s": report.wall_seconds,
    }


def overlap_bench(args: argparse.Namespace) -> dict[str, Any]:
    sides = {
        name: overlap_side(
            stream, args.overlap_agents, args.parallel, args.time_scale, args.seed, args.slow_first_ms / 1000
        )
        for name, stream in (("streamed", True), ("not_streamed", False))
    }
    return {
        "workload": {
            "agents": args.overlap_agents,
            "parallel_tool_calls": args.parallel,
            "first_call_ms": args.slow_first_ms,
            "profile": PROFILE,
            "note": "lead = last tool start of a turn minus each earlier start: a lower bound on "
            "how long before the turn ended a tool started",
        },
        "sides": sides,
    }


# -- output --------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    if unit == "%":
        return f"{value:.1%}"
    if unit == "s":
        return f"{value:.2f} s"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(result: dict[str, Any]) -> str:
    sides: dict[str, dict[str, Any]] = result["sides"]
    rows: list[tuple[str, str, str]] = [
        ("makespan", "makespan_s", "s"),
        ("ok / failed", "", ""),
        ("TTFT p50", "ttft_p50_s", "ms"),
        ("TTFT p95", "ttft_p95_s", "ms"),
        ("prefix-cache hit rate (engine)", "cache_hit_rate", "%"),
        ("tool executions", "tool_executions", ""),
        ("tools started from the stream", "tools_started_early", ""),
        ("model calls", "model_calls", ""),
        ("engine preemptions", "preemptions", ""),
        ("tool lead p50 (ms)", "lead_ms_p50", ""),
        ("tool lead max (ms)", "lead_ms_max", ""),
    ]
    names = list(sides)
    lines = []
    header = ["", *names]
    body = []
    for label, key, unit in rows:
        if key == "":
            body.append([label, *(f"{s['ok']} / {s.get('failed', 0)}" for s in sides.values())])
        elif any(key in s for s in sides.values()):
            body.append([label, *(fmt(s.get(key), unit) for s in sides.values())])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    for r in [header, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for name, ratio in result.get("speedup", {}).items():
        lines.append(f"{name}: {ratio:.2f}x")
    for name, ratio in result.get("vs_oracle", {}).items():
        lines.append(f"{name} (makespan over the oracle's): {ratio:.2f}x")
    bound = result.get("bound")
    if bound is not None:
        lines.append(
            f"lower bound {bound['lower_bound_s']:.2f} s = max(engine busy {bound['engine_busy_s']:.2f} s, "
            f"tools' critical path {bound['tools_critical_path_s']:.2f} s); their sum "
            f"{bound['busy_plus_critical_path_s']:.2f} s"
        )
        for name, share in bound["share_of_bound"].items():
            lines.append(f"{name}: {share:.0%} of the bound")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workload", choices=["definitive", "research", "mixed", "fleet", "overlap"], required=True
    )
    p.add_argument("--out", type=Path, help="JSON file (default bench-results/workloads-<name>.json)")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="engine and tool sleeps alike (1 = real time)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--agents", type=int, help="override the workload's agent count")
    p.add_argument("--repeat", type=int, default=1, help="runs per side; the median makespan is reported")
    p.add_argument("--no-careful", action="store_true", help="skip the per-call-semaphore baseline")
    p.add_argument("--prompts", type=int, default=2000, help="fleet: prompts")
    p.add_argument("--prefix-tokens", type=int, default=24_000, help="fleet: tokens of each shared prefix")
    p.add_argument(
        "--kv-tokens", type=int, default=KV_TOKENS_24GIB, help="fleet: KV capacity of each simulator"
    )
    p.add_argument(
        "--fleet-inflight", type=int, default=96, help="fleet: max_inflight over the three simulators"
    )
    p.add_argument("--overlap-agents", type=int, default=20)
    p.add_argument("--parallel", type=int, default=3, help="overlap: tool calls per turn")
    p.add_argument(
        "--slow-first-ms", type=float, default=50, help="overlap: duration of a turn's first tool call"
    )
    args = p.parse_args()

    if args.workload == "fleet":
        result = fleet_bench(args)
    elif args.workload == "overlap":
        result = overlap_bench(args)
    else:
        w = {"definitive": definitive, "research": research, "mixed": mixed}[args.workload]()
        if args.agents:
            w.agents = args.agents
        result = agent_bench(w, args.time_scale, args.seed, careful=not args.no_careful, repeat=args.repeat)
    result = {
        "name": args.workload,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        **result,
    }
    out = args.out or Path("bench-results") / f"workloads-{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"workload {args.workload} (time scale {args.time_scale}): {json.dumps(result['workload'])}")
    print(table(result))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
