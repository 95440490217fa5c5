"""`@tool(cache="redis")`: tool results shared through Redis by every process, against a real
`redis-server` started by each test. Executions are counted by the tool itself, in a file, so
calls made by worker processes count too."""

from __future__ import annotations

import os
import subprocess
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_fleet_workers import Redis, cli, environment, pytestmark  # noqa: F401

from batchagent_rs import Batch, sim, tool

TOOLS = textwrap.dedent(
    """
    import json
    import os

    from batchagent_rs import tool


    @tool(cache="redis", cache_ttl=600)
    def lookup(topic: str) -> str:
        \"\"\"Look up the notes on a topic.\"\"\"
        with open(os.environ["LOOKUP_LOG"], "a") as log:
            log.write(json.dumps(topic) + "\\n")
        return "notes on " + topic
    """
)


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    server = Redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tools_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "cached_tools_mod.py").write_text(TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LOOKUP_LOG", str(tmp_path / "lookups.log"))
    import importlib

    return importlib.import_module("cached_tools_mod")


def redis_cli(server: Redis, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-u", server.url, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def executions(tmp_path: Path) -> Counter[str]:
    log = tmp_path / "lookups.log"
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


def test_a_shared_cache_needs_a_redis() -> None:
    @tool(cache="redis")
    def fetch(url: str) -> str:
        """Fetch a page."""
        return url

    with pytest.raises(ValueError, match="tool 'fetch' has cache=\"redis\": pass redis=URL"):
        Batch("Read {url}.", tools=[fetch], backend="sim://")
    with pytest.raises(ValueError, match='cache must be True, False or "redis"'):
        tool(cache="memcached")(fetch.fn)  # type: ignore[call-overload]


def test_runs_in_two_processes_share_results(redis: Redis, tools_module: Any, tmp_path: Path) -> None:
    """Two batches, each with its own tool pool (as two processes have): the second executes
    nothing, every call is answered from Redis; the entries carry the tool's cache_ttl."""
    inputs = [{"id": f"q-{i}", "topic": f"topic {i}"} for i in range(30)]
    with sim.start(time_scale=0, seed=4, tool_rounds=1, distinct_args=4) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        for _ in range(2):
            batch = Batch(
                "Research {topic}.",
                tools=[tools_module.lookup],
                backend=backend,
                model="sim-model",
                redis=redis.url,
            )
            results = batch.run(inputs)
            assert all(r.ok for r in results)
            report = batch.report()
    ran = executions(tmp_path)
    assert 1 <= len(ran) <= 4 and set(ran.values()) == {1}, ran
    assert report.tool_executions == 0 and report.tool_cache_hits >= len(ran), report

    keys = redis_cli(redis, "--scan", "--pattern", "batchagent:tool:lookup:*").split()
    assert len(keys) == len(ran)
    assert all(0 < int(redis_cli(redis, "PTTL", k)) <= 600_000 for k in keys)


def test_workers_of_a_fleet_run_each_call_once(redis: Redis, tmp_path: Path) -> None:
    """Two worker processes on 60 jobs that make at most 3 distinct calls: each distinct call runs
    once in the whole fleet, whichever worker makes it first and however they overlap."""
    (tmp_path / "cached_tools_mod.py").write_text(TOOLS)
    env = environment(tmp_path) | {"LOOKUP_LOG": str(tmp_path / "lookups.log")}
    n = 60
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "d-{i}", "topic": "t{i}"}}\n' for i in range(n)))
    with sim.start(time_scale=0, seed=6, tool_rounds=1, distinct_args=3) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        (tmp_path / "job.toml").write_text(
            textwrap.dedent(
                f"""
                input = "in.jsonl"
                task = "Research {{topic}}."
                tools = "cached_tools_mod:lookup"
                backend = "{backend}"
                model = "sim-model"
                max_inflight = 8
                """
            )
        )
        submitted = subprocess.run(
            cli("submit", "job.toml", "--redis", redis.url),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip().splitlines()[-1]
        workers = [
            subprocess.Popen(
                cli("worker", "--redis", redis.url, "--run", run_id, "--name", f"w{k}", "-c", "4"),
                cwd=tmp_path,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(2)
        ]
        for w in workers:
            _, stderr = w.communicate(timeout=300)
            assert w.returncode == 0, stderr
    from batchagent_rs.fleet import FleetHandle

    status = FleetHandle(run_id, redis.url).status()
    assert (status["done"], status["failed"]) == (n, 0)
    ran = executions(tmp_path)
    assert 1 <= len(ran) <= 3 and set(ran.values()) == {1}, ran
    assert os.path.exists(tmp_path / "lookups.log")
