"""MCP servers as tool sources: a real server written with the official SDK, started by the tests,
over stdio and Streamable HTTP; its tools run through the ToolPool in simulator runs."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from batchagent_rs import McpError, McpTools, Population, mcp_tools
from batchagent_rs.tools import Tool

SERVER = Path(__file__).parent / "fixtures" / "mcp" / "server.py"
SIM = "sim://?time_scale=0&seed=5&tool_rounds=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, str(SERVER), "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Ready when the port takes connections (or the server died: then say why).
        while True:
            if child.poll() is not None:
                raise RuntimeError(
                    f"the MCP server exited: {child.stderr.read().decode() if child.stderr else ''}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        child.terminate()
        child.wait(30)
        if child.stderr is not None:
            child.stderr.close()


@pytest.fixture(scope="module", params=["stdio", "http"])
def source(request: pytest.FixtureRequest, http_server: str) -> Iterator[McpTools]:
    if request.param == "stdio":
        tools = mcp_tools(f"{sys.executable} {SERVER} stdio")
    else:
        tools = mcp_tools(http_server, headers={"X-Trace": "batchagent-tests"})
    try:
        yield tools
    finally:
        tools.close()


def pick(source: McpTools, name: str, **options: Any) -> Tool:
    (found,) = [t for t in source if t.name == name]
    return dataclasses.replace(found, **options)


def _call(source: McpTools, name: str, **arguments: Any) -> str:
    import asyncio

    result: str = asyncio.run(pick(source, name).fn(**arguments))
    return result


def tool_messages(pop: Population, agent: str) -> list[tuple[dict[str, Any], str]]:
    """Each tool call of the agent's history with the result the model saw."""
    history = pop.history(agent)
    calls = {c["id"]: c for m in history if m["role"] == "assistant" for c in m.get("tool_calls", [])}
    return [(calls[m["tool_call_id"]], m["content"]) for m in history if m["role"] == "tool"]


def test_tools_are_listed_once_with_their_schemas_as_the_server_wrote_them(source: McpTools) -> None:
    assert [t.name for t in source] == ["lookup", "add", "count", "stall", "broken"]
    add = pick(source, "add")
    assert add.description == "Add two numbers."
    assert add.parameters["required"] == ["a", "b"]
    assert add.parameters["properties"]["a"]["type"] == "integer"
    # As the server wrote it: its own title stays, nothing is rewritten.
    assert add.parameters["title"] == "addArguments"
    assert add.arguments_model is None


def test_the_models_calls_reach_the_server_and_its_answers_reach_the_model(source: McpTools) -> None:
    ids = [f"m{i}" for i in range(4)]
    with Population(ids, tools=[pick(source, "add")], backend=SIM + "&distinct_args=100") as pop:
        results = pop.step({a: f"sum for {a}" for a in ids})
        assert all(r.ok and r.tool_calls == 1 for r in results.values()), results
        for agent in ids:
            ((call, answer),) = tool_messages(pop, agent)
            arguments = json.loads(call["arguments"])
            assert call["name"] == "add"
            assert answer == str(arguments["a"] + arguments["b"])


def test_calls_go_through_the_pool_cache_and_coalescing(source: McpTools) -> None:
    before = int(_call(source, "count", tool="lookup"))
    lookup = pick(source, "lookup", cache=True)
    ids = [f"c{i}" for i in range(8)]
    # One distinct argument set: every agent asks for the same lookup, in both ticks' first round.
    with Population(ids, tools=[lookup], backend=SIM + "&distinct_args=1") as pop:
        pop.step({a: "go" for a in ids})
        report = pop.report()
        raw = pop._driver.stats()["tools"] if pop._driver is not None else {}
    assert report.tool_calls == 8
    assert raw["executions"] == 1 and raw["coalesced"] + raw["cache_hits"] == 7, raw
    # The server ran it once for the eight calls.
    assert int(_call(source, "count", tool="lookup")) - before == 1


def test_a_timeout_and_a_server_error_are_tool_errors_the_model_sees(source: McpTools) -> None:
    for name, options, expected in [
        ("stall", {"timeout": 0.5}, "timed out"),
        ("broken", {}, "broken on purpose"),
    ]:
        with Population(["e"], tools=[pick(source, name, **options)], backend=SIM) as pop:
            result = pop.step({"e": "try"})["e"]
            assert result.ok and result.tool_calls == 1
            ((_, answer),) = tool_messages(pop, "e")
            assert answer.startswith("Error:") and expected in answer, answer
            assert pop.report().tool_calls == 1


def test_a_server_that_cannot_start_or_be_reached_fails_clearly() -> None:
    with pytest.raises(McpError, match=r"import sys; sys\.exit\(3\): cannot connect: .*Connection closed"):
        mcp_tools([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(McpError, match=r"http://127\.0\.0\.1:\d+/mcp"):
        mcp_tools(f"http://127.0.0.1:{free_port()}/mcp")
    with pytest.raises(ValueError, match="empty command"):
        mcp_tools("")
