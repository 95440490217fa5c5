"""Request options people pass today: `extra_body` (a dict, or a function of the input) merged into
every request body, and `extra_headers` sent with every request, against the simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import Batch, InputError, SchemaError, tool
from batchagent_rs import sim as simulator

KEY = "sk-gateway-5d1e0b7a"


def lookup() -> Any:
    @tool(cache=False)
    def lookup(query: str) -> str:
        """Look something up."""
        return f"about {query}"

    return lookup


def test_a_function_of_the_input_scripts_agents_of_1_4_and_7_turns() -> None:
    rounds = {"short": 0, "medium": 3, "long": 6}
    batch = Batch(
        "Research {topic}.",
        tools=[lookup()],
        backend="sim://?time_scale=0&seed=5&tool_rounds=1",
        max_turns=10,
        extra_body=lambda item: {"sim": {"tool_rounds": rounds[item["kind"]]}},
    )
    inputs = [{"topic": f"t{i}", "kind": kind} for i, kind in enumerate(["short", "medium", "long"] * 4)]
    results = batch.run(inputs)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.turns for r in results] == [rounds[x["kind"]] + 1 for x in inputs]
    assert [r.tool_calls for r in results] == [rounds[x["kind"]] for x in inputs]


@pytest.mark.parametrize("protocol", ["openai+http", "anthropic+http", "ollama"])
def test_a_dict_reaches_every_protocol_the_simulator_speaks(protocol: str) -> None:
    with simulator.start(time_scale=0, seed=2, tool_rounds=1, model="sim-model", api_key=KEY) as server:
        host = server.url.removeprefix("http://")
        backend = {
            "openai+http": f"openai+http://{host}/v1",
            "anthropic+http": f"anthropic+http://{host}",
            "ollama": f"ollama://{host}",
        }[protocol]
        batch = Batch(
            "Research {topic}.",
            tools=[lookup()],
            model="sim-model",
            backend=backend,
            api_key=KEY,
            max_turns=8,
            extra_body={"sim": {"tool_rounds": 4}},
        )
        results = batch.run([{"topic": f"t{i}"} for i in range(3)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert all(r.turns == 5 and r.tool_calls == 4 for r in results)


def test_the_inputs_own_fields_win_over_the_batchs_and_over_built_fields() -> None:
    batch = Batch(
        "Say {n}.",
        backend="sim://?time_scale=0&seed=1&output_tokens=fixed:40",
        max_tokens=200,
        # `max_tokens` in the body replaces the one built from `max_tokens=`: the answer is cut.
        extra_body={"max_tokens": 3},
    )
    results = batch.run([{"n": i} for i in range(3)])
    assert all(r.ok and r.finish_reason == "length" and r.truncated for r in results), results

    def per_input(item: dict[str, Any]) -> dict[str, Any]:
        return {"sim": {"tool_rounds": item["rounds"]}}

    batch = Batch(
        "Research {topic}.",
        tools=[lookup()],
        backend="sim://?time_scale=0&seed=1",
        max_turns=8,
        extra_body=per_input,
    )
    results = batch.run([{"topic": "a", "rounds": 2}, {"topic": "b", "rounds": 0}])
    assert [r.turns for r in results] == [3, 1]


def test_a_bad_extra_body_is_refused_naming_the_input() -> None:
    def broken(item: dict[str, Any]) -> Any:
        if item["n"] == 2:
            raise KeyError("rounds")
        return {"sim": {}} if item["n"] != 1 else ["not", "a", "dict"]

    batch = Batch("Say {n}.", backend="sim://?time_scale=0", extra_body=broken)
    with pytest.raises(InputError, match=r"input 1: extra_body returned list, not a dict"):
        batch.run([{"n": i} for i in range(3)])
    # A lazy input: the bad one becomes a failed result, the others run.
    results = batch.run({"n": n} for n in (0, 2, 3))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None and "extra_body raised KeyError" in results[1].error.message
    with pytest.raises(TypeError, match="extra_body: expected a dict or a function"):
        Batch("Say {n}.", backend="sim://", extra_body=["top_k", 3])  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match="extra_body: cannot be encoded as JSON"):
        Batch("Say {n}.", backend="sim://", extra_body={"x": object()})


def test_extra_headers_reach_the_model_calls_and_the_checks() -> None:
    # A gateway that takes its key in a header of its own; here the simulator's own key check.
    with simulator.start(time_scale=0, seed=1, api_key=KEY) as server:
        backend = f"openai+http://{server.url.removeprefix('http://')}/v1"
        batch = Batch(
            "Say {n}.",
            model="sim-model",
            backend=backend,
            api_key="",
            max_turns=1,
            extra_headers={"Authorization": f"Bearer {KEY}", "X-Team": "evals"},
        )
        results = batch.run([{"n": i} for i in range(4)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert server.stats()["routes"]["/v1/chat/completions"]["by_status"] == {"200": 4}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Key": f"{KEY}\r\nX-Injected: 1"}, "the value of X-Key contains a control character"),
        ({"Bad Name": "v"}, "is not a valid HTTP header name"),
        ({"Content-Length": "5"}, "Content-Length is set by the client"),
    ],
)
def test_bad_headers_are_refused_before_any_request_without_their_value(
    headers: dict[str, str], message: str
) -> None:
    with pytest.raises(SchemaError, match=message) as raised:
        Batch("Say {n}.", backend="sim://", extra_headers=headers)
    assert KEY not in str(raised.value)


def test_the_cli_and_run_files_take_extra_body_and_headers(tmp_path: Path) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    cli = [sys.executable, "-m", "batchagent_rs.cli", "run", "--quiet", "--no-cache"]
    done = subprocess.run(
        [
            *cli,
            str(inputs),
            "-o",
            str(out),
            "--backend",
            "sim://?time_scale=0&output_tokens=fixed:30",
            "--extra-body",
            '{"max_tokens": 2}',
            "-H",
            "X-Team: evals",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["finish_reason"] for r in rows] == ["length"] * 3
    run_file = tmp_path / "job.toml"
    run_file.write_text(
        f'input = "{inputs.name}"\noutput = "out2.jsonl"\nbackend = "sim://?time_scale=0&output_tokens=fixed:30"\n'
        'quiet = true\nno_cache = true\n[extra_body]\nmax_tokens = 2\n[extra_headers]\nX-Team = "evals"\n'
    )
    done = subprocess.run([*cli[:3], "run", str(run_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out2.jsonl").read_text().splitlines()]
    assert [r["finish_reason"] for r in rows] == ["length"] * 3
    bad = subprocess.run(
        [*cli, str(inputs), "--backend", "sim://", "-H", f"X-Key: {KEY}\x7f"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "X-Key" in bad.stderr and KEY not in bad.stderr
