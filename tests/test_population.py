"""Populations of persistent agents stepped in ticks, against the simulator."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pydantic
import pytest
from first_call_waits import FirstCallWaits
from test_compaction import recording_proxy

from batchagent_rs import InputError, JournalError, Population, SchemaError, sim, tool

FAST = "sim://?time_scale=0&seed=7"
SYSTEM = "You are a trader in a market of many traders. Decide one action per tick. " * 40


class Action(pydantic.BaseModel):
    move: str
    amount: int


def contents(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in history]


def test_each_agent_keeps_its_conversation_across_ticks() -> None:
    ids = [f"a{i}" for i in range(6)]
    with Population(
        ids, system=SYSTEM, output=Action, backend=FAST, task="price {price}, cash {cash}"
    ) as pop:
        first = pop.step({a: {"price": 10 + i, "cash": 100} for i, a in enumerate(ids)})
        assert list(first) == ids
        assert all(r.ok and isinstance(r.output, Action) for r in first.values()), first
        assert [r.id for r in first.values()] == ids
        # Only some agents step in the second tick; a string observation is sent as it is.
        second = pop.step({"a1": "market closed early", "a4": {"price": 3, "cash": 7}})
        assert list(second) == ["a1", "a4"]
        assert pop.ticks == 2
        history = pop.history("a1")
        assert contents(history)[0] == ("user", "price 11, cash 100")
        assert contents(history)[2] == ("user", "market closed early")
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert Action.model_validate_json(history[1]["content"]) == first["a1"].output
        assert Action.model_validate_json(history[3]["content"]) == second["a1"].output
        assert [m["role"] for m in pop.history("a0")] == ["user", "assistant"]
        # The second tick's requests carried the history: more prompt tokens than the first's.
        assert second["a1"].usage.prompt_tokens > first["a1"].usage.prompt_tokens
        report = pop.report()
        assert (report.agents, report.ticks, report.steps, report.deadline_misses) == (6, 2, 8, 0)
        assert report.tick_latency["p50"] is not None and report.tick_latency["max"] is not None
        # The system prompt was warmed once and shared: every step's prompt started with a hit.
        assert all(r.usage.cached_tokens > 0 for r in first.values())
        assert report.cache_hit_rate > 0.5


def test_observations_are_checked_before_anything_is_sent() -> None:
    with Population(["a", "b"], backend=FAST, task="price {price}") as pop:
        with pytest.raises(InputError, match="'zed' is not an agent"):
            pop.step({"zed": "hello"})
        with pytest.raises(
            InputError, match=r"agent \"b\": observation: template variable 'price' is missing"
        ):
            pop.step({"a": {"price": 1}, "b": {"cost": 2}})
        with pytest.raises(InputError, match="expected a string or a dict"):
            pop.step({"a": 3})
        assert pop.history("a") == [] and pop.ticks == 0
        assert pop.report().model_calls == 0
    with Population(["a"], backend=FAST) as pop, pytest.raises(InputError, match="needs a template"):
        pop.step({"a": {"price": 1}})
    with pytest.raises(InputError, match="unique"):
        Population(["a", "a"], backend=FAST)
    with pytest.raises(SchemaError, match="deadline"):
        Population(["a"], backend=FAST, deadline=0)


def test_a_tick_with_tool_calls_records_them_in_the_history() -> None:
    calls: list[dict[str, Any]] = []
    lock = threading.Lock()

    @tool
    def quote(symbol: str) -> str:
        """Look up a price."""
        with lock:
            calls.append({"symbol": symbol})
        return f"{symbol}: 42"

    ids = ["x", "y", "z"]
    with Population(
        ids, system=SYSTEM, output=Action, tools=[quote], backend=FAST + "&tool_rounds=1&distinct_args=100"
    ) as pop:
        first = pop.step({a: f"tick 1 for {a}" for a in ids})
        assert all(r.ok and r.tool_calls == 1 and r.turns == 2 for r in first.values()), first
        assert len(calls) == 3
        for agent in ids:
            roles = [m["role"] for m in pop.history(agent)]
            assert roles == ["user", "assistant", "tool", "assistant"], roles
            call = pop.history(agent)[1]["tool_calls"][0]
            assert call["name"] == "quote"
            assert pop.history(agent)[2]["content"].endswith(": 42")
        second = pop.step({a: "tick 2" for a in ids})
        assert all(r.ok and r.tool_calls == 0 for r in second.values())
        assert [m["role"] for m in pop.history("y")][4:] == ["user", "assistant"]
        assert pop.report().tool_calls == 3


def test_deadline_misses_are_results_and_late_answers_are_discarded(first_call_waits: FirstCallWaits) -> None:
    research, release = first_call_waits.tool, first_call_waits.release

    ids = ["p", "q", "r", "s"]
    with Population(
        ids, output=Action, tools=[research], backend=FAST + "&tool_rounds=1&distinct_args=100", deadline=3.0
    ) as pop:
        results = pop.step({a: f"news for {a}" for a in ids})
        late = [a for a, r in results.items() if not r.ok]
        assert len(late) == 1, results
        miss = results[late[0]]
        assert miss.error is not None and miss.error.kind == "deadline"
        assert "deadline of 3.0 s" in miss.error.message
        assert all(r.ok for a, r in results.items() if a not in late)
        completion_on_time = sum(r.usage.completion_tokens for r in results.values())
        release.set()
        pop.drain()
        report = pop.report()
        assert (report.deadline_misses, report.late_answers) == (1, 1)
        # The late answer's tokens count, though its decision was discarded.
        assert report.completion_tokens > completion_on_time
        # No half-recorded tick: the late agent's history is as it was before the tick.
        assert pop.history(late[0]) == []
        # It steps on from there.
        again = pop.step({late[0]: "news again"})
        assert again[late[0]].ok
        assert contents(pop.history(late[0]))[0] == ("user", "news again")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    @tool
    def quote(symbol: str) -> str:
        """Look up a price."""
        return "7"

    backend = FAST + "&tool_rounds=1"
    path = tmp_path / "market.sqlite"
    pop = Population(
        ["a", "b"], system=SYSTEM, output=Action, tools=[quote], backend=backend, task="p={p}", deadline=30.0
    )
    pop.step({"a": {"p": 1}, "b": {"p": 2}})
    pop.step({"a": {"p": 3}})
    before = {a: pop.history(a) for a in ("a", "b")}
    pop.save(path)
    pop.close()

    with pytest.raises(SchemaError, match=r"tools \['quote'\] not given again"):
        Population.load(path, backend=backend)
    loaded = Population.load(path, tools=[quote], output=Action, backend=backend)
    assert loaded.ids == ["a", "b"] and loaded.ticks == 2
    assert {a: loaded.history(a) for a in ("a", "b")} == before
    results = loaded.step({"a": {"p": 5}, "b": {"p": 6}})
    assert all(r.ok and isinstance(r.output, Action) for r in results.values())
    assert loaded.ticks == 3
    assert loaded.history("a")[: len(before["a"])] == before["a"]
    assert contents(loaded.history("a"))[len(before["a"])] == ("user", "p=5")
    # Saved again over the same file, then loaded without an output type: decisions are dicts.
    loaded.save(path)
    loaded.close()
    plain = Population.load(path, tools=[quote], backend=backend)
    decision = plain.step({"b": {"p": 9}})["b"]
    assert decision.ok and set(decision.output) == {"move", "amount"}
    plain.close()

    with pytest.raises(JournalError, match="no such file"):
        Population.load(tmp_path / "absent.sqlite")


def test_without_compaction_a_conversation_over_max_context_tokens_is_not_sent() -> None:
    with Population(["a", "b"], backend=FAST, max_context_tokens=60, compaction=False) as pop:
        first = pop.step({"a": "short", "b": "x" * 400})
        assert first["a"].ok
        refused = first["b"]
        assert refused.error is not None and refused.error.kind == "context_length"
        assert "max_context_tokens=60" in refused.error.message
        assert pop.history("b") == []
        assert pop.report().model_calls == 1


def test_conversations_are_compacted_to_stay_under_max_context_tokens() -> None:
    ids = ["a", "b"]
    news = "The market moved on rumours of a merger between two large suppliers. " * 5
    with Population(
        ids, backend=FAST, max_context_tokens=400, compaction_model="sim-model", compaction_keep_turns=1
    ) as pop:
        for tick in range(8):
            results = pop.step({a: f"tick {tick}: {news}" for a in ids})
            assert all(r.ok for r in results.values()), results
        report = pop.report()
        assert report.compactions > 0
        for agent in ids:
            history = pop.history(agent)
            # The first observation (the task) stays; older ticks were summarised away.
            assert history[0]["content"].startswith("tick 0:")
            assert len(history) < 2 * 8
            assert history[-2]["content"].startswith("tick 7:")


def test_astep_runs_on_the_callers_loop() -> None:
    async def main() -> tuple[int, int]:
        pop = Population(["a", "b", "c"], output=Action, backend=FAST)
        try:
            one = await pop.astep({"a": "1", "b": "2", "c": "3"})
            two = await pop.astep({"a": "4"})
            return sum(r.ok for r in one.values()), sum(r.ok for r in two.values())
        finally:
            pop.close()

    assert asyncio.run(main()) == (3, 1)


@pytest.mark.parametrize("hints", [True, False])
def test_engine_hints_give_an_agent_on_its_answering_call_the_lower_priority_value(hints: bool) -> None:
    @tool
    def quote(symbol: str) -> str:
        """Look up a price."""
        return "7"

    ids = ["a", "b", "c"]
    with (
        sim.start(time_scale=0, seed=7, tool_rounds=1) as server,
        recording_proxy(server.url) as (backend, seen),
    ):
        with Population(
            ids, tools=[quote], backend=backend, model="sim-model", max_turns=8, engine_hints=hints
        ) as pop:
            assert all(r.ok for r in pop.step({a: f"news for {a}" for a in ids}).values())
    calls = [json.loads(body) for path, body in seen if path.endswith("/chat/completions")]
    # The agents' calls (the prefix warm-up has no tools): a first call and an answering call each.
    agent_calls = [c for c in calls if c.get("tools")]
    assert len(agent_calls) == 6, agent_calls
    if not hints:
        assert all("priority" not in c for c in agent_calls)
        return
    # vLLM serves lower values first: 8 turns left on the first call, 7 once the tool has answered.
    answering = [c["messages"][-1]["role"] == "tool" for c in agent_calls]
    assert sorted(c["priority"] for c, a in zip(agent_calls, answering, strict=True) if a) == [7, 7, 7]
    assert sorted(c["priority"] for c, a in zip(agent_calls, answering, strict=True) if not a) == [8, 8, 8]


def test_a_tick_goes_out_as_one_prompt_list_request_rendered_through_the_chat_template() -> None:
    ids = [f"a{i}" for i in range(5)]
    with (
        sim.start(time_scale=0, seed=7) as server,
        recording_proxy(server.url) as (backend, seen),
        Population(ids, system=SYSTEM, output=Action, backend=backend, model="Qwen2.5-7B-Instruct") as pop,
    ):
        first = pop.step({a: f"price {i}" for i, a in enumerate(ids)})
        second = pop.step({a: "price up" for a in ids[:3]})
        assert all(r.ok and isinstance(r.output, Action) for r in [*first.values(), *second.values()])
        # The history is the chat conversation, whatever the wire.
        assert [m["role"] for m in pop.history("a1")] == ["user", "assistant", "user", "assistant"]
        histories = {a: pop.history(a) for a in ids}
        report = pop.report()
    assert [p for p, _ in seen if p.endswith("/chat/completions")] == []
    lists = [json.loads(body)["prompt"] for path, body in seen if path.endswith("/v1/completions")]
    # The prefix warm-up alone, then one request per tick with every observed agent's prompt.
    assert [len(p) for p in lists] == [1, 5, 3], lists
    prompts = lists[1] + lists[2]
    assert all(p.startswith("<|im_start|>system\n" + SYSTEM) for p in prompts)
    assert all(p.endswith("<|im_start|>user\nprice up<|im_end|>\n<|im_start|>assistant\n") for p in lists[2])
    assert sorted(p.rsplit("<|im_start|>user\n", 1)[1] for p in lists[1]) == [
        f"price {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(5)
    ]
    # Each first decision is in the second tick's prompt, as the chat template writes it.
    for agent in ids[:3]:
        first_turn = histories[agent][:2]
        turn = (
            f"<|im_start|>user\n{first_turn[0]['content']}<|im_end|>\n"
            f"<|im_start|>assistant\n{first_turn[1]['content']}<|im_end|>"
        )
        assert sum(turn in p for p in lists[2]) == 1, turn
    # vLLM gives one usage for the request: each agent's share is estimated, and says so.
    assert all(r.usage.estimated and r.usage.prompt_tokens > 0 for r in first.values())
    assert report.cache_hit_rate > 0.5


def test_prompt_list_falls_back_to_chat_calls_or_is_refused_where_it_cannot_be_used() -> None:
    ids = ["a", "b"]

    @tool
    def quote(symbol: str) -> str:
        """Look up a price."""
        return "7"

    with (
        sim.start(time_scale=0, seed=7, tool_rounds=1) as server,
        recording_proxy(server.url) as (backend, seen),
    ):
        # Unknown chat template, engine hints asked for, or tools with a template that has no tool
        # format (Llama 3.0): chat calls.
        for settings in (
            {"model": "sim-model"},
            {"model": "qwen2.5-7b", "engine_hints": True},
            {"model": "sim-model", "chat_template": "llama3", "tools": [quote]},
        ):
            seen.clear()
            with Population(ids, backend=backend, **settings) as pop:  # type: ignore[arg-type]
                assert all(r.ok and not r.usage.estimated for r in pop.step({a: "go" for a in ids}).values())
            assert not [p for p, _ in seen if p.endswith("/v1/completions")], settings
            assert [p for p, _ in seen if p.endswith("/chat/completions")], settings
        # A template given by name; llama3 headers.
        seen.clear()
        with Population(ids, backend=backend, model="sim-model", chat_template="llama3") as pop:
            assert all(r.ok for r in pop.step({a: "go" for a in ids}).values())
        (prompts,) = [json.loads(body)["prompt"] for path, body in seen if path.endswith("/v1/completions")]
        header = "<|start_header_id|>{}<|end_header_id|>\n\n"
        llama3 = header.format("user") + "go<|eot_id|>" + header.format("assistant")
        assert prompts == [llama3, llama3]
    with (
        Population(ids, backend=FAST, model="sim-model", prompt_list=True) as pop,
        pytest.raises(SchemaError, match="no chat template is known"),
    ):
        pop.step({"a": "go"})
    with (
        Population(
            ids, backend=FAST, model="sim-model", chat_template="llama3", tools=[quote], prompt_list=True
        ) as pop,
        pytest.raises(SchemaError, match="has no tool format"),
    ):
        pop.step({"a": "go"})
    with sim.start(time_scale=0) as server:
        ollama = "ollama://" + server.url.removeprefix("http://")
        with Population(
            ids, backend=ollama, model="sim-model", chat_template="chatml", prompt_list=True
        ) as pop:
            with pytest.raises(SchemaError, match="does not take a list of prompts"):
                pop.step({"a": "go"})
    with pytest.raises(SchemaError, match="prompt_list"):
        Population(ids, backend=FAST, prompt_list="yes")


QWEN_TOOLS_HEADER = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
LLAMA31_SYSTEM = (
    "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)


@pytest.mark.parametrize("model", ["Qwen2.5-7B-Instruct", "Meta-Llama-3.1-8B-Instruct"])
def test_a_tool_using_tick_is_one_prompt_list_request_per_round(model: str) -> None:
    lock = threading.Lock()
    asked: list[str] = []
    # The four calls return together, so the agents' next calls arrive within one gather window
    # even on a loaded machine (the calls are distinct: four executions, checked below).
    together = threading.Barrier(4, timeout=30)

    @tool
    def quote(symbol: str) -> str:
        """Look up a price."""
        with lock:
            asked.append(symbol)
        together.wait()
        return f"{symbol}: 42"

    ids = [f"a{i}" for i in range(4)]
    with (
        sim.start(time_scale=0, seed=7, tool_rounds=1, distinct_args=100) as server,
        recording_proxy(server.url) as (backend, seen),
        Population(ids, system=SYSTEM, output=Action, tools=[quote], backend=backend, model=model) as pop,
    ):
        first = pop.step({a: f"price {i}" for i, a in enumerate(ids)})
        assert all(r.ok and r.tool_calls == 1 and r.turns == 2 for r in first.values()), first
        for agent in ids:
            history = pop.history(agent)
            assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
            assert history[1]["tool_calls"][0]["name"] == "quote"
            assert history[2]["content"].endswith(": 42")
        second = pop.step({a: "price up" for a in ids})
        assert all(r.ok and r.tool_calls == 0 and isinstance(r.output, Action) for r in second.values())
        histories = {a: pop.history(a) for a in ids}
    assert len(asked) == 4
    assert [p for p, _ in seen if p.endswith("/chat/completions")] == []
    lists = [json.loads(body)["prompt"] for path, body in seen if path.endswith("/v1/completions")]
    # The warm-up, then the tick's first calls, the calls after the tools, the second tick's.
    assert [len(p) for p in lists] == [1, 4, 4, 4], lists
    prompts = [p for batch in lists[1:] for p in batch]
    if model.startswith("Qwen"):
        # The system prompt and the tool block: one prefix, byte for byte, in every prompt.
        prefix = prompts[0].split("<|im_start|>user\n", 1)[0]
        assert prefix.startswith("<|im_start|>system\n" + SYSTEM) and QWEN_TOOLS_HEADER in prefix
        assert '\n<tools>\n{"type": "function", "function": {"name": "quote", ' in prefix
        call, result = (
            '<|im_start|>assistant\n<tool_call>\n{"name": "quote", "arguments": ',
            "<tool_response>\n",
        )
    else:
        prefix = prompts[0].split("price", 1)[0]
        assert prefix.startswith(LLAMA31_SYSTEM + SYSTEM.strip())
        assert "Given the following functions" in prefix and '    "type": "function",\n' in prefix
        call, result = (
            '<|end_header_id|>\n\n{"name": "quote", "parameters": ',
            "<|start_header_id|>ipython<|end_header_id|>\n\n",
        )
    assert all(p.startswith(prefix) for p in prompts)
    assert not any(call in p for p in lists[1])
    # After the tools: each agent's call and its result, as the template writes them.
    for agent in ids:
        symbol = json.loads(histories[agent][1]["tool_calls"][0]["arguments"])["symbol"]
        assert sum(call in p and f"{symbol}: 42" in p and result in p for p in lists[2]) >= 1, symbol
    assert all(call in p for p in lists[2] + lists[3])


def test_a_jinja_chat_template_renders_the_prompts(tmp_path: Path) -> None:
    chatml = (
        "{{ bos_token }}{% for m in messages %}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content.strip() + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = tmp_path / "tokenizer_config.json"
    config.write_text(
        json.dumps({"chat_template": chatml, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    )
    ids = ["a", "b"]
    observations = {"a": "price 1", "b": "price 2"}
    with sim.start(time_scale=0, seed=7) as server, recording_proxy(server.url) as (backend, seen):
        sent = []
        for template in ("chatml", str(config), chatml.replace("{{ bos_token }}", "")):
            seen.clear()
            with Population(
                ids, system=SYSTEM, output=Action, backend=backend, model="sim-model", chat_template=template
            ) as pop:
                assert all(r.ok for r in pop.step(observations).values())
            (prompts,) = [
                json.loads(b)["prompt"]
                for p, b in seen
                if p.endswith("/v1/completions") and b.count(b"price")
            ]
            sent.append(sorted(prompts))
        # The same prompts: the bos token the server's tokenizer adds is not written into them.
        assert sent[0] == sent[1] == sent[2]
        assert sent[0][0].startswith(f"<|im_start|>system\n{SYSTEM}")
        assert sent[0][0].endswith("<|im_end|>\n<|im_start|>user\nprice 1<|im_end|>\n<|im_start|>assistant\n")
        # A template that does not compile or render fails at the first tick, naming it, before any request.
        broken = tmp_path / "broken.jinja"
        broken.write_text("{% for m in messages %}{{ m.content }")
        raising = "{{ raise_exception('Conversation roles must alternate') }}"
        for template, words in (
            (str(broken), r"broken.jinja\) does not compile"),
            (raising, "roles must alternate"),
        ):
            seen.clear()
            with (
                Population(ids, backend=backend, model="sim-model", chat_template=template) as pop,
                pytest.raises(SchemaError, match=words),
            ):
                pop.step(observations)
            assert seen == []
        with (
            Population(ids, backend=backend, model="sim-model", chat_template="no-such-template") as pop,
            pytest.raises(SchemaError, match="not a built-in template"),
        ):
            pop.step(observations)


def test_deadline_on_the_prompt_list_path(first_call_waits: FirstCallWaits) -> None:
    research, release = first_call_waits.tool, first_call_waits.release

    ids = ["p", "q", "r", "s"]
    with (
        sim.start(time_scale=0, seed=7, tool_rounds=1, distinct_args=100) as server,
        recording_proxy(server.url) as (backend, seen),
        Population(
            ids,
            output=Action,
            tools=[research],
            backend=backend,
            model="qwen2.5-7b",
            deadline=3.0,
            prompt_list=True,
        ) as pop,
    ):
        results = pop.step({a: f"news for {a}" for a in ids})
        late = [a for a, r in results.items() if not r.ok]
        assert len(late) == 1, results
        miss = results[late[0]]
        assert miss.error is not None and miss.error.kind == "deadline"
        assert all(r.ok and r.tool_calls == 1 for a, r in results.items() if a not in late)
        completion_on_time = sum(r.usage.completion_tokens for r in results.values())
        release.set()
        pop.drain()
        report = pop.report()
        assert (report.deadline_misses, report.late_answers) == (1, 1)
        # The late answer's tokens count, though its decision was discarded.
        assert report.completion_tokens > completion_on_time
        # No half-recorded tick: the late agent's history is as it was before the tick.
        assert pop.history(late[0]) == []
        assert all(len(pop.history(a)) == 4 for a in ids if a not in late)
        again = pop.step({late[0]: "news again"})
        assert again[late[0]].ok
        assert contents(pop.history(late[0]))[0] == ("user", "news again")
    # Every model call went as a prompt list, the late agent's too.
    assert [p for p, _ in seen if p.endswith("/chat/completions")] == []
    assert sum(b.count(b"news for") for p, b in seen if p.endswith("/v1/completions")) >= 8
