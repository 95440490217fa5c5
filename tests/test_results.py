"""What a result and a report say must be true: how an answer ended (`finish_reason`, `truncated`),
context overflows as their own error kind, attempts as 1 + retries, one set of field names in
Python and in the JSONL output, counters that add up, the first request sent as soon as the first
lazy input is there, and failed jobs run again from a journal on request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from batchagent_rs import Batch, JournalError, Result, tool

FAST = "time_scale=0&seed=3"


class Summary(pydantic.BaseModel):
    summary: str


def inputs(n: int) -> list[dict[str, Any]]:
    return [{"x": f"item {i}"} for i in range(n)]


def test_a_structured_answer_cut_off_at_max_tokens_fails_unless_accepted() -> None:
    # 4 tokens cut every answer inside its JSON; the repair would close it (as an empty summary).
    strict = Batch("Summarise {x}.", output=Summary, backend=f"sim://?{FAST}", max_tokens=4)
    results = strict.run(inputs(10))
    for r in results:
        assert not r.ok and r.error is not None
        assert r.error.kind == "truncated" and not r.error.retryable, r.error
        assert "max_tokens=4" in r.error.message
        assert r.finish_reason == "length" and r.truncated
    report = strict.report()
    assert report.length_finishes == 10 and report.truncated_accepted == 0
    assert report.errors_by_kind == {"truncated": 10}
    assert "cut off at max_tokens" in report.table()

    lenient = Batch(
        "Summarise {x}.", output=Summary, backend=f"sim://?{FAST}", max_tokens=4, accept_truncated=True
    )
    results = lenient.run(inputs(10))
    assert all(r.ok and r.truncated and r.repaired and r.finish_reason == "length" for r in results)
    assert all(isinstance(r.output, Summary) for r in results)
    report = lenient.report()
    assert report.length_finishes == 10 and report.truncated_accepted == 10


def test_finish_reason_is_on_every_result() -> None:
    whole = Batch("Summarise {x}.", output=Summary, backend=f"sim://?{FAST}").run(inputs(5))
    assert all(r.ok and r.finish_reason == "stop" and not r.truncated for r in whole)
    # A text answer cut off stays ok (nothing was changed in it) but says it was cut off.
    cut = Batch("Say something about {x}.", backend=f"sim://?{FAST}", max_tokens=3).run(inputs(5))
    assert all(r.ok and r.finish_reason == "length" and r.truncated for r in cut)
    assert all(r.usage.completion_tokens == 3 for r in cut)


def test_a_prompt_longer_than_the_context_is_a_context_length_error() -> None:
    # The simulator answers as vLLM does for a request over --max-model-len.
    batch = Batch("Summarise {x}.", backend=f"sim://?{FAST}&max_model_len=64", max_tokens=16)
    long_input = {"x": " ".join(f"word{i}" for i in range(200))}
    results = batch.run([long_input, {"x": "short"}])
    failed, ok = results
    assert ok.ok, ok.error
    assert not failed.ok and failed.error is not None
    assert failed.error.kind == "context_length" and not failed.error.retryable, failed.error
    assert "tokens requested, 64 available" in failed.error.message, failed.error.message
    assert failed.attempts == 1
    report = batch.report()
    assert report.errors_by_kind == {"context_length": 1}
    assert report.model_calls == 2  # not retried


def test_attempts_are_one_plus_retries_not_turns() -> None:
    @tool(cache=False)
    def read(path: str) -> str:
        """Read."""
        return "text"

    clean = Batch("Review {x}.", tools=[read], backend=f"sim://?{FAST}&tool_rounds=2")
    results = clean.run(inputs(10))
    assert all(r.ok and r.turns == 3 and r.attempts == 1 for r in results), [
        (r.turns, r.attempts) for r in results
    ]
    faulty = Batch(
        "Review {x}.",
        tools=[read],
        backend=f"sim://?{FAST}&tool_rounds=2&fault_500=0.2",
        max_attempts=10,
    )
    results = faulty.run(inputs(40))
    assert all(r.ok for r in results)
    retries = faulty.report().retries
    assert retries > 0
    assert sum(r.attempts - 1 for r in results) == retries


def test_jsonl_output_and_python_results_use_the_same_names(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in inputs(4)))
    batch = Batch("Summarise {x}.", output=Summary, backend=f"sim://?{FAST}")
    batch.run_file(source, tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    python = Batch("Summarise {x}.", output=Summary, backend=f"sim://?{FAST}").run(inputs(4))
    names = set(python[0].to_dict())
    assert {"ttft", "total", "finish_reason", "truncated", "attempts", "turns"} <= names
    for line in lines:
        assert set(line) <= names, set(line) - names
        assert "ttft" in line and "total" in line and "finish_reason" in line
        assert not any(key.endswith("_s") for key in line)
    by_index = {line["index"]: line for line in lines}
    for r in python:
        line = by_index[r.index]
        assert line["finish_reason"] == r.finish_reason and line["attempts"] == r.attempts == 1
        assert line["output"] == r.to_dict()["output"]


def test_the_first_request_goes_out_before_the_second_input_is_read() -> None:
    first_result = threading.Event()

    def slow_inputs() -> Iterator[dict[str, Any]]:
        yield {"x": "first"}
        # Read on the event loop's thread, this would block the loop: the first request could
        # never be sent and no result would ever arrive.
        assert first_result.wait(timeout=30), "the second input was read before the first result"
        yield {"x": "second"}

    batch = Batch("Summarise {x}.", backend=f"sim://?{FAST}", on_result=lambda r: first_result.set())
    results = batch.run(slow_inputs())
    assert [r.ok for r in results] == [True, True], [r.error for r in results]


def test_a_lazy_input_that_raises_stops_the_run_with_its_error() -> None:
    def broken() -> Iterator[dict[str, Any]]:
        yield {"x": "one"}
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away"):
        Batch("Summarise {x}.", backend=f"sim://?{FAST}").run(broken())


def test_bad_items_of_a_lazy_input_become_failed_results() -> None:
    def mixed() -> Iterator[Any]:
        for i in range(600):
            yield {"x": i} if i % 7 else {"y": i}

    results = Batch("Summarise {x}.", backend=f"sim://?{FAST}").run(mixed())
    assert [r.index for r in results] == list(range(600))
    assert [r.ok for r in results] == [bool(i % 7) for i in range(600)]
    assert all(r.error.kind == "bad_input" for r in results if r.error is not None)


def test_a_panic_in_the_result_forwarder_gives_each_input_an_internal_result() -> None:
    seen: list[Result] = []
    batch = Batch("Summarise {x}.", backend=f"sim://?{FAST}", on_result=seen.append)
    # The core's fault hook: every batch of results panics on its way to Python.
    batch._options["_panic_forwarder"] = True
    with pytest.raises(JournalError, match="internal error: the result forwarder panicked"):
        batch.run(inputs(20))
    assert sorted(r.index for r in seen) == list(range(20)), "every input has a result, none is waited for"
    assert all(r.error is not None and r.error.kind == "internal" for r in seen), seen[:2]


def test_model_calls_in_flight_are_bounded_and_tool_waits_counted_apart() -> None:
    agents = 12
    seen: list[dict[str, Any]] = []
    arrived = 0
    everyone = asyncio.Event()

    @tool(cache=False)
    async def lookup(path: str) -> str:
        """Look up."""
        nonlocal arrived
        arrived += 1
        if arrived == agents:
            # Every agent now waits on this tool: none holds an inference slot.
            seen.append(batch.report().raw)
            everyone.set()
        # Each call waits for the others: a slot held across a tool wait would stop them arriving.
        await asyncio.wait_for(everyone.wait(), timeout=30)
        return "found"

    batch = Batch(
        "Review {x}.",
        tools=[lookup],
        # Seed 5 draws 12 distinct argument values: 12 executions, no coalescing.
        backend="sim://?time_scale=0&seed=5&tool_rounds=1&distinct_args=100000",
        max_inflight=4,
        stream=False,
    )
    results = batch.run(inputs(agents))
    assert all(r.ok for r in results), [r.error for r in results]
    report = batch.report()
    assert report.tool_executions == agents, "argument values repeated; the barrier needs distinct calls"
    (stats,) = seen
    from batchagent_rs.progress import Progress, counters

    c = counters(stats)
    assert c["in_flight"] == 0 and c["in_tools"] == agents, c
    line = Progress(None).line(stats)
    assert " in flight 0 " in line and f"in tools {agents}" in line, line


def test_tool_call_counts_add_up() -> None:
    @tool(cache=True)
    async def fetch(path: str) -> str:
        """Fetch."""
        await asyncio.sleep(0.05)
        return "body"

    batch = Batch("Review {x}.", tools=[fetch], backend=f"sim://?{FAST}&tool_rounds=2&distinct_args=3")
    batch.run(inputs(60))
    r = batch.report()
    assert r.tool_requests == 120
    # 3 argument values a round: each runs once; every other call shares a run in flight or its cached
    # result (which of the two depends on timing; their sum does not).
    assert r.tool_executions <= 3 * 2
    assert r.tool_coalesced + r.tool_cache_hits == 120 - r.tool_executions
    assert r.tool_requests == r.tool_executions + r.tool_coalesced + r.tool_cache_hits + r.tool_not_run
    assert r.tool_not_run == 0
    assert (
        f"{r.tool_requests} requested: {r.tool_executions} executed, {r.tool_coalesced} shared an identical "
        f"call in flight, {r.tool_cache_hits} from cache"
    ) in r.table()


def test_retry_failed_runs_only_the_failed_jobs_again(tmp_path: Path) -> None:
    journal = tmp_path / "run.sqlite"
    # At 8 tokens some answers are cut off (failed, kind truncated) and the others are whole.
    settings: dict[str, Any] = {"output": Summary, "backend": f"sim://?{FAST}", "max_tokens": 8}
    first = Batch("Summarise {x}.", journal=journal, **settings)
    results = first.run(inputs(20))
    failed = {r.index for r in results if not r.ok}
    assert failed and len(failed) < 20
    ok_before = {r.index: r.output for r in results if r.ok}

    # A plain resume keeps every result, failed ones included, and sends nothing.
    resumed = Batch("Summarise {x}.", journal=journal, **settings)
    again = resumed.run(inputs(20))
    assert [r.index for r in again] == list(range(20))
    assert {r.index for r in again if not r.ok} == failed
    assert resumed.report().model_calls == 0

    # Retrying the failed ones, now accepting cut-off answers: only they are sent again.
    retry = Batch("Summarise {x}.", journal=journal, accept_truncated=True, **settings)
    final = retry.run(inputs(20), retry_failed=True)
    assert [r.index for r in final] == list(range(20))
    assert all(r.ok for r in final), [r.error for r in final if not r.ok]
    assert retry.report().model_calls == len(failed)
    assert {r.index: r.output for r in final if r.index not in failed} == ok_before
    assert all(r.truncated for r in final if r.index in failed)


def test_retry_failed_needs_a_journal() -> None:
    with pytest.raises(ValueError, match="journal"):
        Batch("Summarise {x}.", backend=f"sim://?{FAST}").run(inputs(1), retry_failed=True)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")
    env.pop("BATCHAGENT_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_retry_failed_keeps_one_line_per_input(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("".join(f"Summarise item {i}.\n" for i in range(20)))
    (tmp_path / "schema.json").write_text(
        json.dumps({"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]})
    )
    common = ["prompts.txt", "-o", "out.jsonl", "--backend", f"sim://?{FAST}", "--schema", "schema.json"]
    common += ["--max-tokens", "8", "--no-cache", "--quiet"]
    first = run_cli(*common, "--report", "r1.json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    failed = {line["index"] for line in lines if not line["ok"]}
    assert failed and all(
        line["error"]["kind"] == "truncated" and line["truncated"] for line in lines if not line["ok"]
    )
    report = json.loads((tmp_path / "r1.json").read_text())
    assert report["length_finishes"] >= len(failed)
    assert report["errors_by_kind"] == {"truncated": len(failed)}

    resumed = run_cli(*common, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {line["index"] for line in lines if not line["ok"]} == failed

    retried = run_cli(*common, "--retry-failed", "--accept-truncated", "--report", "r2.json", cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(20))
    assert all(line["ok"] for line in lines), [line["error"] for line in lines if not line["ok"]]
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["model_calls"] == len(failed) and report["finished_earlier"] == 20 - len(failed)
    assert report["retried_failed"] is True


def test_cli_retry_failed_without_a_journal_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("hello\n")
    proc = run_cli("prompts.txt", "--backend", f"sim://?{FAST}", "--retry-failed", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--retry-failed: there is no journal" in proc.stderr


def test_without_a_schema_the_answer_is_the_output_and_text_stays_empty() -> None:
    # The core hands a schema-less answer over once, as the text, and says it is the output.
    [plain] = Batch("Say {x}.", backend=f"sim://?{FAST}").run(inputs(1))
    assert plain.ok and isinstance(plain.output, str) and plain.output
    assert plain.text is None and plain.to_dict()["text"] is None
    [structured] = Batch("Summarise {x}.", output=Summary, backend=f"sim://?{FAST}").run(inputs(1))
    assert structured.ok and isinstance(structured.output, Summary)
    assert structured.text is not None and json.loads(structured.text)["summary"] == structured.output.summary


def test_a_run_from_sync_code_never_formats_its_results() -> None:
    # `asyncio.run` formats the repr of its SIGINT handler, which reaches the main task's result:
    # with answers of megabytes that was two more copies of every one.
    from batchagent_rs import batch as batch_module

    formatted: list[int] = []

    class Answer:
        def __repr__(self) -> str:
            formatted.append(1)
            return "Answer()"

    async def make() -> list[Answer]:
        return [Answer()]

    [answer] = batch_module._blocking(make)
    assert isinstance(answer, Answer)
    assert formatted == []
