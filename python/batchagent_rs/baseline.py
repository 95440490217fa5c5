"""The agent loop people write by hand: `asyncio.gather` over the inputs, the official `openai`
SDK, and one semaphore held for the whole agent (tool waits included). `batchagent demo` and the
benchmarks in `benches/` run it side by side with BatchAgent, on the same simulator."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from .tools import Tool, encode_result


@dataclass
class NaiveOutcome:
    ok: int
    failed: int
    wall_seconds: float
    ttfts: list[float]
    tool_executions: int
    model_calls: int


async def run_naive(
    *,
    base_url: str,
    model: str,
    system: str,
    task: str,
    inputs: Sequence[dict[str, Any]],
    tools: Sequence[Tool],
    output: type[pydantic.BaseModel] | None,
    max_inflight: int,
    max_turns: int,
    hold_slot_during_tools: bool = True,
    stream: bool = True,
    on_done: Callable[[], None] | None = None,
    live: dict[str, int] | None = None,
    extra_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> NaiveOutcome:
    """Run the batch the naive way. With `hold_slot_during_tools=False` the semaphore wraps only
    each model call (a careful hand-written loop); the default holds it for the whole agent.
    `stream=False` makes plain (non-streamed) requests; TTFT is then the whole call. `live`, when
    given, is kept up to date as a run's stats are (`jobs_started`, `jobs_ok`, `jobs_failed`,
    `prompt_tokens`, `cached_tokens`, `completion_tokens`), for a progress line. `extra_body`, a
    function of the input, gives each agent's calls the SDK's `extra_body`."""
    import openai

    counts = live if live is not None else {}
    for key in (
        "jobs_started",
        "jobs_ok",
        "jobs_failed",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
    ):
        counts.setdefault(key, 0)

    def count_usage(usage: Any) -> None:
        if usage is None:
            return
        counts["prompt_tokens"] += usage.prompt_tokens or 0
        counts["completion_tokens"] += usage.completion_tokens or 0
        details = getattr(usage, "prompt_tokens_details", None)
        counts["cached_tokens"] += (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0

    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=6)
    by_name = {t.name: t for t in tools}
    tool_defs = [{"type": "function", "function": t.definition()} for t in tools]
    sem = asyncio.Semaphore(max_inflight)
    ttfts: list[float] = []
    counters = {"tools": 0, "calls": 0}
    if output is not None:
        schema = json.dumps(output.model_json_schema(), separators=(",", ":"))
        system = (
            f"{system}\n\nWhen you give your final answer, reply with only a JSON value that conforms "
            f"to this JSON Schema:\n```json\n{schema}\n```"
        )

    async def call_model(messages: list[dict[str, Any]], extra: dict[str, Any] | None) -> Any:
        started = time.perf_counter()
        if not stream:
            response = await client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                tools=tool_defs or openai.NOT_GIVEN,  # type: ignore[arg-type]
                extra_body=extra,
            )
            ttfts.append(time.perf_counter() - started)
            counters["calls"] += 1
            count_usage(response.usage)
            message = response.choices[0].message
            return message.content or "", [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in message.tool_calls or []
                if c.type == "function"
            ]
        chunks = await client.chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=messages,
            tools=tool_defs or openai.NOT_GIVEN,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        first = True
        async for chunk in chunks:
            count_usage(getattr(chunk, "usage", None))
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if first and (delta.content or delta.tool_calls):
                ttfts.append(time.perf_counter() - started)
                first = False
            if delta.content:
                content.append(delta.content)
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
        counters["calls"] += 1
        return "".join(content), [calls[i] for i in sorted(calls)]

    async def run_tool(name: str, arguments: str) -> str:
        counters["tools"] += 1
        t = by_name[name]
        kwargs = t.parse_arguments(arguments)
        if inspect.iscoroutinefunction(t.fn):
            return encode_result(await t.fn(**kwargs))
        return encode_result(await asyncio.to_thread(t.fn, **kwargs))

    async def agent(item: dict[str, Any]) -> bool:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": task.format(**item)},
        ]
        extra = None if extra_body is None else extra_body(item)
        for _ in range(max_turns):
            if hold_slot_during_tools:
                text, calls = await call_model(messages, extra)
            else:
                async with sem:
                    text, calls = await call_model(messages, extra)
            if not calls:
                if output is None:
                    return True
                start, end = text.find("{"), text.rfind("}")
                output.model_validate_json(text[start : end + 1])
                return True
            messages.append(
                {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in calls
                    ],
                }
            )
            results = await asyncio.gather(*(run_tool(c["name"], c["arguments"]) for c in calls))
            for c, r in zip(calls, results, strict=True):
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": r})
        return False

    async def guarded(item: dict[str, Any]) -> bool:
        ok = False
        try:
            if hold_slot_during_tools:
                async with sem:
                    counts["jobs_started"] += 1
                    ok = await agent(item)
            else:
                counts["jobs_started"] += 1
                ok = await agent(item)
        except Exception:
            ok = False
        finally:
            counts["jobs_ok" if ok else "jobs_failed"] += 1
            if on_done is not None:
                on_done()
        return ok

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(guarded(item) for item in inputs))
    wall = time.perf_counter() - started
    await client.close()
    ok = sum(outcomes)
    return NaiveOutcome(ok, len(outcomes) - ok, wall, ttfts, counters["tools"], counters["calls"])
