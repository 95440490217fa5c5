"""One `Batch` run again and run twice at once: each run owns its own state."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from batchagent_rs import Batch, tool

FAST = "time_scale=0&seed=3"


def counting_reader(calls: list[str]) -> Any:
    # A sync tool: its answers travel through the thread pool and the run's completion queue.
    lock = threading.Lock()

    @tool(inline=False)
    def read_file(path: str) -> str:
        """Read a file."""
        with lock:
            calls.append(path)
        return f"contents of {path}"

    return read_file


def inputs(n: int, prefix: str = "src") -> list[dict[str, Any]]:
    return [{"path": f"{prefix}/file_{i}.py"} for i in range(n)]


def tool_batch(calls: list[str]) -> Batch:
    return Batch(
        "Review {path}.",
        tools=[counting_reader(calls)],
        backend=f"sim://?{FAST}&tool_rounds=2",
        max_inflight=4,
    )


def test_a_stream_left_early_then_a_new_run_on_the_same_batch() -> None:
    calls: list[str] = []
    batch = tool_batch(calls)

    async def main() -> tuple[int, list[Any]]:
        got = 0
        stream = batch.stream(inputs(200, "first"))
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        # The first run's cleanup must not touch the second run.
        second = await batch.arun(inputs(30, "second"))
        return got, second

    got, second = asyncio.run(asyncio.wait_for(main(), 30))
    assert got == 3
    assert len(second) == 30
    assert all(r.ok and r.tool_calls == 2 for r in second), [r.error for r in second if not r.ok]
    report = batch.report()
    # The report is the second run's, not a mix with the abandoned one.
    assert report.jobs == 30 and report.ok == 30
    assert report.tool_requests == 60


def test_a_stream_dropped_without_closing_then_a_new_run() -> None:
    calls: list[str] = []
    batch = tool_batch(calls)

    async def main() -> list[Any]:
        got = 0
        async for _ in batch.stream(inputs(200, "first")):
            got += 1
            if got == 3:
                break
        # No aclose(): the abandoned generator is finalised whenever the loop gets to it.
        return await batch.arun(inputs(30, "second"))

    second = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(second) == 30
    assert all(r.ok and r.tool_calls == 2 for r in second), [r.error for r in second if not r.ok]
    assert batch.report().jobs == 30


def test_two_runs_at_once_on_one_batch() -> None:
    calls: list[str] = []
    batch = tool_batch(calls)

    async def main() -> tuple[list[Any], list[Any]]:
        a, b = await asyncio.gather(batch.arun(inputs(40, "a")), batch.arun(inputs(25, "b")))
        return a, b

    a, b = asyncio.run(asyncio.wait_for(main(), 30))
    assert [r.index for r in a] == list(range(40))
    assert [r.index for r in b] == list(range(25))
    assert all(r.ok and r.tool_calls == 2 for r in a + b), [r.error for r in a + b if not r.ok]
    assert calls
    # The last run to finish is the one reported; either way its numbers are its own.
    report = batch.report()
    assert (report.jobs, report.tool_requests) in {(40, 80), (25, 50)}


def test_report_during_a_run_shows_that_run() -> None:
    seen: list[int] = []
    batch_box: list[Batch] = []

    def on_result(_: Any) -> None:
        seen.append(batch_box[0].report().ok)

    calls: list[str] = []
    batch = Batch(
        "Review {path}.",
        tools=[counting_reader(calls)],
        backend=f"sim://?{FAST}&tool_rounds=1",
        max_inflight=4,
        on_result=on_result,
    )
    batch_box.append(batch)
    batch.run(inputs(9, "one"))
    assert batch.report().jobs == 9
    seen.clear()
    batch.run(inputs(3, "two"))
    # Inside the second run, report() shows the second run's live counts, never the first's 9.
    assert seen and max(seen) <= 3
    assert batch.report().jobs == 3


def test_two_file_runs_at_once_each_return_their_own_report(tmp_path: Any) -> None:
    import json

    calls: list[str] = []
    batch = tool_batch(calls)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in inputs(4, "s")))
    large.write_text("".join(json.dumps(r) + "\n" for r in inputs(40, "l")))

    async def main() -> tuple[Any, Any]:
        a, b = await asyncio.gather(
            batch.arun_file(small, tmp_path / "small.out"), batch.arun_file(large, tmp_path / "large.out")
        )
        return a, b

    a, b = asyncio.run(asyncio.wait_for(main(), 30))
    # Whichever ends first, its report is not the other run's live figures.
    assert (a.jobs, a.ok) == (4, 4)
    assert (b.jobs, b.ok) == (40, 40)
    assert len((tmp_path / "large.out").read_text().splitlines()) == 40
