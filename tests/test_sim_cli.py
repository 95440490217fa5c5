"""`batchagent sim serve` as a separate process answers the official SDKs."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import anthropic
import openai
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchagent_rs.cli", "sim", "serve", "--port", str(port), "--time-scale", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"127.0.0.1:{port}" in line, line
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


def test_served_simulator_answers_openai_and_anthropic(served: str) -> None:
    client = openai.OpenAI(base_url=served + "/v1", api_key="unused")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a word up.",
                "parameters": {
                    "type": "object",
                    "properties": {"word": {"type": "string"}},
                    "required": ["word"],
                },
            },
        }
    ]
    reply = client.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "define batching"}], tools=tools
    )
    calls = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].type == "function" and calls[0].function.name == "lookup"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0

    message = anthropic.Anthropic(base_url=served, api_key="unused").messages.create(
        model="sim-model", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.content and message.content[0].type == "text"
