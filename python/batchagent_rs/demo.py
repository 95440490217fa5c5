"""The workload behind `batchagent demo`: a few hundred two-turn research agents that share a long
system prompt and one slow lookup tool, run on the simulator by BatchAgent and then the naive way."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import pydantic

from . import sim
from .baseline import NaiveOutcome, run_naive
from .batch import Batch, RunReport
from .progress import Progress
from .tools import tool

TOPICS = [
    "prefix caching",
    "continuous batching",
    "speculative decoding",
    "paged attention",
    "chunked prefill",
    "tensor parallelism",
    "kv cache quantization",
    "request scheduling",
    "structured output",
    "tool calling",
]

_GUIDE = [
    "Read the question and decide which facts you need before you answer.",
    "Use the lookup tool for every fact you are not certain of; never guess numbers.",
    "Cite the notes you used by topic name, and say when the notes disagree.",
    "Prefer primary measurements over summaries, and say how each figure was measured.",
    "Keep the summary short: two or three sentences a busy engineer can act on.",
    "Give a confidence between 0 and 1 that reflects how well the notes support the summary.",
]


def system_prompt(target_tokens: int = 2048) -> str:
    """A long, shared system prompt (about `target_tokens` tokens at ~4 characters a token)."""
    lines = ["You are a research assistant for an inference-infrastructure team."]
    i = 0
    while sum(len(line) for line in lines) < target_tokens * 4:
        lines.append(f"Rule {i + 1}: {_GUIDE[i % len(_GUIDE)]} (section {i // len(_GUIDE) + 1})")
        i += 1
    return "\n".join(lines)


class Finding(pydantic.BaseModel):
    topic: str
    summary: str
    confidence: float = pydantic.Field(ge=0.0, le=1.0)


def make_tools(tool_seconds: float) -> list[Any]:
    @tool(cache=True)
    async def lookup(topic: str) -> str:
        """Look up the team's notes on a topic."""
        await asyncio.sleep(tool_seconds)
        return json.dumps({"topic": topic, "notes": f"Measured notes about {topic}."})

    return [lookup]


def inputs(n: int) -> list[dict[str, Any]]:
    return [{"id": f"q-{i:04d}", "topic": TOPICS[i % len(TOPICS)], "n": i} for i in range(n)]


TASK = "Question {n}: what should we know about {topic}? Use the lookup tool, then answer."


def _simulator(profile: str, time_scale: float) -> sim.Simulator:
    return sim.start(
        profile=profile,
        time_scale=time_scale,
        seed=1,
        tool_rounds=1,
        distinct_args=len(TOPICS),
        output_tokens="uniform:30:90",
    )


