"""The Redis worker fleet end to end: a real `redis-server` started by each test on a free port with
its own directory, the simulator as the engine, workers as `batchagent worker` processes (or in
this process). Every input gets exactly one result, in input order, whatever dies on the way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import Batch, _core, sim, worker

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("BATCHAGENT_REQUIRE_REDIS"),
    reason="redis-server is not installed (apt-get install redis-server)",
)

TOOLS = textwrap.dedent(
    """
    from batchagent_rs import tool


    @tool
    def lookup(topic: str) -> str:
        \"\"\"Look up the notes on a topic.\"\"\"
        return "notes on " + topic
    """
)


class Redis:
    """A redis-server of the test's own, restartable on the same port and directory."""

    def __init__(self, folder: Path, durable: bool = False) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.durable = durable
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", ""]
        if self.durable:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        # Ready when it answers PING (after loading its AOF).
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def environment(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp), env.get("PYTHONPATH")) if p)
    env["XDG_CACHE_HOME"] = str(tmp / ".cache")
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchagent_rs.cli", *args]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tools_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "fleet_tools_mod.py").write_text(TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("fleet_tools_mod")


def test_submit_work_collect_in_python(redis: Redis, tools_module: Any, tmp_path: Path) -> None:
    n = 60
    with sim.start(time_scale=0, seed=3, tool_rounds=1) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        batch = Batch("Research {topic}.", tools=[tools_module.lookup], backend=backend, model="sim-model")
        inputs = [{"id": f"t-{i}", "topic": f"topic {i}"} for i in range(n)]
        handle = batch.submit(inputs, redis=redis.url)
        status = handle.status()
        assert (status["total"], status["done"], status["submitted"]) == (n, 0, True)
        assert worker(redis.url, run=handle.run_id, name="w1") == 1
        requests = int(server.stats()["requests"]["total"])
    status = handle.status()
    assert (status["done"], status["failed"], status["in_flight"], status["queued"]) == (n, 0, 0, 0)
    [w] = status["workers"]
    assert (w["name"], w["results"], w["refused"]) == ("w1", n, None)
    assert requests == 2 * n, "one tool turn and one answer per job, nothing sent twice"

    out = tmp_path / "out.jsonl"
    assert handle.collect(out) == n
    results = read_lines(out)
    assert [r["id"] for r in results] == [f"t-{i}" for i in range(n)]
    assert all(r["ok"] and r["turns"] == 2 and r["tool_calls"] == 1 for r in results)

    async def completion_order() -> list[str]:
        return [r.id async for r in handle.results()]

    import asyncio

    assert sorted(asyncio.run(completion_order())) == sorted(f"t-{i}" for i in range(n))


