"""Provider batch APIs end to end: the simulator's OpenAI Files + Batches and Anthropic Message
Batches, checked with the official SDKs; `Batch(mode="provider_batch")` against both; rows that
fail, batches that expire, and `batchagent run --provider-batch` killed with SIGKILL and resumed,
re-attaching to the batch in flight instead of submitting it again."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from batchagent_rs import Batch, sim

FAST = {"batch_poll_interval": 0.02, "batch_max_poll_interval": 0.1, "batch_linger": 0.05}
PROMPTS = [
    {"id": f"q{i}", "topic": t} for i, t in enumerate(["tides", "bees", "rust", "glass", "ink", "salt"])
]


@pytest.fixture
def server() -> Iterator[sim.Simulator]:
    with sim.start(profile="h100-qwen2.5-0.5b", time_scale=0, seed=3, batch_delay=3600) as s:
        yield s


def post(url: str) -> Any:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request) as resp:
        return json.loads(resp.read())


def chat_body(i: int) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": f"Say something about {i}."}]}


def test_openai_sdk_uploads_creates_polls_and_downloads(server: sim.Simulator) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sim", max_retries=0) as client:
        check_openai_sdk(server, client)


def check_openai_sdk(server: sim.Simulator, client: openai.OpenAI) -> None:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)}
        for i in range(3)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    assert client.files.content(uploaded.id).read() == data
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating" and batch.output_file_id is None
    assert client.batches.retrieve(batch.id).status in ("validating", "in_progress")
    other = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(other.id).status == "cancelling"
    assert post(server.url + "/sim/batches/complete")["ending"] >= 1
    done = wait_for(lambda: client.batches.retrieve(batch.id), lambda b: b.status == "completed")
    assert done.request_counts is not None and done.request_counts.completed == 3
    assert done.output_file_id is not None and done.error_file_id is None
    rows = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in rows] == ["r0", "r1", "r2"]
    # Each row is answered as the same request online is.
    online = client.chat.completions.create(**chat_body(1))
    assert rows[1]["response"]["status_code"] == 200
    assert (
        rows[1]["response"]["body"]["choices"][0]["message"]["content"] == online.choices[0].message.content
    )
    cancelled = wait_for(lambda: client.batches.retrieve(other.id), lambda b: b.status == "cancelled")
    assert cancelled.cancelled_at is not None
    listed = client.batches.list(limit=10)
    assert {b.id for b in listed.data} == {batch.id, other.id}
    bad = client.files.create(
        file=("bad.jsonl", io.BytesIO(b'{"custom_id": "x"}\nnot json\n')), purpose="batch"
    )
    failed = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_for(lambda: client.batches.retrieve(failed.id), lambda b: b.status == "failed")
    assert failed.errors is not None and failed.errors.data is not None
    assert [e.line for e in failed.errors.data] == [1, 2]


def test_anthropic_sdk_creates_polls_and_reads_results(server: sim.Simulator) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="sim", max_retries=0) as client:
        check_anthropic_sdk(server, client)


def check_anthropic_sdk(server: sim.Simulator, client: anthropic.Anthropic) -> None:
    params: Any = {"model": "sim-model", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]}
    batch = client.messages.batches.create(requests=[{"custom_id": "a-1", "params": params}])
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 1
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        client.messages.batches.create(requests=[{"custom_id": "not valid!", "params": params}])
    post(server.url + "/sim/batches/complete")
    ended = wait_for(
        lambda: client.messages.batches.retrieve(batch.id), lambda b: b.processing_status == "ended"
    )
    assert ended.request_counts.succeeded == 1 and ended.results_url is not None
    results = list(client.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == ["a-1"]
    assert results[0].result.type == "succeeded"
    online = client.messages.create(**params)
    assert results[0].result.message.content == online.content
    later = client.messages.batches.create(requests=[{"custom_id": "b", "params": params}])
    assert client.messages.batches.cancel(later.id).processing_status == "canceling"
    gone = wait_for(
        lambda: client.messages.batches.retrieve(later.id), lambda b: b.processing_status == "ended"
    )
    assert gone.request_counts.canceled == 1
    assert [r.result.type for r in client.messages.batches.results(later.id)] == ["canceled"]


def wait_for(fetch: Any, done: Any, timeout: float = 30.0) -> Any:
    """Polls until `done(fetch())`, as any batch client does; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value}"
        time.sleep(0.01)


