"""What a new user meets from Python: mistakes that fail loudly before any request, DataFrame
inputs, `run()` inside a running event loop (a notebook), the progress display."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pydantic
import pytest

from batchagent_rs import BackendUnavailable, Batch, BatchAgent
from batchagent_rs import sim as simulator
from batchagent_rs.notebook import NotebookProgress

FAST = "sim://?time_scale=0&seed=3"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chat_requests(server: simulator.Simulator) -> int:
    return int(server.stats()["routes"].get("/v1/chat/completions", {}).get("total", 0))


def test_a_batch_without_a_backend_names_the_parameter() -> None:
    with pytest.raises(TypeError, match="backend="):
        Batch("Say {x}.")
    with pytest.raises(TypeError, match="model="):
        Batch("Say {x}.", backend="vllm://127.0.0.1:1")
    # The simulator needs no model name.
    assert Batch("Say {x}.", backend=FAST).spec["model"] == "sim-model"


def test_a_dead_backend_raises_before_the_first_request() -> None:
    port = closed_port()
    batch = Batch("Say {x}.", model="m", backend=f"vllm://127.0.0.1:{port}")
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}.*unreachable") as raised:
        batch.check()
    assert isinstance(raised.value, ConnectionError)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        batch.run([{"x": 1}])


def test_a_model_the_backend_does_not_serve_raises_with_the_served_names() -> None:
    with simulator.start(time_scale=0, model="qwen2.5-7b") as server:
        host = server.url.removeprefix("http://")
        batch = Batch("Say {x}.", model="qwen-2.5-7b", backend=f"vllm://{host}")
        with pytest.raises(BackendUnavailable, match=r'"qwen-2.5-7b" is not served: .* serves qwen2.5-7b'):
            batch.run([{"x": i} for i in range(3)])
        assert chat_requests(server) == 0
        ok = Batch("Say {x}.", model="qwen2.5-7b", backend=f"vllm://{host}").run([{"x": 1}])
        assert ok[0].ok, ok[0].error


def test_the_simulator_serves_the_readme_model_name() -> None:
    results = Batch("Say {x}.", model="qwen2.5-7b", backend=FAST, max_turns=1).run([{"x": 1}])
    assert results[0].ok, results[0].error


def test_a_simulator_server_without_a_pinned_model_passes_the_check_for_any_name() -> None:
    # `batchagent sim serve` without --model, reached as a vLLM server: the check lets any name through.
    with simulator.start(time_scale=0) as server:
        host = server.url.removeprefix("http://")
        batch = Batch("Say {x}.", model="qwen2.5-7b", backend=f"vllm://{host}", max_turns=1)
        batch.check()
        results = batch.run([{"x": 1}])
        assert results[0].ok, results[0].error
        assert chat_requests(server) == 1


def test_a_dataframe_is_read_as_rows() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {"id": [f"row-{i}" for i in range(10)], "path": [f"f{i}.py" for i in range(10)], "n": range(10)}
    )
    frame.loc[3, "path"] = None

    results = Batch("Review {path} ({n}).", backend=FAST, max_turns=1).run(frame)
    assert [r.id for r in results] == [f"row-{i}" for i in range(10)]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    # A missing cell is null, not NaN (which is no JSON).
    from batchagent_rs.batch import _rows

    seen = list(_rows(frame))
    assert seen[3]["path"] is None and seen[4] == {"id": "row-4", "path": "f4.py", "n": 4}
    assert isinstance(seen[4]["n"], int)


def test_run_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(4)))

    async def notebook_cell() -> tuple[int, int]:
        batch = Batch("Say {x}.", backend=FAST, max_turns=1)
        results = batch.run([{"x": i} for i in range(6)])
        report = batch.run_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl")
        return sum(r.ok for r in results), report.ok

    assert asyncio.run(notebook_cell()) == (6, 4)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_progress_is_off_off_a_terminal_and_on_when_asked(capfd: pytest.CaptureFixture[str]) -> None:
    batch = Batch("Say {x}.", backend=FAST, max_turns=1)
    batch.run([{"x": i} for i in range(5)])
    assert capfd.readouterr().err == ""
    batch.run([{"x": i} for i in range(5)], progress=True)
    err = capfd.readouterr().err
    assert "5/5" in err and "ok 5 failed 0" in err, err


def test_the_notebook_display_updates_one_output_in_place() -> None:
    class Handle:
        def __init__(self) -> None:
            self.shown: list[str] = []

        def update(self, data: dict[str, str], raw: bool) -> None:
            self.shown.append(data["text/plain"])

    handle = Handle()
    view = NotebookProgress(3, "batchagent", handle)
    stats = {
        "run": {
            "jobs_ok": 2,
            "jobs_failed": 1,
            "jobs_started": 3,
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "cached_tokens": 0,
        }
    }
    view.update(stats)
    view.update(stats)  # throttled: within the interval nothing is redrawn
    view.close(stats)
    assert len(handle.shown) == 2
    assert "3/3" in handle.shown[-1] and "ok 2 failed 1" in handle.shown[-1]


def test_the_one_call_form_takes_output_and_still_the_old_name() -> None:
    class Note(pydantic.BaseModel):
        title: str

    results = BatchAgent.run(task="Note on {x}.", inputs=[{"x": 1}], output=Note, backend=FAST)
    assert isinstance(results[0].output, Note)
    with pytest.warns(DeprecationWarning, match="output="):
        old = BatchAgent.run(task="Note on {x}.", inputs=[{"x": 1}], output_schema=Note, backend=FAST)
    assert isinstance(old[0].output, Note)
