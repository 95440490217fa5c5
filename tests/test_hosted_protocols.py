"""The hosted protocols reached the ways people already configure them: the Anthropic and OpenAI
protocols over plain http (`anthropic+http://`, `openai+http://`), the SDKs' base-URL variables,
and servers that require a key on every route."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from batchagent_rs import Batch, tool
from batchagent_rs import sim as simulator

KEY = "sk-ant-conventions-7f3a9c"


class Review(pydantic.BaseModel):
    bugs: list[str]
    severity: int


def address(server: simulator.Simulator) -> str:
    return server.url.removeprefix("http://")


def routes(server: simulator.Simulator) -> dict[str, Any]:
    return dict(server.stats()["routes"])


def reader(calls: list[str]) -> Any:
    @tool(cache=False)
    def read_file(path: str) -> str:
        """Read a file."""
        calls.append(path)
        return f"contents of {path}"

    return read_file


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_protocol_runs_end_to_end_with_tools_and_structured_output(stream: bool) -> None:
    calls: list[str] = []
    with simulator.start(time_scale=0, seed=3, tool_rounds=2, model="claude-sim", api_key=KEY) as server:
        batch = Batch(
            "Review {path} for bugs.",
            system="You are a careful reviewer.",
            tools=[reader(calls)],
            output=Review,
            model="claude-sim",
            backend=f"anthropic+http://{address(server)}",
            api_key=KEY,
            stream=stream,
            max_inflight=8,
            max_turns=4,
        )
        results = batch.run([{"path": f"src/f{i}.py"} for i in range(12)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert all(isinstance(r.output, Review) for r in results)
        assert all(r.turns == 3 and r.tool_calls == 2 for r in results)
        report = batch.report()
        assert report.tool_requests == 24 and len(calls) == report.tool_executions
        # Streamed calls time their first token; a single JSON body has none.
        assert all((r.ttft is not None) == stream for r in results)
        seen = routes(server)
        assert seen["/v1/messages"]["by_status"] == {"200": 36}
        assert "/v1/chat/completions" not in seen
        assert report.raw["backend"].startswith("anthropic http://127.0.0.1:")


def test_sdk_base_url_and_key_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        for backend, route in (("anthropic://", "/v1/messages"), ("openai://", "/v1/chat/completions")):
            results = Batch("Say {n}.", backend=backend, max_turns=1).run([{"n": i} for i in range(5)])
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            assert routes(server)[route]["by_status"] == {"200": 5}


def test_openai_protocol_over_plain_http_sends_the_key() -> None:
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        backend = f"openai+http://{address(server)}/v1"
        results = Batch("Say {n}.", backend=backend, api_key=KEY, max_turns=1).run([{"n": 1}])
        assert results[0].ok, results[0].error
        wrong = Batch("Say {n}.", backend=backend, api_key="sk-wrong", max_turns=1).run([{"n": 1}])
        assert wrong[0].error is not None and wrong[0].error.kind == "auth"
