"""Scheduling behaviour a user can observe on the simulator: tools started from the stream before
the turn ends, and the prefix warm-up turning a concurrent fan-out into cache hits."""

from __future__ import annotations

import statistics
import time
from typing import Any

from batchagent_rs import Batch, tool
from batchagent_rs import sim as simulator
from batchagent_rs.demo import system_prompt

PARALLEL = 3


def tool_starts(stream: bool, agents: int = 8) -> tuple[list[list[float]], Any]:
    """Runs agents one at a time (window=1) whose first turn asks for PARALLEL lookups at once;
    returns each turn's tool start times and the run report."""
    starts: list[float] = []

    @tool(cache=False)
    async def lookup(topic: str) -> str:
        """Look a topic up."""
        starts.append(time.perf_counter())
        return f"notes on {topic}"

    with simulator.start(
        profile="h100-qwen2.5-7b",
        time_scale=1.0,
        seed=5,
        tool_rounds=1,
        parallel_tool_calls=PARALLEL,
        distinct_args=1000,
    ) as server:
        batch = Batch(
            "Agent {n}: look up what you need, all at once, then answer.",
            system="You are a research agent.",
            tools=[lookup],
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=1,
            window=1,
            max_turns=3,
            stream=stream,
        )
        results = batch.run([{"n": i} for i in range(agents)])
        assert all(r.ok and r.tool_calls == PARALLEL for r in results), [r.error for r in results]
    assert len(starts) == agents * PARALLEL
    return [starts[i : i + PARALLEL] for i in range(0, len(starts), PARALLEL)], batch.report()


def test_streamed_tool_calls_start_before_the_turn_ends() -> None:
    turns, report = tool_starts(stream=True)
    assert report.tools_started_early > 0
    # The last call of a turn is complete only when the turn's last tokens arrive; the earlier calls
    # of the same turn started while the engine was still generating those tokens.
    leads = [turn[-1] - t for turn in turns for t in turn[:-1]]
    assert all(turn == sorted(turn) for turn in turns)
    assert all(lead > 0 for lead in leads)
    # Each later call's arguments are several decode steps of the simulated engine (>= 5.7 ms each
    # on this profile), so an early start leads by at least that; without the stream, every call of
    # a turn starts together once the response is complete.
    unstreamed, plain = tool_starts(stream=False)
    assert plain.tools_started_early == 0
    unstreamed_leads = [turn[-1] - t for turn in unstreamed for t in turn[:-1]]
    assert statistics.median(leads) > 0.005
    assert statistics.median(leads) > statistics.median(unstreamed_leads)


def fan_out_hit_rate(warm_prefix: bool) -> tuple[float, float]:
    with simulator.start(profile="h100-qwen2.5-7b", time_scale=0.05, seed=9) as server:
        batch = Batch(
            "Question {n}: answer in one sentence.",
            system=system_prompt(2048),
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=32,
            max_turns=1,
            warm_prefix=warm_prefix,
            seed=9,
        )
        results = batch.run([{"n": i} for i in range(32)])
        assert all(r.ok for r in results)
        cache = server.stats()["cache"]
    return batch.report().cache_hit_rate, cache["prefix_hits_tokens"] / cache["prefix_queries_tokens"]


def test_prefix_warm_up_makes_the_fan_out_hit_the_cache() -> None:
    warm_client, warm_engine = fan_out_hit_rate(True)
    cold_client, cold_engine = fan_out_hit_rate(False)
    # Without warm-up the 32 concurrent first arrivals that the engine schedules in its first steps
    # all compute the 2,048-token system prompt; with it, one short request did so for everyone.
    assert warm_client > cold_client
    assert warm_engine > cold_engine
    assert warm_client > 0.95