def online_answers(backend: str, **kwargs: Any) -> dict[str, Any]:
    batch = Batch("Write about {topic}.", backend=backend, model="sim-model", **kwargs)
    return {r.id: r.output for r in batch.run(PROMPTS)}


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_batch_mode_gives_the_online_answers(server: sim.Simulator, api: str) -> None:
    address = server.url.removeprefix("http://")
    backend = f"sim://{address}" if api == "openai" else f"anthropic+http://{address}"
    key = {"api_key": "sim"} if api == "anthropic" else {}
    ended = post_later(server)
    batch = Batch(
        "Write about {topic}.",
        backend=backend,
        model="sim-model",
        mode="provider_batch",
        max_tokens=64,
        **key,
        **FAST,
    )
    results = batch.run(PROMPTS)
    ended.join()
    assert [r.id for r in results] == [p["id"] for p in PROMPTS]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert {r.id: r.output for r in results} == online_answers(backend, max_tokens=64, **key)
    figures = batch.report().raw["provider_batch"]
    assert figures["api"] == api
    assert (figures["batches_submitted"], figures["rows_submitted"], figures["rows_done"]) == (1, 6, 6)
    assert server.stats()["batches"]["created"] == 1


def post_later(server: sim.Simulator) -> Any:
    """Ends the batch once the simulator holds one (the test's stand-in for a day passing)."""
    import threading

    def run() -> None:
        wait_for(lambda: server.stats()["batches"]["in_progress"], lambda n: n >= 1)
        post(server.url + "/sim/batches/complete")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_failed_rows_go_into_a_new_batch_or_online() -> None:
    backend = "sim://?profile=h100-qwen2.5-0.5b&time_scale=0&seed=5&batch_delay=0&batch_failure_rate=0.5"
    batch = Batch("Write about {topic}.", backend=backend, mode="provider_batch", **FAST)
    results = batch.run(PROMPTS)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    figures = batch.report().raw["provider_batch"]
    assert figures["rows_errored"] >= 1 and figures["batches_submitted"] >= 2
    assert figures["rows_done"] == len(PROMPTS)
    # Each failed row is the job's retry: one more attempt per failed row.
    assert sum(r.attempts - 1 for r in results) == figures["rows_errored"]

    online = Batch(
        "Write about {topic}.", backend=backend, mode="provider_batch", batch_retry="online", **FAST
    )
    results = online.run(PROMPTS)
    assert all(r.ok for r in results)
    figures = online.report().raw["provider_batch"]
    assert figures["batches_submitted"] == 1
    assert figures["rows_online"] == figures["rows_errored"] >= 1


def test_an_expired_batch_keeps_its_finished_rows_and_sends_the_rest_again() -> None:
    backend = "sim://?profile=h100-qwen2.5-0.5b&time_scale=0&seed=0&batch_delay=0.1&batch_expire_rate=0.5"
    batch = Batch("Write about {topic}.", backend=backend, mode="provider_batch", **FAST)
    results = batch.run(PROMPTS)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    figures = batch.report().raw["provider_batch"]
    assert figures["batches_expired"] >= 1
    # Only the rows that did not run went again: the finished ones were kept.
    assert 1 <= figures["rows_resubmitted"] < figures["rows_submitted"]
    assert figures["rows_submitted"] == len(PROMPTS) + figures["rows_resubmitted"]
    assert figures["rows_done"] == len(PROMPTS)


def test_provider_batch_mode_refuses_tools() -> None:
    from batchagent_rs import SchemaError, tool

    @tool
    def look(q: str) -> str:
        """Look it up."""
        return q

    with pytest.raises(SchemaError, match="single-turn"):
        Batch("t", backend="sim://", tools=[look], mode="provider_batch")


def test_resume_after_sigkill_reattaches_to_the_batch_in_flight(
    tmp_path: Path, server: sim.Simulator
) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    output, journal, report = tmp_path / "out.jsonl", tmp_path / "run.sqlite", tmp_path / "report.json"
    args = [
        sys.executable, "-m", "batchagent_rs.cli", "run", str(inputs), "-o", str(output),
        "--journal", str(journal), "--task", "Write about {topic}.",
        "--backend", "sim://" + server.url.removeprefix("http://"), "--provider-batch",
        "--batch-poll-interval", "0.02", "--batch-max-poll-interval", "0.1", "--batch-linger", "0.05",
        "--no-cache", "--quiet", "--report", str(report),
    ]  # fmt: skip
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / ".cache"))
    first = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    try:
        # Killed once the batch is in the journal: the moment a resumed run must re-attach.
        wait_for(lambda: recorded_batches(journal), lambda ids: len(ids) == 1, timeout=60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert server.stats()["batches"]["created"] == 1
    post(server.url + "/sim/batches/complete")
    second = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert server.stats()["batches"]["created"] == 1, "the resumed run submitted the rows again"
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(p["id"] for p in PROMPTS)
    assert all(r["ok"] for r in results)
    figures = json.loads(report.read_text())["provider_batch"]
    assert (figures["batches_reattached"], figures["batches_submitted"], figures["rows_done"]) == (1, 0, 6)


def recorded_batches(journal: Path) -> list[str]:
    if not journal.exists():
        return []
    try:
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
            return [row[0] for row in conn.execute("SELECT batch_id FROM provider_batches")]
    except sqlite3.OperationalError:
        return []  # not created yet
