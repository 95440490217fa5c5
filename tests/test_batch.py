"""End-to-end tests of the Batch API against the embedded simulator."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pydantic
import pytest

import batchagent_rs.batch as batch_module
from batchagent_rs import Batch, BatchAgent, InputError, Result, SchemaError, tool
from batchagent_rs.tools import ToolDefinitionError

FAST = "time_scale=0&seed=3"


class Review(pydantic.BaseModel):
    bugs: list[str]
    severity: int


def make_reader(calls: list[str] | None = None, delay: float = 0.0) -> Any:
    @tool(cache=False)
    async def read_file(path: str) -> str:
        """Read a file."""
        if calls is not None:
            calls.append(path)
        if delay:
            await asyncio.sleep(delay)
        return f"contents of {path}"

    return read_file


def inputs(n: int) -> list[dict[str, Any]]:
    return [{"path": f"src/file_{i}.py"} for i in range(n)]


def test_multi_turn_tool_agents_return_pydantic_outputs() -> None:
    calls: list[str] = []
    batch = Batch(
        "Review {path} for bugs.",
        system="You are a careful reviewer.",
        tools=[make_reader(calls)],
        output=Review,
        backend=f"sim://?{FAST}&tool_rounds=2",
        max_inflight=8,
        max_turns=4,
    )
    results = batch.run(inputs(20))
    assert [r.index for r in results] == list(range(20))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(isinstance(r.output, Review) for r in results)
    assert all(r.turns == 3 and r.tool_calls == 2 for r in results)
    assert all(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 for r in results)
    report = batch.report()
    assert report.ok == 20 and report.failed == 0
    assert report.tool_requests == 40
    assert len(calls) == report.tool_executions


def test_identical_tool_calls_coalesce_while_in_flight() -> None:
    calls: list[str] = []
    batch = Batch(
        "Review {path}.",
        tools=[make_reader(calls, delay=0.3)],
        backend=f"sim://?{FAST}&tool_rounds=1&distinct_args=4",
        max_inflight=64,
    )
    results = batch.run(inputs(60))
    assert all(r.ok for r in results)
    # 60 agents reach the tool within the same 300 ms; 4 distinct argument values -> at most 4 runs.
    assert 1 <= len(calls) <= 4
    assert len(set(calls)) == len(calls)
    assert batch.report().tool_requests == 60


def test_inference_slot_is_released_during_tool_waits() -> None:
    # With max_inflight=1, if a slot were held while a tool runs, only one agent could ever be
    # inside the tool and the barrier below would never open.
    n = 4
    barrier = threading.Barrier(n, timeout=20)

    @tool
    def wait_for_everyone(path: str) -> str:
        """Wait until every agent is here."""
        barrier.wait()
        return "ok"

    batch = Batch(
        "Review {path}.",
        tools=[wait_for_everyone],
        backend=f"sim://?{FAST}&tool_rounds=1&distinct_args=1000",
        max_inflight=1,
    )
    results = batch.run(inputs(n))
    assert all(r.ok for r in results), [r.error for r in results]


def test_faults_every_job_ends_with_a_result() -> None:
    batch = Batch(
        "Review {path}.",
        tools=[make_reader()],
        output=Review,
        backend=f"sim://?{FAST}&tool_rounds=1&fault_429=0.15&retry_after=0&fault_500=0.1&fault_503=0.05&fault_reset=0.1",
        max_inflight=16,
        max_attempts=3,
    )
    results = batch.run(inputs(150))
    assert sorted(r.index for r in results) == list(range(150))
    failed = [r for r in results if not r.ok]
    for r in failed:
        assert r.error is not None and r.error.retryable and r.error.attempts >= 3, r.error
    report = batch.report()
    assert report.retries > 0
    assert report.ok + report.failed == 150


def test_bad_json_answers_are_repaired_or_retried() -> None:
    batch = Batch(
        "Review {path}.",
        output=Review,
        backend=f"sim://?{FAST}&invalid_json_rate=0.2&prose_json_rate=0.3&fenced_json_rate=0.2&truncated_json_rate=0.05",
        validation_retries=8,
    )
    results = batch.run(inputs(80))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(isinstance(r.output, Review) for r in results)
    assert batch.report().validation_retries > 0


def test_truncated_json_answers_are_repaired() -> None:
    # The simulator cuts such answers just before their closing brackets, as a model that ran out
    # of tokens on the last value does: the repair closes them without another model call.
    batch = Batch("Review {path}.", output=Review, backend=f"sim://?{FAST}&truncated_json_rate=1")
    results = batch.run(inputs(20))
    assert all(r.ok and r.repaired for r in results), [r.error for r in results if not r.ok]
    assert batch.report().model_calls == 20


def test_custom_pydantic_validator_failures_are_fed_back() -> None:
    seen: list[int] = []

    class Strict(pydantic.BaseModel):
        bugs: list[str]
        severity: int

        @pydantic.field_validator("severity")
        @classmethod
        def odd_only(cls, v: int) -> int:
            seen.append(v)
            if v % 2 == 0:
                raise ValueError("severity must be odd")
            return v

    batch = Batch("Review {path}.", output=Strict, backend=f"sim://?{FAST}", validation_retries=8)
    results = batch.run(inputs(30))
    for r in results:
        if r.ok:
            assert r.output.severity % 2 == 1
        else:
            assert r.error is not None and r.error.kind == "validation"
            assert "severity must be odd" in r.error.message
    assert any(v % 2 == 0 for v in seen), "the simulator never produced an even severity"
    assert batch.report().validation_retries > 0


def test_on_result_raising_does_not_stop_the_run(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []

    def callback(r: Result) -> None:
        seen.append(r.index)
        if r.index % 3 == 0:
            raise RuntimeError("callback failed")

    with caplog.at_level(logging.ERROR, logger="batchagent"):
        results = Batch("Say hi to {path}.", backend=f"sim://?{FAST}", on_result=callback).run(inputs(12))
    assert len(results) == 12 and all(r.ok for r in results)
    assert sorted(seen) == list(range(12))
    assert sum("callback failed" in rec.exc_text for rec in caplog.records if rec.exc_text) == 4


def test_async_on_result_and_stream_in_completion_order() -> None:
    got: list[int] = []

    async def callback(r: Result) -> None:
        await asyncio.sleep(0)
        got.append(r.index)

    async def main() -> list[Result]:
        batch = Batch("Say hi to {path}.", backend=f"sim://?{FAST}", on_result=callback)
        return [r async for r in batch.stream(iter(inputs(10)))]

    results = asyncio.run(main())
    assert sorted(r.index for r in results) == list(range(10))


def test_missing_template_variable_fails_before_any_request() -> None:
    from batchagent_rs import sim

    with sim.start(time_scale=0) as server:
        batch = Batch(
            "Review {path} at {commit}.",
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
        )
        with pytest.raises(InputError, match=r"input 1: template variable 'commit' is missing"):
            batch.run([{"path": "a", "commit": "x"}, {"path": "b"}])
        assert server.stats()["requests"]["total"] == 0


def test_invalid_tool_signature_names_the_parameter() -> None:
    with pytest.raises(ToolDefinitionError, match="parameter 'path' needs a type annotation"):

        @tool
        def bad(path):  # type: ignore[no-untyped-def]
            return path


def test_invalid_output_schema_names_the_problem() -> None:
    with pytest.raises(SchemaError, match="output schema"):
        Batch("t {x}", output={"type": "object", "required": "x"}, backend=f"sim://?{FAST}")


def test_ids_from_inputs_and_one_call_form() -> None:
    results = BatchAgent.run(
        task="Say hi to {name}.",
        inputs=[{"id": f"user-{i}", "name": str(i)} for i in range(5)],
        backend=f"sim://?{FAST}",
    )
    assert [r.id for r in results] == [f"user-{i}" for i in range(5)]
    assert all(isinstance(r.output, str) and r.output for r in results)


def test_cancelling_a_stream_cancels_the_run() -> None:
    async def main() -> int:
        batch = Batch(
            "Review {path}.",
            tools=[make_reader(delay=0.05)],
            backend="sim://?time_scale=0.05&tool_rounds=2",
            max_inflight=4,
        )
        got = 0
        async for _ in batch.stream(inputs(200)):
            got += 1
            if got == 5:
                break
        return got

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 5


def test_ctrl_c_stops_a_run_cleanly(tmp_path: Any) -> None:
    import signal
    import subprocess
    import sys

    # The tool announces its first call and never returns: the run cannot end on its own, so the
    # exit status is the interrupt's, whatever the machine's speed.
    script = tmp_path / "run.py"
    script.write_text(
        "import asyncio, faulthandler, signal, sys\n"
        # A test runner started in the background (`cmd &`, nohup, some CI agents) passes SIGINT on
        # ignored, and Python then installs no Ctrl-C handler: give the run what a terminal gives it.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        # Should the interrupt ever be lost, every thread's stack goes to stderr (the failure shows it).
        "faulthandler.dump_traceback_later(45, exit=True)\n"
        "from batchagent_rs import Batch, tool\n"
        "announced = False\n"
        "@tool\n"
        "async def slow(path: str) -> str:\n"
        "    global announced\n"
        "    if not announced:\n"
        "        announced = True\n"
        "        print('in tool', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "    return 'x'\n"
        "b = Batch('Review {path}.', tools=[slow], backend='sim://?time_scale=0.05&tool_rounds=3',"
        f" journal={str(tmp_path / 'j.sqlite')!r})\n"
        "try:\n"
        "    b.run([{'path': str(i)} for i in range(500)])\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "in tool"
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in out
    # The journal is intact: it opens and holds the first turns written before the interrupt.
    import sqlite3

    con = sqlite3.connect(tmp_path / "j.sqlite")
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_parquet_input_is_read_lazily_into_the_output(tmp_path: Any) -> None:
    import json

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"row-{i}" for i in range(300)], "path": [f"f{i}.py" for i in range(300)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50)
    report = Batch("Review {path}.", backend=f"sim://?{FAST}").run_file(
        tmp_path / "in.parquet", tmp_path / "out.jsonl"
    )
    assert report.ok == 300
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(f"row-{i}" for i in range(300))


def test_parquet_duplicates_and_refused_rows_are_written_to_the_output(tmp_path: Any) -> None:
    import json

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    ids = ["a", "b", "a", "bad\nid", "b", "c"]
    table = pa.table({"id": ids, "path": [f"f{i}.py" for i in range(len(ids))]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    batch = Batch("Review {path}.", backend=f"sim://?{FAST}", dedupe=True)
    report = batch.run_file(tmp_path / "in.parquet", tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    kinds = {r["index"]: r["error"]["kind"] if r.get("error") else "ok" for r in lines}
    assert len(lines) == len(ids), "one line per row"
    assert kinds == {0: "ok", 1: "ok", 2: "duplicate", 3: "bad_input", 4: "duplicate", 5: "ok"}
    assert "id of input 0" in next(r["error"]["message"] for r in lines if r["index"] == 2)
    assert report.ok == 3
    assert report.raw["run"]["duplicates_skipped"] == 2


def _thread_recording_tool(threads: list[str], delay: float = 0.0, **options: Any) -> Any:
    @tool(**options)
    def read_file(path: str) -> str:
        """Read a file."""
        threads.append(threading.current_thread().name)
        if delay:
            time.sleep(delay)
        return f"contents of {path}"

    return read_file


def _run_with(reader: Any, n: int, window: int | None = None) -> list[Result]:
    batch = Batch(
        "Review {path} for bugs.",
        tools=[reader],
        output=Review,
        backend=f"sim://?{FAST}&tool_rounds=1",
        max_inflight=4,
        window=window,
    )
    results = batch.run(inputs(n))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return results


def test_fast_sync_tools_move_inline_and_slow_ones_stay_in_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    main = threading.current_thread().name
    fast: list[str] = []
    # On a loaded machine a trivial call can be preempted past 50 us; what is tested here is the move,
    # not the threshold, so any call under a second counts as fast for this part.
    with monkeypatch.context() as m:
        m.setattr(batch_module, "_INLINE_TOOL_SECONDS", 1.0)
        # One agent at a time: each call is timed before the next one is dispatched, so the move
        # happens after the eighth call whatever the machine's load.
        _run_with(_thread_recording_tool(fast), 60, window=1)
    # Timed in the pool first; once measured fast they run on the loop's thread.
    assert fast[0] != main and fast[-1] == main, fast
    slow: list[str] = []
    _run_with(_thread_recording_tool(slow, delay=0.002), 30)
    assert main not in slow
    pinned: list[str] = []
    _run_with(_thread_recording_tool(pinned, inline=False), 30)
    assert main not in pinned
    forced: list[str] = []
    _run_with(_thread_recording_tool(forced, inline=True), 10)
    assert set(forced) == {main}


def test_inline_is_refused_for_async_tools() -> None:
    with pytest.raises(ToolDefinitionError, match="inline"):

        @tool(inline=True)
        async def probe(x: int) -> int:
            """Probe."""
            return x


def test_an_inline_tool_that_turns_slow_goes_back_to_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    main = threading.current_thread().name
    threads: list[str] = []
    # Any call under a second moves inline (a trivial call can exceed 50 us on a loaded machine); the
    # tool turns slow, past the 2 ms inline limit, the moment it first runs on the loop's thread.
    monkeypatch.setattr(batch_module, "_INLINE_TOOL_SECONDS", 1.0)

    @tool
    def read_file(path: str) -> str:
        """Read a file."""
        name = threading.current_thread().name
        threads.append(name)
        if name == main:
            time.sleep(0.005)
        return path

    _run_with(read_file, 60, window=1)
    # It moved inline once, was slow there, and every later call went back to the pool.
    assert threads.count(main) == 1, threads
    assert threads[-1] != main, threads


def test_worker_threads_setting_is_checked() -> None:
    code = "from batchagent_rs import Batch; Batch('Say {a}.', backend='sim://?time_scale=0').run([{'a': 1}])"
    env = {**os.environ, "BATCHAGENT_WORKER_THREADS": "many"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "BATCHAGENT_WORKER_THREADS" in done.stderr and "not a positive number" in done.stderr
    env["BATCHAGENT_WORKER_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
