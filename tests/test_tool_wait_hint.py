"""The tool-wait hint (`engine_hints=True`): each model call of an agent with tools tells the engine
how long the agent will be away in its tools (the run's 75th percentile of tool waits so far), and
the simulator keeps that agent's KV blocks for its return."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import Batch, sim, tool


def lookup() -> Any:
    @tool(cache=False)
    def lookup(query: str) -> str:
        """Look something up."""
        return f"about {query}"

    return lookup


def pins(hints: bool) -> dict[str, int]:
    with sim.start(time_scale=0, seed=3, tool_rounds=2, distinct_args=100) as server:
        batch = Batch(
            "Research {topic}.",
            tools=[lookup()],
            backend="sim://" + server.url.removeprefix("http://"),
            engine_hints=hints,
            max_turns=6,
        )
        results = batch.run([{"topic": f"topic {i}"} for i in range(8)])
        assert all(r.ok and r.tool_calls == 2 for r in results), results
        counts: dict[str, int] = server.stats()["engine"]["kv_pins"]
    return counts


def test_agents_with_tools_hint_their_tool_wait_and_the_simulator_keeps_their_blocks() -> None:
    counts = pins(hints=True)
    # An agent's second call comes after its own first tool round, so it carries the hint (its
    # first may too, when another agent's tools finished before it went out); it asks for the
    # second round, so it is pinned and taken over by the agent's next call. The answer is hinted
    # too, but an answer has no return to keep blocks for.
    assert 8 <= counts["made"] <= 16, counts
    assert counts["returned"] == counts["made"], counts
    assert counts["dropped"] == 0, counts


def test_without_engine_hints_nothing_is_pinned() -> None:
    assert pins(hints=False) == {"made": 0, "returned": 0, "dropped": 0, "expired": 0}


def next_turn_cache_hit(tmp_path: Path, hint: bool, **options: Any) -> tuple[int, int, dict[str, int]]:
    """An agent's tool-calling turn, eight other agents' turns while it waits for its tool (more
    than the rest of a 2,048-token KV cache holds), then its next turn over its whole history:
    returns the first turn's prompt tokens, the next turn's cached prompt tokens and the pin counts."""
    import openai

    profile = tmp_path / "small-kv.json"
    profile.write_text(
        json.dumps(
            {
                "name": "small-kv",
                "hardware": "none",
                "model": "test",
                "block_size": 16,
                "max_num_seqs": 8,
                "max_num_batched_tokens": 512,
                "kv_capacity_tokens": 2048,
                "enable_prefix_caching": True,
                "step": {
                    "base_us": 1000.0,
                    "prefill_token_us": 1.0,
                    "prefill_attn_ns": 0.0,
                    "decode_seq_us": 10.0,
                    "kv_read_ns": 0.0,
                },
                "calibration": {"method": "fixed constants for tests"},
            }
        )
    )

    def words(seed: int, n: int) -> str:
        return " ".join(f"w{(seed * 7919 + i * 31) % 997}" for i in range(n))

    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look something up.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"],
                },
            },
        }
    ]
    with sim.start(profile=str(profile), time_scale=0, seed=5, output_tokens="fixed:20", **options) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        extra = {"batchagent": {"agent": "agent-1", "tool_wait_s": 0.8}} if hint else None
        messages: list[Any] = [
            {"role": "system", "content": words(1, 300)},
            {"role": "user", "content": "Research topic 1."},
        ]
        first = client.chat.completions.create(
            model="m", messages=messages, tools=tools, max_tokens=64, extra_body=extra
        )
        call = first.choices[0].message
        assert call.tool_calls, call
        for other in range(8):
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": words(10 + other, 300)}],
                max_tokens=32,
            )
        messages.append(call.model_dump(exclude_none=True))
        messages += [
            {"role": "tool", "tool_call_id": c.id, "content": "about topic 1"} for c in call.tool_calls
        ]
        second = client.chat.completions.create(
            model="m", messages=messages, tools=tools, max_tokens=64, extra_body=extra
        )
        assert first.usage is not None and second.usage is not None
        details = second.usage.prompt_tokens_details
        cached = details.cached_tokens if details is not None and details.cached_tokens is not None else 0
        counts: dict[str, int] = server.stats()["engine"]["kv_pins"]
    return first.usage.prompt_tokens, cached, counts


def test_the_hinted_agents_next_turn_finds_its_history_cached_under_memory_pressure(tmp_path: Path) -> None:
    prompt, cached, counts = next_turn_cache_hit(tmp_path, hint=True)
    # Its whole first prompt (its full blocks; the last is always computed) comes from the cache.
    assert cached >= prompt - 16, (prompt, cached)
    assert counts["made"] >= 1 and counts["returned"] == 1 and counts["dropped"] == 0, counts


def test_without_the_hint_the_next_turn_recomputes_its_history(tmp_path: Path) -> None:
    prompt, cached, counts = next_turn_cache_hit(tmp_path, hint=False)
    # The other agents' turns evicted its blocks, least recently used first.
    assert cached < prompt // 4, (prompt, cached)
    assert counts == {"made": 0, "returned": 0, "dropped": 0, "expired": 0}


@pytest.mark.parametrize("eviction", ["next_use", "lru"])
def test_without_pins_eviction_by_next_use_keeps_the_hinted_agents_history(
    tmp_path: Path, eviction: str
) -> None:
    # kv_pin_ttl=0: the hint pins nothing; it only says when the agent is back. The other requests
    # carry no hint, so next-use eviction takes their blocks first; LRU takes the agent's, the oldest.
    prompt, cached, counts = next_turn_cache_hit(tmp_path, hint=True, kv_pin_ttl=0, kv_eviction=eviction)
    assert counts["made"] == 0, counts
    if eviction == "next_use":
        assert cached >= prompt - 16, (prompt, cached)
    else:
        assert cached < prompt // 4, (prompt, cached)


def test_the_simulator_reports_its_kv_cache_and_refuses_bad_kv_settings() -> None:
    from batchagent_rs import SchemaError

    with pytest.raises(SchemaError, match="kv_eviction"):
        sim.start(time_scale=0, kv_eviction="mru")
    with pytest.raises(SchemaError, match="kv_page_size"):
        sim.start(time_scale=0, kv_page_size=3)
    with sim.start(time_scale=0, seed=3, kv_eviction="lru", kv_page_size=4) as server:
        kv = server.stats()["kv"]
        assert kv["eviction"] == "lru" and (kv["block_size"], kv["page_size"]) == (16, 4), kv
        assert kv["used_tokens"] == kv["table_tokens"] == kv["sequences"] == 0, kv


@pytest.mark.parametrize(
    ("hint", "field"),
    [
        ({"agent": "a", "tool_wait_s": -1}, "tool_wait_s"),
        ({"agent": "a", "tool_wait_s": 1, "next_call_s": -2}, "next_call_s"),
        ({"agent": "a", "tool_wait_s": 1, "next_call_s": "x"}, "next_call_s"),
    ],
)
def test_a_malformed_hint_is_refused_by_the_simulator(hint: dict[str, Any], field: str) -> None:
    import urllib.error
    import urllib.request

    with sim.start(time_scale=0, seed=3) as server:
        body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "batchagent": hint}
        request = urllib.request.Request(
            server.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert field in refused.value.read().decode()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


def test_the_simulator_reads_the_hint_on_completions_and_anthropic_messages() -> None:
    import urllib.error

    hint = {"agent": "a", "tool_wait_s": 1}
    with sim.start(time_scale=0, seed=3) as server:
        completion = {"model": "sim-model", "prompt": "the engine", "max_tokens": 4}
        # A completion shows no tool calls: the hint is taken at its word and the blocks pinned.
        post(server.url + "/v1/completions", {**completion, "batchagent": hint})
        schema = {"type": "object", "properties": {"query": {"type": "string"}}}
        tools = [{"name": "lookup", "description": "Look something up.", "input_schema": schema}]
        message = {"model": "sim-model", "max_tokens": 64, "tools": tools,
                   "messages": [{"role": "user", "content": "Research topic 1."}]}  # fmt: skip
        answer = post(server.url + "/v1/messages", {**message, "batchagent": {**hint, "agent": "b"}})
        assert answer["stop_reason"] == "tool_use", answer
        # A request after them: their steps' counters are out once it is answered.
        post(server.url + "/v1/completions", completion)
        assert server.stats()["engine"]["kv_pins"]["made"] == 2
        for url, body in [
            ("/v1/completions", {**completion, "prompt": ["one", "two"], "batchagent": hint}),
            ("/v1/completions", {**completion, "batchagent": {"agent": "a"}}),
            ("/v1/messages", {**message, "batchagent": {**hint, "next_call_s": -1}}),
        ]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                post(server.url + url, body)
            assert refused.value.code == 400
            assert "batchagent" in refused.value.read().decode()


def test_the_hint_carries_the_gap_to_the_agents_next_call_once_one_was_seen() -> None:
    from test_compaction import recording_proxy

    with (
        sim.start(time_scale=0, seed=3, tool_rounds=2, distinct_args=100) as server,
        recording_proxy(server.url) as (backend, seen),
    ):
        batch = Batch(
            "Research {topic}.",
            tools=[lookup()],
            backend=backend.replace("vllm://", "sim://", 1),
            engine_hints=True,
            max_turns=6,
            max_inflight=2,
        )
        results = batch.run([{"topic": f"topic {i}"} for i in range(8)])
        assert all(r.ok and r.tool_calls == 2 for r in results), results
    hints = [json.loads(body).get("batchagent") for path, body in seen if path.endswith("/chat/completions")]
    # An agent's third call follows its second tool round, and its second call went out after its
    # first: by then the gap from a call's end to the agent's next call was recorded.
    third_calls = [h for h in hints if h and "next_call_s" in h]
    assert len(third_calls) >= 8, hints
    assert all(h["next_call_s"] > 0 and h["tool_wait_s"] >= 0 for h in third_calls), third_calls
