"""Compaction: 30-turn agents whose conversations outgrow the simulator's context window finish
because their conversations are compacted before each call that would not fit (tool outputs cut
and dropped, then the oldest turns summarised by a second model), counted with the server's
`/tokenize`; the system prompt, the task and the tool definitions reach the server byte for byte
the same in every request; and a run killed mid-way resumes from the compacted conversation."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import Batch, sim, tool

ROUNDS = 30
SYSTEM = "You are a careful investigator. Check every record before you answer. " * 8


@tool
def fetch(record: str) -> str:
    """Fetch a record by its name."""
    return f"record {record}: " + "the quick brown fox jumps over the lazy dog " * 40


@contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A loopback HTTP proxy in front of `upstream` that keeps every request's path and body."""
    seen: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def forward(self, body: bytes | None) -> None:
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command)
            for name in ("Content-Type", "Authorization", "X-Request-Id"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, payload, kind = response.status, response.read(), response.headers["Content-Type"]
            except urllib.error.HTTPError as error:
                status, payload, kind = error.code, error.read(), error.headers["Content-Type"]
            self.send_response(status)
            self.send_header("Content-Type", kind or "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self.forward(None)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                seen.append((self.path, body))
            self.forward(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"vllm://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def agents(**settings: Any) -> Batch:
    return Batch(
        "Investigate case {case}.",
        system=SYSTEM,
        tools=[fetch],
        model="sim-model",
        max_turns=ROUNDS + 1,
        max_tokens=200,
        stream=False,
        max_inflight=4,
        **settings,
    )


def cases(n: int) -> list[dict[str, str]]:
    return [{"id": f"case-{i}", "case": f"C{i}"} for i in range(n)]


def test_thirty_turn_agents_fit_a_small_context_by_dropping_old_tool_outputs() -> None:
    with sim.start(
        time_scale=0, seed=3, tool_rounds=ROUNDS, max_model_len=6144, output_tokens="fixed:20"
    ) as server:
        upstream = server.url
        # Without compaction the same agents outgrow the window: the test can fail.
        plain = agents(backend="vllm://" + upstream.removeprefix("http://"), compaction=False).run(cases(2))
        assert all(not r.ok and r.error is not None and r.error.kind == "context_length" for r in plain)

        with recording_proxy(upstream) as (backend, seen):
            batch = agents(backend=backend)
            results = batch.run(cases(4))
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.tool_calls == ROUNDS and r.turns == ROUNDS + 1 for r in results)
    report = batch.report()
    assert report.compactions > 0 and report.compaction_tokens_dropped > 0
    assert report.compaction_summaries == 0, "dropping old tool outputs was enough"
    run = report.raw["run"]
    # Counted by the server's tokenizer, never estimated.
    assert run["tokens_counted"] > 0 and run["tokens_estimated"] == 0
    assert any(path == "/tokenize" for path, _ in seen)

    chats = [body for path, body in seen if path == "/v1/chat/completions"]
    assert len(chats) == 4 * (ROUNDS + 1)
    # The system prompt and the task (the head of `messages`) and the tool definitions are the
    # same bytes in every request of a job, compacted or not.
    by_job: dict[str, list[bytes]] = {}
    for body in chats:
        by_job.setdefault(json.loads(body)["messages"][1]["content"], []).append(body)
    assert len(by_job) == 4
    tools = {body[body.index(b'"tools":') :] for body in chats}
    assert len(tools) == 1, "tool definitions changed between requests"
    compacted = 0
    for bodies in by_job.values():
        heads = {body[: body.index(b',{"role":"assistant"')] for body in bodies[1:]}
        assert len(heads) == 1, "the request prefix changed"
        assert bodies[0].startswith(heads.pop())
        compacted += sum(b"dropped to fit the context" in body for body in bodies)
    assert compacted > 0
    # The engine's prefix cache kept serving the shared head.
    assert report.cache_hit_rate > 0.5


def test_a_summariser_on_its_own_backend_replaces_the_oldest_turns() -> None:
    with (
        sim.start(
            time_scale=0, seed=5, tool_rounds=ROUNDS, max_model_len=2048, output_tokens="fixed:20"
        ) as main,
        sim.start(time_scale=0, seed=6, output_tokens="fixed:60") as summariser,
    ):
        batch = agents(
            backend="vllm://" + main.url.removeprefix("http://"),
            compaction_keep_turns=2,
            compaction_tool_output_chars=1000,
            compaction_model="sim-small",
            compaction_backend="vllm://" + summariser.url.removeprefix("http://"),
            compaction_summary_tokens=100,
        )
        results = batch.run(cases(3))
        summaries_served = summariser.stats()["requests"]["total"]
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.tool_calls == ROUNDS for r in results)
    report = batch.report()
    assert report.compaction_summaries > 0
    assert summaries_served == report.raw["run"]["compaction_calls"] >= report.compaction_summaries
    # The summaries' tokens are the jobs' tokens too.
    assert sum(r.usage.completion_tokens for r in results) == report.completion_tokens


def test_settings_out_of_range_name_the_setting() -> None:
    from batchagent_rs import SchemaError

    for setting, value in [
        ("max_context_tokens", 0),
        ("compaction_keep_turns", 0),
        ("compaction_tool_output_chars", 10),
        ("compaction_model", " "),
    ]:
        with pytest.raises(SchemaError, match=setting):
            Batch("t {x}", backend="sim://", **{setting: value})


CRASHING = textwrap.dedent(
    """
    import os, sqlite3, sys, time
    from pathlib import Path
    from batchagent_rs import Batch, tool

    calls = 0

    @tool
    def fetch(record: str) -> str:
        \"\"\"Fetch a record by its name.\"\"\"
        global calls
        calls += 1
        marker = Path(os.environ["CRASH_MARKER"])
        if calls == int(os.environ["CRASH_AFTER"]) and not marker.exists():
            # Crash only once the journal holds a checkpoint at or past DURABLE_TURN (its writer
            # commits in the background): the test then knows a compacted turn is on disk.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with sqlite3.connect(f"file:{sys.argv[2]}?mode=ro", uri=True) as db:
                        [(turn,)] = db.execute("SELECT max(turn) FROM checkpoints").fetchall()
                    if turn is not None and turn >= int(os.environ["DURABLE_TURN"]):
                        break
                except sqlite3.Error:
                    pass
                time.sleep(0.01)
            marker.write_text(str(calls))
            os._exit(1)
        return f"record {record}: " + "the quick brown fox jumps over the lazy dog " * 40

    batch = Batch("Investigate case {case}.", system=os.environ["SYSTEM"], tools=[fetch],
                  model="sim-model", backend=sys.argv[1], max_turns=31, max_tokens=200,
                  stream=False, journal=sys.argv[2])
    [result] = batch.run([{"id": "case-0", "case": "C0"}])
    print(result.ok, result.turns, result.tool_calls, batch.report().compactions)
    """
)


def test_a_run_killed_after_compacting_resumes_from_the_compacted_conversation(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(CRASHING)
    journal = tmp_path / "run.sqlite"
    # Whole-state checkpoints (not block-hash diffs), so that the test can read the saved
    # conversation straight from the journal's table.
    env = dict(
        os.environ,
        CRASH_MARKER=str(tmp_path / "crashed"),
        CRASH_AFTER="22",
        DURABLE_TURN="15",
        SYSTEM=SYSTEM,
        BATCHAGENT_JOURNAL_CHECKPOINTS="full",
    )
    with sim.start(
        time_scale=0, seed=3, tool_rounds=ROUNDS, max_model_len=6144, output_tokens="fixed:20"
    ) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        first = subprocess.run(
            [sys.executable, str(script), backend, str(journal)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.returncode == 1, first.stderr
        with sqlite3.connect(journal) as db:
            [(turn, state)] = db.execute("SELECT turn, state FROM checkpoints").fetchall()
        saved = json.loads(state)
        # The tool waited for turn 15 to be on disk; later turns may not have reached it.
        assert 15 <= turn <= 21 and saved["compactions"] > 0
        # The journal holds the conversation as it was sent: compacted.
        assert any("dropped to fit the context" in m["content"] for m in saved["messages"])
        before = server.stats()["requests"]["total"]

        second = subprocess.run(
            [sys.executable, str(script), backend, str(journal)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr
        resumed = server.stats()["requests"]["total"] - before
    ok, turns, tool_calls, compactions = second.stdout.split()
    assert (ok, turns, tool_calls) == ("True", str(ROUNDS + 1), str(ROUNDS))
    assert int(compactions) > 0
    # From the checkpoint on: the turns after it (the one lost with the crash included) and the
    # answer, nothing before it.
    assert resumed == ROUNDS + 1 - turn
