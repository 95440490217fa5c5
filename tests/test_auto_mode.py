"""`Batch(mode="auto", deadline=...)`: each model call of a tool-using agent goes through the
provider's batch API when the deadline leaves time for the agent's remaining turns to go that way,
online otherwise; the report says what went where. Against the simulator's OpenAI Batch API, with
deadlines far enough from the decision's boundary that the run's own duration cannot move it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from batchagent_rs import Batch, sim, tool
from batchagent_rs.pricing import Price, auto_cost

FAST = {"batch_poll_interval": 0.02, "batch_max_poll_interval": 0.05, "batch_linger": 0.05}
AGENTS = [{"id": f"a{i}", "key": f"k{i}"} for i in range(12)]


class Answer(pydantic.BaseModel):
    key: str
    value: str


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return key.upper()


@pytest.fixture
def server() -> Iterator[sim.Simulator]:
    # Each agent calls the tool twice and then answers: three model turns.
    with sim.start(profile="h100-qwen2.5-0.5b", time_scale=0, seed=11, tool_rounds=2, batch_delay=0.05) as s:
        yield s


def run(
    server: sim.Simulator, agents: list[dict[str, str]] = AGENTS, **kwargs: Any
) -> tuple[Batch, list[Any]]:
    batch = Batch(
        "What is stored under {key}?",
        tools=[lookup],
        output=Answer,
        model="sim-model",
        backend="sim://" + server.url.removeprefix("http://"),
        max_turns=3,
        mode="auto",
        **FAST,
        **kwargs,
    )
    results = batch.run(agents)
    assert [r.id for r in results] == [a["id"] for a in agents]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(r.turns == 3 for r in results)
    return batch, results


def test_a_far_deadline_sends_every_turn_through_the_batch_api(server: sim.Simulator) -> None:
    batch, _ = run(server, deadline=3600.0, batch_turnaround=60.0)
    routes = batch.report().auto_routes
    assert routes is not None
    assert routes["online"]["calls"] == 0
    assert routes["batch"]["calls"] == 3 * len(AGENTS)
    assert routes["batch"]["prompt_tokens"] == batch.report().prompt_tokens
    assert server.stats()["batches"]["created"] >= 3  # at least one batch per turn


def test_a_near_deadline_sends_every_turn_online(server: sim.Simulator) -> None:
    # One second left, and no batch has been seen to come back sooner than the 24-hour window.
    batch, _ = run(server, deadline=1.0)
    routes = batch.report().auto_routes
    assert routes is not None
    assert routes["batch"]["calls"] == 0
    assert routes["online"]["calls"] == 3 * len(AGENTS)
    assert server.stats()["batches"]["created"] == 0
    assert "0 calls through the batch API" in batch.report().table()


def test_a_deadline_for_two_turnarounds_sends_the_first_turn_online_and_the_rest_as_batch_rows(
    server: sim.Simulator,
) -> None:
    # 150 s left, 60 s per batch, 3 turns expected (max_turns): turn 0 needs 180 s the batch way,
    # turn 1 needs 120 s and turn 2 60 s; batches that come back sooner only shorten the estimate.
    batch, _ = run(server, deadline=150.0, batch_turnaround=60.0)
    routes = batch.report().auto_routes
    assert routes is not None
    assert routes["online"]["calls"] == len(AGENTS)
    assert routes["batch"]["calls"] == 2 * len(AGENTS)
    # The later turns carry the longer prompts: most of the tokens went at half price.
    assert routes["batch"]["prompt_tokens"] > 2 * routes["online"]["prompt_tokens"]
    assert routes["expected_turns"] == 3 and routes["agents_finished"] == len(AGENTS)


def test_a_resumed_run_counts_the_deadline_from_the_first_start(
    server: sim.Simulator, tmp_path: Path
) -> None:
    journal = str(tmp_path / "run.sqlite")
    first, _ = run(server, AGENTS[:4], deadline=3600.0, batch_turnaround=60.0, journal=journal)
    first_routes = first.report().auto_routes
    assert first_routes is not None
    # Resumed by another Batch (as after a restart): the first start comes from the journal, so the
    # deadline is the very same instant.
    resumed, _ = run(server, deadline=3600.0, batch_turnaround=60.0, journal=journal)
    routes = resumed.report().auto_routes
    assert routes is not None
    assert routes["deadline_at"] == first_routes["deadline_at"]
    assert routes["batch"]["calls"] == 3 * (len(AGENTS) - 4)  # the first four were not run again
    # A deadline changed on resume still counts from the first start.
    later, _ = run(server, deadline=7200.0, batch_turnaround=60.0, journal=journal)
    later_routes = later.report().auto_routes
    assert later_routes is not None
    assert later_routes["deadline_at"] == pytest.approx(first_routes["deadline_at"] + 3600.0, abs=1e-6)


def test_a_run_resumed_an_hour_after_its_first_start_has_an_hour_less(
    server: sim.Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "run.sqlite"
    first, _ = run(server, AGENTS[:4], deadline=3750.0, batch_turnaround=60.0, journal=str(journal))
    first_routes = first.report().auto_routes
    assert first_routes is not None and first_routes["online"]["calls"] == 0
    # As though the first run had started an hour earlier. Written from another process: two copies
    # of SQLite in one process (Python's and the extension's) do not see each other's file locks.
    edit = (
        "import sqlite3, sys\n"
        "with sqlite3.connect(sys.argv[1]) as conn:\n"
        "    conn.execute(\"UPDATE meta SET value = value - 3600.0 WHERE key = 'auto_first_start'\")\n"
    )
    subprocess.run([sys.executable, "-c", edit, str(journal)], check=True, timeout=60)
    # 150 s left, not 3,750: as in the two-turnarounds case above, the new agents' first turn goes
    # online and the other two through the batch API.
    resumed, _ = run(server, deadline=3750.0, batch_turnaround=60.0, journal=str(journal))
    routes = resumed.report().auto_routes
    assert routes is not None
    new_agents = len(AGENTS) - 4
    assert routes["online"]["calls"] == new_agents
    assert routes["batch"]["calls"] == 2 * new_agents
    assert routes["deadline_at"] == pytest.approx(first_routes["deadline_at"] - 3600.0, abs=1e-3)
    assert routes["deadline_left_s"] < 150.0


def test_the_cost_splits_by_route_and_the_saving_is_half_the_batched_tokens() -> None:
    routes = {
        "online": {"prompt_tokens": 1_000_000, "cached_tokens": 0, "completion_tokens": 0},
        "batch": {"prompt_tokens": 2_000_000, "cached_tokens": 0, "completion_tokens": 1_000_000},
    }
    prices = {"m": Price(input=1.0, cached_input=0.5, output=4.0)}
    cost, saved = auto_cost(routes, model="m", backends=["openai://"], overrides=prices)
    # Online: $1; batch: ($2 + $4) at half price = $3.
    assert cost.dollars == pytest.approx(4.0)
    assert saved == pytest.approx(3.0)


def test_auto_mode_needs_a_deadline_and_refuses_bad_ones() -> None:
    with pytest.raises(ValueError, match="needs deadline="):
        Batch("t", backend="sim://", mode="auto")
    with pytest.raises(ValueError, match="deadline"):
        Batch("t", backend="sim://", mode="auto", deadline=-5)
    with pytest.raises(ValueError, match="mode='auto' only"):
        Batch("t", backend="sim://", deadline=10)
    with pytest.raises(ValueError, match="batch_turnaround"):
        Batch("t", backend="sim://", mode="auto", deadline=10, batch_turnaround=0)


def test_cli_auto_deadline_reports_the_routes_and_the_saving(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "text": str(i)}) + "\n" for i in range(8))
    )
    (tmp_path / "prices.json").write_text(json.dumps({"sim-model": {"input": 1000.0, "output": 2000.0}}))
    proc = subprocess.run(
        [
            sys.executable, "-m", "batchagent_rs.cli", "run", "p.jsonl", "-o", "o.jsonl",
            "--task", "Say something about {text}.",
            "--backend", "sim://?time_scale=0&seed=5&batch_delay=0.05",
            "--auto-deadline", "3600", "--batch-turnaround", "60",
            "--batch-poll-interval", "0.02", "--batch-linger", "0.05",
            "--prices", "prices.json", "--report", "r.json",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] == 8
    routes = report["provider_batch"]["auto"]
    assert routes["batch"]["calls"] == 8 and routes["online"]["calls"] == 0
    full = (report["prompt_tokens"] * 1000.0 + report["completion_tokens"] * 2000.0) / 1e6
    # Every call went at half price: the estimate is half the list price, the other half saved.
    assert report["estimated_cost"]["usd"] == pytest.approx(full / 2, rel=1e-6)
    assert report["saved_by_batch_api_usd"] == pytest.approx(full / 2, rel=1e-4)
    assert "saved by batch API" in proc.stdout


def test_cli_auto_deadline_and_provider_batch_exclude_each_other(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", "p.txt", "-o", "o.jsonl", "--backend", "sim://",
         "--provider-batch", "--auto-deadline", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "choose one" in proc.stderr