def run_demo(
    *,
    agents: int = 300,
    max_inflight: int = 32,
    time_scale: float = 0.25,
    tool_seconds: float = 0.8,
    profile: str = "h100-qwen2.5-7b",
    baseline: bool = True,
    repeat: int = 3,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Both sides run `repeat` times, interleaved (the side that goes first alternates), each run
    on a fresh simulator with the same seed, after one warm-up run of each side: neither pays for
    a cold machine. The table shows each side's median run; the ratio is of the medians."""
    out = out if out is not None else sys.stdout
    system = system_prompt()
    items = inputs(agents)
    scaled_tool = tool_seconds * time_scale
    print(
        f"BatchAgent demo: {agents} two-turn agents, a ~2,048-token shared system prompt, one "
        f"{tool_seconds * 1000:.0f} ms tool call each, max_inflight={max_inflight}, on the simulator "
        f"(profile {profile}, time scale {time_scale}); "
        + (
            f"both sides {repeat}x, interleaved, after a warm-up"
            if baseline
            else f"{repeat}x after a warm-up"
        ),
        file=out,
    )
    warm = inputs(min(agents, 16))
    _batchagent_run(profile, time_scale, system, scaled_tool, warm, max_inflight, label=None)
    if baseline:
        _naive_run(profile, time_scale, system, scaled_tool, warm, max_inflight, label=None)
    ours: list[tuple[RunReport, dict[str, Any]]] = []
    theirs: list[tuple[NaiveOutcome, dict[str, Any]]] = []
    for r in range(repeat):
        sides = ["batchagent", "naive"] if baseline else ["batchagent"]
        if r % 2 == 1:
            sides.reverse()
        for side in sides:
            label = f"{'batchagent' if side == 'batchagent' else 'naive loop'} {r + 1}/{repeat}"
            if side == "batchagent":
                ours.append(
                    _batchagent_run(profile, time_scale, system, scaled_tool, items, max_inflight, label)
                )
            else:
                theirs.append(
                    _naive_run(profile, time_scale, system, scaled_tool, items, max_inflight, label)
                )
    report, batch_sim = _median(ours, lambda run: run[0].wall_seconds)
    print(
        f"\nBatchAgent run report (the median of {repeat} by makespan)\n" + report.table(),
        file=out,
    )
    summary: dict[str, Any] = {
        "batchagent": report.to_dict(),
        "batchagent_sim": batch_sim,
        "batchagent_makespans": [run[0].wall_seconds for run in ours],
    }
    if not baseline:
        return summary
    naive, sim_stats = _median(theirs, lambda run: run[0].wall_seconds)
    rows = [
        ("", "BatchAgent", "naive loop"),
        ("makespan (median)", f"{report.wall_seconds:.2f} s", f"{naive.wall_seconds:.2f} s"),
        (
            "makespans of the runs",
            " ".join(f"{run[0].wall_seconds:.2f}" for run in ours),
            " ".join(f"{run[0].wall_seconds:.2f}" for run in theirs),
        ),
        ("ok / failed", f"{report.ok} / {report.failed}", f"{naive.ok} / {naive.failed}"),
        ("model calls", str(report.model_calls), str(naive.model_calls)),
        ("tool executions", str(report.tool_executions), str(naive.tool_executions)),
        ("prefix cache hit rate", _hit_rate(batch_sim), _hit_rate(sim_stats)),
        (
            "engine TTFT p50 (simulated)",
            _ms(batch_sim["ttft_seconds"]["p50"]),
            _ms(sim_stats["ttft_seconds"]["p50"]),
        ),
        (
            "engine TTFT p90 (simulated)",
            _ms(batch_sim["ttft_seconds"]["p90"]),
            _ms(sim_stats["ttft_seconds"]["p90"]),
        ),
    ]
    print(
        "\nSide by side (the naive loop: openai SDK + asyncio.gather, semaphore held through tool waits)",
        file=out,
    )
    width = max(len(cell) for row in rows for cell in row[1:]) + 2
    for name, a, b in rows:
        print(f"  {name:<28}{a:>{width}}{b:>{width}}", file=out)
    speedup = naive.wall_seconds / report.wall_seconds if report.wall_seconds else float("nan")
    ratios = [
        n[0].wall_seconds / o[0].wall_seconds for o, n in zip(ours, theirs, strict=True) if o[0].wall_seconds
    ]
    spread = f" (runs: {', '.join(f'{x:.2f}x' for x in ratios)})" if len(ratios) > 1 else ""
    print(
        f"BatchAgent was {speedup:.2f}x faster on the same simulated engine, median of {repeat}{spread}.",
        file=out,
    )
    summary["naive"] = {
        "ok": naive.ok,
        "failed": naive.failed,
        "wall_seconds": naive.wall_seconds,
        "tool_executions": naive.tool_executions,
        "model_calls": naive.model_calls,
        "sim": sim_stats,
    }
    summary["naive_makespans"] = [run[0].wall_seconds for run in theirs]
    summary["speedup"] = speedup
    summary["speedups"] = ratios
    return summary


_Run = TypeVar("_Run")


def _median(runs: list[_Run], key: Callable[[_Run], float]) -> _Run:
    """The run with the median key (the lower of the two middle ones for an even count)."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2]


def _batchagent_run(
    profile: str,
    time_scale: float,
    system: str,
    tool_seconds: float,
    items: list[dict[str, Any]],
    max_inflight: int,
    label: str | None,
) -> tuple[RunReport, dict[str, Any]]:
    """One BatchAgent run on a fresh simulator; `label=None` draws no progress line (warm-up)."""
    with _simulator(profile, time_scale) as server:
        batch = Batch(
            TASK,
            system=system,
            tools=make_tools(tool_seconds),
            output=Finding,
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_inflight=max_inflight,
            max_turns=4,
        )
        progress = Progress(len(items), stream=sys.stderr, label=label) if label is not None else None

        async def go() -> None:
            async def tick() -> None:
                while True:
                    await asyncio.sleep(0.1)
                    stats = batch._live_stats()
                    if progress is not None and stats is not None:
                        progress.update(stats)

            ticker = asyncio.create_task(tick())
            try:
                await batch.arun(items)
            finally:
                ticker.cancel()

        asyncio.run(go())
        report = batch.report()
        if progress is not None:
            progress.close(report.raw)
        return report, server.stats()


def _naive_run(
    profile: str,
    time_scale: float,
    system: str,
    tool_seconds: float,
    items: list[dict[str, Any]],
    max_inflight: int,
    label: str | None,
) -> tuple[NaiveOutcome, dict[str, Any]]:
    """One naive-loop run on a fresh simulator; its progress line shows the same figures as
    BatchAgent's, counted by the loop itself (agents started and done, tokens from `usage`)."""
    with _simulator(profile, time_scale) as server:
        progress = Progress(len(items), stream=sys.stderr, label=label) if label is not None else None
        live: dict[str, int] = {}

        async def go() -> NaiveOutcome:
            async def tick() -> None:
                while True:
                    await asyncio.sleep(0.1)
                    if progress is not None:
                        progress.update({"run": dict(live)})

            ticker = asyncio.create_task(tick())
            try:
                return await run_naive(
                    base_url=server.url + "/v1",
                    model="sim-model",
                    system=system,
                    task=TASK,
                    inputs=items,
                    tools=make_tools(tool_seconds),
                    output=Finding,
                    max_inflight=max_inflight,
                    max_turns=4,
                    live=live,
                )
            finally:
                ticker.cancel()

        naive = asyncio.run(go())
        if progress is not None:
            progress.close({"run": dict(live)})
        return naive, server.stats()


def _hit_rate(sim_stats: dict[str, Any]) -> str:
    tokens = sim_stats["tokens"]
    return f"{tokens['cached'] / tokens['prompt']:.1%}" if tokens["prompt"] else "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
