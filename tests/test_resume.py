"""Crash and resume: `batchagent run` killed with SIGKILL mid-run, or dying inside a Python tool,
then resumed from its journal: every input gets exactly one result and finished jobs are not sent
to the model again. A journal that cannot be written stops the run before any request."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import sim

N = 5000
# Small enough that a run takes a few seconds on two busy cores, long enough to kill it mid-way.
TIME_SCALE = 0.02
INFLIGHT = 64


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchagent_rs.cli", "run", *args]


def environment(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp / ".cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def complete_lines(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b"\n")


def model_requests(server: Any) -> int:
    return int(server.stats()["requests"]["total"])


def check_output(path: Path, ids: list[str]) -> None:
    lines = path.read_text().splitlines()
    results = [json.loads(line) for line in lines]
    counts = Counter(r["id"] for r in results)
    duplicates = {k: v for k, v in counts.items() if v > 1}
    assert not duplicates, f"{len(duplicates)} ids written twice, e.g. {list(duplicates.items())[:3]}"
    assert len(results) == len(ids)
    assert set(counts) == set(ids)
    assert sorted(r["index"] for r in results) == list(range(len(ids)))
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:3]


def output_ids(path: Path) -> set[str]:
    """Ids of the complete lines of an output file (a torn last line is not shown to anyone)."""
    data = path.read_bytes() if path.exists() else b""
    return {json.loads(line)["id"] for line in data.split(b"\n")[:-1]}


@pytest.mark.parametrize("kill_at", [0.15, 0.4, 0.7])
def test_sigkill_mid_run_then_resume(tmp_path: Path, kill_at: float) -> None:
    ids = [f"doc-{i:05d}" for i in range(N)]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": f"Summarise {i}."}) + "\n" for i in ids)
    )
    out = tmp_path / "out.jsonl"
    # A kill point that varies between runs within its band: the property must hold at any moment.
    target = int(N * (kill_at + random.uniform(0, 0.1)))
    with sim.start(time_scale=TIME_SCALE, seed=11, output_tokens="uniform:8:24") as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        args = command(
            "in.jsonl", "-o", "out.jsonl", "-m", "sim-model", "-c", str(INFLIGHT), "--backend", backend,
            "--journal", "run.sqlite", "--no-cache",
        )  # fmt: skip
        first = subprocess.Popen(
            args, cwd=tmp_path, env=environment(tmp_path), stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        try:
            while complete_lines(out) < target:
                assert first.poll() is None, f"the run ended before it could be killed: {first.stderr}"
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
            if first.stderr is not None:
                first.stderr.close()
        assert first.returncode == -signal.SIGKILL
        shown = output_ids(out)
        assert target <= len(shown) < N, len(shown)
        with sqlite3.connect(tmp_path / "run.sqlite") as journal:
            committed = {row[0] for row in journal.execute("SELECT job_id FROM results")}
        # Every result the output showed at the kill had been committed before it was written.
        assert shown <= committed, f"{len(shown - committed)} results shown but not journaled"
        sent_before = model_requests(server)

        second = subprocess.run(
            [*args, "--resume", "--report", "report.json"],
            cwd=tmp_path,
            env=environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 0, second.stderr
        sent_after = model_requests(server) - sent_before

    check_output(out, ids)
    # One request per job (one turn, no faults): the resumed run sent exactly the jobs the journal
    # did not hold, and so none of the jobs the output showed at the kill.
    assert sent_after == N - len(committed), (sent_after, len(committed), len(shown))
    assert sent_after <= N - len(shown), (sent_after, len(shown))
    assert sent_before + sent_after >= N


CRASH_TOOLS = textwrap.dedent(
    """
    import os
    import threading
    from pathlib import Path

    from batchagent_rs import tool

    _lock = threading.Lock()
    _calls = 0


    @tool
    def lookup(topic: str) -> str:
        \"\"\"Look up the notes on a topic.\"\"\"
        global _calls
        with _lock:
            _calls += 1
            calls = _calls
        marker = Path(os.environ["CRASH_MARKER"])
        if calls >= int(os.environ["CRASH_AFTER"]) and not marker.exists():
            marker.write_text(str(calls))
            os._exit(1)
        return "notes on " + topic
    """
)


def test_crash_inside_a_python_tool_then_resume(tmp_path: Path) -> None:
    n = 2000
    ids = [f"q-{i:04d}" for i in range(n)]
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "topic": f"subject {i}"}) + "\n" for i in ids)
    )
    (tmp_path / "crashtools.py").write_text(CRASH_TOOLS)
    marker = tmp_path / "crashed"
    env = environment(tmp_path, CRASH_MARKER=str(marker), CRASH_AFTER=str(n // 3))
    out = tmp_path / "out.jsonl"
    with sim.start(time_scale=TIME_SCALE, seed=4, tool_rounds=1, distinct_args=1_000_000) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        args = command(
            "in.jsonl", "-o", "out.jsonl", "--task", "Research {topic}, then answer.",
            "--tools", "crashtools:lookup", "-m", "sim-model", "-c", "32", "--backend", backend,
            "--journal", "run.sqlite", "--no-cache", "--quiet",
        )  # fmt: skip
        first = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert first.returncode == 1 and marker.exists(), (first.returncode, first.stderr)
        done_before = complete_lines(out)
        assert done_before < n
        # What the journal held at the crash: results, and the tool turns of jobs without one.
        with sqlite3.connect(tmp_path / "run.sqlite") as journal:
            finished = {row[0] for row in journal.execute("SELECT job_id FROM results")}
            midway = {
                row[0]
                for row in journal.execute("SELECT job_id FROM checkpoints WHERE turn >= 1")
                if row[0] not in finished
            }
        assert done_before <= len(finished) < n
        sent_before = model_requests(server)

        second = subprocess.run(
            [*args, "--resume"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 0, second.stderr
        sent_after = model_requests(server) - sent_before

    check_output(out, ids)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["tool_calls"] == 1 for r in results)
    # Two model calls per job; jobs finished before the crash cost nothing the second time, and
    # jobs whose tool turn was journaled resume from it: one call each. How many of those there
    # are depends on where the crash fell (on a loaded machine, possibly none), the count does not.
    assert sent_after == 2 * (n - len(finished)) - len(midway), (sent_after, len(finished), len(midway))


def test_journal_on_an_unwritable_path_fails_before_any_request(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    (tmp_path / "a-file").write_text("not a folder")
    with sim.start(time_scale=0) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        for journal in (tmp_path / "a-file" / "run.sqlite", tmp_path / "missing" / "deeper" / "run.sqlite"):
            proc = subprocess.run(
                command(
                    "in.txt",
                    "-o",
                    "out.jsonl",
                    "-m",
                    "sim-model",
                    "--backend",
                    backend,
                    "--journal",
                    str(journal),
                ),
                cwd=tmp_path,
                env=environment(tmp_path),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and str(journal) in lines[0], proc.stderr
        assert model_requests(server) == 0
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""
