"""The official openai and anthropic SDKs against the simulator: proof that the wire formats conform."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from batchagent_rs import SchemaError, sim

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
ANTHROPIC_WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": WEATHER["function"]["parameters"],
}
LONG_PREFIX = "You review pull requests for a large codebase. Follow every rule of the checklist. " * 40


@pytest.fixture
def server() -> Iterator[sim.Simulator]:
    with sim.start(profile="h100-qwen2.5-0.5b", time_scale=0, seed=3) as s:
        yield s


@pytest.fixture
def oai(server: sim.Simulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sim", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(server: sim.Simulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="sim", max_retries=0) as client:
        yield client


def metric(server: sim.Simulator, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics") as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_openai_chat_tool_call_then_answer(oai: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = oai.chat.completions.create(model="sim-model", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and args["unit"] in ("c", "f")
    assert first.usage is not None and first.usage.prompt_tokens > 50

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"})
    second = oai.chat.completions.create(model="sim-model", messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    assert not second.choices[0].message.tool_calls
    # The second turn extends the first turn's prompt: its prefix is served from the cache.
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) >= 48


def test_openai_chat_stream_assembles_tool_calls_and_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "Weather in Oslo and Rome?"}],
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": {"parallel_tool_calls": 2}},
    )
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names[tc.index] = tc.function.name
                args[tc.index] = args.get(tc.index, "") + ((tc.function and tc.function.arguments) or "")
    assert finish == "tool_calls"
    assert sorted(names) == [0, 1]
    assert all(isinstance(json.loads(a)["city"], str) for a in args.values())
    assert usage is not None and usage.completion_tokens > 0
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0


def test_openai_text_stream_and_structured_output(oai: openai.OpenAI) -> None:
    pieces = [
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": "Say something."}],
            stream=True,
            extra_body={"sim": {"output_tokens": "fixed:12"}},
        )
        if c.choices
    ]
    assert "".join(pieces).strip()
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"enum": ["approve", "reject"]},
            "score": {"type": "integer", "minimum": 0},
        },
        "required": ["verdict", "score"],
        "additionalProperties": False,
    }
    r = oai.chat.completions.create(
        model="sim-model",
        messages=[{"role": "user", "content": "Review it."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Review", "schema": schema, "strict": True},
        },
    )
    out = json.loads(r.choices[0].message.content or "")
    assert out["verdict"] in ("approve", "reject") and out["score"] >= 0


def test_openai_completions_with_a_list_of_prompts(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="sim-model", prompt=["one", "two", "three"], max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.text for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == sum(1 for _ in r.choices) * 8


def test_openai_errors_surface_as_sdk_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n = 2"):
        oai.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "x"}], n=2)
    with sim.start(time_scale=0, model="sim-model") as pinned:
        client = openai.OpenAI(base_url=pinned.url + "/v1", api_key="sim", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])


def test_an_unpinned_simulator_serves_any_model_name(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="qwen2.5-7b", messages=[{"role": "user", "content": "x"}])
    assert r.model == "qwen2.5-7b"


def test_repeated_long_prefix_hits_the_cache_in_usage_and_metrics(
    server: sim.Simulator, oai: openai.OpenAI
) -> None:
    hits_before = metric(server, "vllm:prefix_cache_hits_total")
    cached = []
    for question in ("first question", "second question"):
        r = oai.chat.completions.create(
            model="sim-model",
            messages=[{"role": "system", "content": LONG_PREFIX}, {"role": "user", "content": question}],
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens or 0)
    assert cached[0] == 0
    assert cached[1] >= 640, cached
    assert metric(server, "vllm:prefix_cache_hits_total") - hits_before == cached[1]
    assert server.stats()["cache"]["hit_requests"] == 1


def test_anthropic_messages_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model="sim-model",
        max_tokens=512,
        system="You are a weather bot.",
        tools=[ANTHROPIC_WEATHER],
        messages=[{"role": "user", "content": "Weather in Lima?"}],
    )
    assert msg.stop_reason == "tool_use"
    use = next(b for b in msg.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict) and isinstance(use.input["city"], str)
    assistant_turn: Any = {"role": "assistant", "content": [b.model_dump() for b in msg.content]}
    final = claude.messages.create(
        model="sim-model",
        max_tokens=512,
        system="You are a weather bot.",
        tools=[ANTHROPIC_WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Lima?"},
            assistant_turn,
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]},
        ],
    )
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text" and final.content[0].text
    assert final.usage.output_tokens > 0


def test_anthropic_stream_helper_final_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="sim-model",
        max_tokens=512,
        tools=[ANTHROPIC_WEATHER],
        messages=[{"role": "user", "content": "Weather in Quito?"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    assert isinstance(use.input, dict) and isinstance(use.input["city"], str)
    assert final.usage.output_tokens > 0

    with claude.messages.stream(
        model="sim-model",
        max_tokens=5,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        extra_body={"sim": {"output_tokens": "fixed:50"}},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5
    assert text == final.content[0].text  # type: ignore[union-attr]


def test_anthropic_cache_control_usage(claude: anthropic.Anthropic) -> None:
    def ask(question: str) -> anthropic.types.Message:
        return claude.messages.create(
            model="sim-model",
            max_tokens=64,
            system=[{"type": "text", "text": LONG_PREFIX * 2, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": question}],
        )

    first, second = ask("one"), ask("two")
    created = first.usage.cache_creation_input_tokens or 0
    assert created >= 1024
    assert (first.usage.cache_read_input_tokens or 0) == 0
    assert second.usage.cache_read_input_tokens == created
    assert (second.usage.cache_creation_input_tokens or 0) == 0
    assert second.usage.input_tokens < created


def test_unknown_option_is_named() -> None:
    with pytest.raises(SchemaError, match="tool_roundz"):
        sim.start(time_scale=0, tool_roundz=2)
    with pytest.raises(SchemaError, match="fault_429"):
        sim.start(time_scale=0, fault_429=2.0)


def test_stop_is_idempotent_and_frees_the_port() -> None:
    server = sim.start(profile="h100-qwen2.5-0.5b", time_scale=0)
    url = server.url
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=2)