def test_a_worker_refuses_a_run_whose_tools_it_cannot_import(
    redis: Redis, tools_module: Any, tmp_path: Path
) -> None:
    batch = Batch("Research {topic}.", tools=[tools_module.lookup], backend="sim://", model="sim-model")
    handle = batch.submit([{"topic": "x"}], redis=redis.url)
    env = dict(os.environ)  # without tmp_path on PYTHONPATH: fleet_tools_mod does not import
    done = subprocess.run(
        cli("worker", "--redis", redis.url, "--run", handle.run_id, "--name", "lonely"),
        cwd=tmp_path / "redis",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot import fleet_tools_mod:lookup" in done.stderr
    status = handle.status()
    [w] = status["workers"]
    assert w["name"] == "lonely" and not w["alive"]
    assert "tool 'lookup': cannot import fleet_tools_mod:lookup" in w["refused"]
    assert status["done"] == 0 and status["queued"] == 1


def test_cli_submit_worker_status_collect(redis: Redis, tmp_path: Path) -> None:
    (tmp_path / "fleet_tools_mod.py").write_text(TOOLS)
    n = 40
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"doc-{i}", "topic": f"topic {i}"}) + "\n" for i in range(n))
    )
    with sim.start(time_scale=0, seed=5, tool_rounds=1) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        (tmp_path / "job.toml").write_text(
            textwrap.dedent(
                f"""
                input = "in.jsonl"
                task = "Research {{topic}}."
                tools = "fleet_tools_mod:lookup"
                backend = "{backend}"
                model = "sim-model"
                max_inflight = 8
                """
            )
        )
        env = environment(tmp_path)
        submitted = subprocess.run(
            cli("submit", "job.toml", "--redis", redis.url),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip().splitlines()[-1]
        early = subprocess.run(
            cli("collect", run_id, "--redis", redis.url, "-o", "out.jsonl"),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert early.returncode == 1 and "0 of 40 inputs have a result" in early.stderr
        assert not (tmp_path / "out.jsonl").exists()
        worked = subprocess.run(
            cli("worker", "--redis", redis.url, "--run", run_id, "-c", "4"),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert worked.returncode == 0, worked.stderr
    shown = subprocess.run(
        cli("status", run_id, "--redis", redis.url, "--json"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status = json.loads(shown.stdout)
    assert {"total", "done", "failed", "in_flight", "workers"} <= set(status)
    assert (status["total"], status["done"], status["failed"], status["in_flight"]) == (n, n, 0, 0)
    assert len(status["workers"]) == 1 and status["workers"][0]["results"] == n
    text = subprocess.run(
        cli("status", run_id, "--redis", redis.url),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert f"run {run_id}: complete; {n} inputs, {n} done" in text
    # --watch on a complete run: shown once, then the final status.
    watched = subprocess.run(
        cli("status", run_id, "--redis", redis.url, "--watch", "0.1"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"run {run_id}: complete" in watched.stdout and f"run {run_id}: complete" in watched.stderr
    from batchagent_rs.dashboard import FleetDashboard

    frame = FleetDashboard(None, title="fleet run").render(status, 100, 30)
    assert all(len(line) <= 100 or "\x1b" in line for line in frame)
    [row] = [line for line in frame if status["workers"][0]["name"] in line]
    assert f" {n} " in row and "gone" in row, row
    assert any(f"{n}/{n}" in line for line in frame)
    collected = subprocess.run(
        cli("collect", run_id, "--redis", redis.url, "-o", "out.jsonl"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert collected.returncode == 0, collected.stderr
    results = read_lines(tmp_path / "out.jsonl")
    assert [r["id"] for r in results] == [f"doc-{i}" for i in range(n)]
    assert [r["index"] for r in results] == list(range(n))


def test_run_file_settings_reach_the_workers_requests(redis: Redis, tmp_path: Path) -> None:
    """submit builds its batch from the run file as `batchagent run` does: `[extra_body]` reaches
    every request a worker sends (the simulator's script is set by it: 3 tool rounds instead of
    the server's 1), and `rpm` is in the spec the workers rebuild (they refuse one they cannot)."""
    (tmp_path / "fleet_tools_mod.py").write_text(TOOLS)
    n = 12
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "r-{i}", "topic": "t{i}"}}\n' for i in range(n)))
    with sim.start(time_scale=0, seed=7, tool_rounds=1) as server:
        backend = "vllm://" + server.url.removeprefix("http://")
        (tmp_path / "job.toml").write_text(
            textwrap.dedent(
                f"""
                input = "in.jsonl"
                task = "Research {{topic}}."
                tools = "fleet_tools_mod:lookup"
                backend = "{backend}"
                model = "sim-model"
                rpm = 6000
                max_turns = 6

                [extra_body]
                sim = {{ tool_rounds = 3 }}
                """
            )
        )
        env = environment(tmp_path)
        submitted = subprocess.run(
            cli("submit", "job.toml", "--redis", redis.url),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip().splitlines()[-1]
        worked = subprocess.run(
            cli("worker", "--redis", redis.url, "--run", run_id),
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert worked.returncode == 0, worked.stderr
        requests = int(server.stats()["requests"]["total"])
    _, text = _core.FleetClient(redis.url).load_spec(run_id)
    spec = json.loads(text)["spec"]
    assert (spec["rpm"], spec["extra_body"], spec["max_turns"]) == (6000, {"sim": {"tool_rounds": 3}}, 6)
    out = tmp_path / "out.jsonl"
    from batchagent_rs.fleet import FleetHandle

    assert FleetHandle(run_id, redis.url).collect(out) == n
    results = read_lines(out)
    assert all(r["ok"] and r["turns"] == 4 and r["tool_calls"] == 3 for r in results), results[:2]
    assert requests == 4 * n


CHAOS_JOBS = 3000
CHAOS_TURNS = 3  # two tool rounds, then the answer


def test_chaos_worker_killed_and_redis_restarted(tmp_path: Path) -> None:
    """3 workers on 3,000 three-turn agents; one is killed with SIGKILL at 30% of the results and
    Redis (AOF, appendfsync always) is killed and restarted at 60%. Every input has exactly one
    result, and no finished turn is sent to the engine again: requests beyond 3 per job are at most
    one per job taken over (the turn that was in progress when its worker died)."""
    (tmp_path / "fleet_tools_mod.py").write_text(TOOLS)
    redis = Redis(tmp_path / "redis", durable=True)
    workers: list[subprocess.Popen[str]] = []
    try:
        with sim.start(time_scale=0, seed=9, tool_rounds=CHAOS_TURNS - 1, output_tokens="fixed:4") as server:
            backend = "vllm://" + server.url.removeprefix("http://")
            sys.path.insert(0, str(tmp_path))
            try:
                import importlib

                tools = importlib.import_module("fleet_tools_mod")
            finally:
                sys.path.remove(str(tmp_path))
            batch = Batch(
                "Research {topic}.", tools=[tools.lookup], backend=backend, model="sim-model", max_inflight=48
            )
            inputs = [{"id": f"a-{i:04d}", "topic": f"topic {i % 50}"} for i in range(CHAOS_JOBS)]
            handle = batch.submit(inputs, redis=redis.url)
            env = environment(tmp_path)
            for k in range(3):
                args = cli("worker", "--redis", redis.url, "--run", handle.run_id, "--name", f"w{k}")
                args += ["--lease-seconds", "5", "-c", "16"]
                workers.append(
                    subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
                )

            def finished() -> int:
                s = handle.status()
                return int(s["done"] + s["failed"])

            def wait_for(target: int) -> None:
                deadline = time.monotonic() + 600
                while finished() < target:
                    assert all(w.poll() is None for w in workers[1:]), "a worker ended early"
                    assert time.monotonic() < deadline, "no progress"
                    time.sleep(0.02)

            wait_for(int(CHAOS_JOBS * 0.3))
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(30)
            wait_for(int(CHAOS_JOBS * 0.6))
            redis.kill()
            redis.start()
            for w in workers[1:]:
                _, stderr = w.communicate(timeout=600)
                assert w.returncode == 0, stderr
            requests = int(server.stats()["requests"]["total"])
        status = handle.status()
        out = tmp_path / "out.jsonl"
        assert handle.collect(out, wait=False) == CHAOS_JOBS
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
            if w.stderr is not None:
                w.stderr.close()
        redis.stop()

    results = read_lines(out)
    counts = Counter(r["id"] for r in results)
    assert not [k for k, v in counts.items() if v > 1]
    assert [r["id"] for r in results] == [f"a-{i:04d}" for i in range(CHAOS_JOBS)]
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:3]
    assert all(r["turns"] == CHAOS_TURNS for r in results), Counter(r["turns"] for r in results)
    assert (status["done"], status["failed"], status["in_flight"]) == (CHAOS_JOBS, 0, 0)
    by_worker = {w["name"]: w["results"] for w in status["workers"]}
    assert sum(by_worker.values()) == CHAOS_JOBS and set(by_worker) == {"w0", "w1", "w2"}
    # The killed worker's jobs were taken over, some of them mid-way (from a checkpoint).
    assert status["claims"] >= 1 and status["resumed"] >= 1, status
    extra = requests - CHAOS_JOBS * CHAOS_TURNS
    assert 0 <= extra <= status["claims"], (requests, status["claims"], status["resumed"])


def test_submit_refuses_tools_a_worker_cannot_import(redis: Redis) -> None:
    def local(topic: str) -> str:
        """Not importable."""
        return topic

    from batchagent_rs import tool

    batch = Batch("Research {topic}.", tools=[tool(local)], backend="sim://", model="sim-model")
    with pytest.raises(ValueError, match="workers import it by module path"):
        batch.submit([{"topic": "x"}], redis=redis.url)
    with pytest.raises(ValueError, match="redis=: expected a redis:// URL"):
        batch.submit([{"topic": "x"}], redis="localhost:6379")
    assert isinstance(_core.FleetClient(redis.url).open_runs(), list)
