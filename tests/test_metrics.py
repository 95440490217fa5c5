"""The Prometheus endpoint of a running batch (`Batch(metrics_port=)`, `batchagent run --metrics-port`),
scraped over HTTP in the middle of a run against the simulator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchagent_rs import Batch, Result, SchemaError, tool


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_a_scrape_during_the_run_sees_jobs_in_flight_and_agents_waiting_on_tools() -> None:
    seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    scraped = threading.Lock()

    @tool(cache=False)
    def lookup(query: str) -> str:
        """Look something up."""
        # The first call scrapes: its agent is waiting on it, so the run is mid-way.
        with scraped:
            if not seen:
                url = batch.metrics_url
                assert url is not None
                seen.append(scrape(url))
        return f"about {query}"

    batch = Batch(
        "Research {topic}.",
        tools=[lookup],
        backend="sim://?time_scale=0&seed=4&tool_rounds=2",
        max_turns=6,
        metrics_port=0,
    )
    results = batch.run([{"topic": f"t{i}"} for i in range(8)])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    (during,) = seen
    assert during[("batchagent_agents_waiting_on_tools", ())] >= 1
    assert during[("batchagent_jobs_in_flight", ())] >= 1
    assert during[("batchagent_model_calls_total", ())] >= 1
    assert during[("batchagent_tool_calls_total", (("tool", "lookup"),))] >= 1
    assert during[("batchagent_jobs_finished_total", (("outcome", "ok"),))] < len(results)
    # Histograms: cumulative buckets up to +Inf, which is the count.
    count = during[("batchagent_model_call_duration_seconds_count", ())]
    assert count >= 1
    assert during[("batchagent_model_call_duration_seconds_bucket", (("le", "+Inf"),))] == count
    (endpoint,) = [key for key in during if key[0] == "batchagent_endpoint_outstanding"]
    assert during[endpoint] >= 0 and dict(endpoint[1])["endpoint"]
    # The endpoint closes with the run.
    report = batch.report()
    url = report.raw["metrics_url"]
    assert url is not None and batch.metrics_url is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_the_counters_add_up_to_the_runs_results() -> None:
    # Scraped when the last result is handed over: every job is finished, the endpoint still up.
    delivered: list[Result] = []
    totals: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    def on_result(result: Result) -> None:
        delivered.append(result)
        if len(delivered) == 5:
            assert batch.metrics_url is not None
            totals.append(scrape(batch.metrics_url))

    batch = Batch(
        "Say {n}.",
        backend="sim://?time_scale=0&seed=9&output_tokens=fixed:12",
        metrics_port=0,
        on_result=on_result,
    )
    results = batch.run([{"n": i} for i in range(5)])
    assert all(r.ok for r in results)
    (last,) = totals
    assert last[("batchagent_jobs_finished_total", (("outcome", "ok"),))] == 5
    assert last[("batchagent_jobs_in_flight", ())] == 0
    assert last[("batchagent_prompt_tokens_total", ())] == sum(r.usage.prompt_tokens for r in results)
    assert last[("batchagent_completion_tokens_total", ())] == sum(r.usage.completion_tokens for r in results)
    assert last[("batchagent_job_duration_seconds_count", ())] == 5
    assert last[("batchagent_model_calls_in_flight", ())] == 0


def test_a_port_in_use_is_refused_before_any_request() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        batch = Batch("Say {n}.", backend="sim://?time_scale=0", metrics_port=port)
        with pytest.raises(Exception, match=f"metrics endpoint 127.0.0.1:{port}"):
            batch.run([{"n": 1}])
    with pytest.raises(SchemaError, match="metrics_port"):
        Batch("Say {n}.", backend="sim://", metrics_port=70000)


def test_the_cli_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    # The tool scrapes the endpoint of the process it runs in, mid-run, and writes what it read.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "scrape_tools.py").write_text(
        textwrap.dedent(
            f"""
            import urllib.request
            from pathlib import Path
            from batchagent_rs import tool

            @tool(cache=False)
            def lookup(query: str) -> str:
                \"\"\"Look something up.\"\"\"
                out = Path("scraped.txt")
                if not out.exists():
                    with urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10) as r:
                        out.write_bytes(r.read())
                return "about " + query
            """
        )
    )
    (tmp_path / "topics.jsonl").write_text("".join(f'{{"topic": "t{i}"}}\n' for i in range(4)))
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / ".cache")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchagent_rs.cli",
            "run",
            "topics.jsonl",
            "--task",
            "Research {topic}.",
            "--tools",
            "scrape_tools:lookup",
            "--backend",
            "sim://?time_scale=0&seed=2&tool_rounds=1",
            "--metrics-port",
            str(port),
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families((tmp_path / "scraped.txt").read_text())
        for s in family.samples
    }
    assert samples[("batchagent_agents_waiting_on_tools", ())] >= 1
    assert samples[("batchagent_jobs_started_total", ())] >= 1
