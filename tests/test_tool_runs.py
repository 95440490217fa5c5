"""A tool runs once per decision, and a tool's errors are counted and can fail the job."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import Batch, tool
from batchagent_rs.progress import Progress
from batchagent_rs.tools import ToolDefinitionError

# Two tool calls per turn; the first request of every body has its stream cut off just after the
# second call starts, when the first call is complete and has been started from the stream.
CUT = "time_scale=0&seed=3&tool_rounds=1&parallel_tool_calls=2&distinct_args=1000&fault_cut_after_call=1"


def counting(calls: Counter[str], **options: Any) -> Any:
    lock = threading.Lock()

    @tool(**options)
    def send(path: str) -> str:
        """Send a file somewhere."""
        with lock:
            calls[path] += 1
        return f"sent {path}"

    return send


def inputs(n: int) -> list[dict[str, Any]]:
    return [{"path": f"src/file_{i}.py"} for i in range(n)]


@pytest.mark.parametrize("options", [{}, {"inline": False}])
def test_a_retried_turn_reuses_the_call_started_from_the_broken_stream(options: dict[str, Any]) -> None:
    calls: Counter[str] = Counter()
    n = 12
    batch = Batch(
        "Review {path}.", tools=[counting(calls, **options)], backend=f"sim://?{CUT}", max_attempts=3
    )
    results = batch.run(inputs(n))
    assert all(r.ok and r.tool_calls == 2 for r in results), [r.error for r in results if not r.ok]
    report = batch.report()
    # Every job's first model call broke after its first tool call had started, and was retried.
    assert report.retries == n
    assert report.tools_started_early >= n
    # Yet every call the model asked for ran once: each was asked of the pool once, and ran
    # unless it shared the execution of an identical call from another job then in flight.
    assert report.tool_requests == 2 * n
    assert sum(calls.values()) == report.tool_executions == 2 * n - report.raw["tools"]["coalesced"]


def test_a_tool_with_side_effects_never_starts_from_the_stream() -> None:
    calls: Counter[str] = Counter()
    n = 12
    batch = Batch(
        "Review {path}.", tools=[counting(calls, side_effects=True)], backend=f"sim://?{CUT}", max_attempts=3
    )
    results = batch.run(inputs(n))
    assert all(r.ok and r.tool_calls == 2 for r in results), [r.error for r in results if not r.ok]
    report = batch.report()
    assert report.retries == n
    assert report.tools_started_early == 0
    # Never merged with another call either: one execution per call the model made.
    assert report.tool_requests == 2 * n == sum(calls.values())


def test_identical_calls_of_a_tool_with_side_effects_each_run() -> None:
    calls: Counter[str] = Counter()
    n = 20
    batch = Batch(
        "Review {path}.",
        tools=[counting(calls, side_effects=True)],
        # One distinct argument value: every agent asks for the very same call.
        backend="sim://?time_scale=0&seed=3&tool_rounds=1&distinct_args=1",
        max_inflight=20,
    )
    results = batch.run(inputs(n))
    assert all(r.ok for r in results)
    assert sum(calls.values()) == n
    assert batch.report().tool_executions == n


def failing(on_error: str) -> Any:
    @tool(on_error=on_error)  # type: ignore[call-overload]
    def lookup(path: str) -> str:
        """Look a path up."""
        raise ValueError(f"no such path {path}")

    return lookup


def test_a_tool_that_raises_is_counted_and_its_error_goes_to_the_model() -> None:
    batch = Batch(
        "Review {path}.", tools=[failing("report")], backend="sim://?time_scale=0&seed=3&tool_rounds=2"
    )
    results = batch.run(inputs(6))
    # The model saw the error text and answered anyway.
    assert all(r.ok and r.tool_calls == 2 for r in results)
    report = batch.report()
    assert report.tool_errors == {"lookup": report.tool_executions}
    assert report.tool_executions > 0
    assert "tool errors" in report.table() and "lookup" in report.table()
    assert report.to_dict()["tool_errors"] == report.tool_errors


def test_on_error_raise_fails_the_job_naming_the_tool_and_the_exception() -> None:
    batch = Batch(
        "Review {path}.", tools=[failing("raise")], backend="sim://?time_scale=0&seed=3&tool_rounds=2"
    )
    results = batch.run(inputs(5))
    assert not any(r.ok for r in results)
    for r in results:
        assert r.error is not None
        assert r.error.kind == "tool"
        assert "lookup" in r.error.message and "ValueError: no such path" in r.error.message
        assert not r.error.retryable
        # The job stopped at the first failing call: no second tool turn.
        assert r.tool_calls == 1
    report = batch.report()
    assert report.errors_by_kind == {"tool": 5}
    assert report.tool_errors["lookup"] >= 1


def test_tool_options_are_checked() -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(ToolDefinitionError, match="on_error"):
        tool(on_error="ignore")(f)  # type: ignore[call-overload]
    with pytest.raises(ToolDefinitionError, match="side effects"):
        tool(side_effects=True, cache=True)(f)


def test_tool_errors_reach_the_progress_line_and_the_cli_report(tmp_path: Path) -> None:
    batch = Batch(
        "Review {path}.", tools=[failing("report")], backend="sim://?time_scale=0&seed=3&tool_rounds=1"
    )
    batch.run(inputs(3))
    report = batch.report()
    line = Progress(3, stream=io.StringIO()).line(report.raw)
    # Every execution raised (identical calls in flight at once share one execution).
    assert report.tool_executions >= 1
    assert f"tool errors {report.tool_executions}" in line

    (tmp_path / "defs.py").write_text(
        "from batchagent_rs import tool\n"
        "@tool\n"
        "def lookup(path: str) -> str:\n"
        '    """Look a path up."""\n'
        "    raise KeyError(path)\n"
    )
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs(4)))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / ".cache"))
    env.pop("BATCHAGENT_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", "--input", "in.jsonl", "-o", "out.jsonl",
         "--task", "Review {path}.", "--tools", "defs:lookup", "--no-cache",
         "--backend", "sim://?time_scale=0&seed=3&tool_rounds=1", "--report", "r.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cli_report = json.loads((tmp_path / "r.json").read_text())
    assert cli_report["tool_executions"] >= 1
    assert cli_report["tool_errors"] == {"lookup": cli_report["tool_executions"]}
    assert "tool errors" in proc.stdout
