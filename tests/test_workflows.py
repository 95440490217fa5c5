"""reduce and plan -> map -> reduce against the simulator: one call when the items fit, a tree of
calls within the context window when they do not (the simulator refuses a longer prompt, as vLLM
does), usage summed over the tree, plans checked against the worker's task variables, and a
workflow killed with SIGKILL in its map or its reduce stage that, run again, sends only what it
had no answer for."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydantic
import pytest

from batchagent_rs import InputError, Result, Usage, reduce, sim
from batchagent_rs.workflows import _check_plan


class Summary(pydantic.BaseModel):
    title: str
    points: list[str]


def vllm(server: sim.Simulator) -> str:
    return "vllm://" + server.url.removeprefix("http://")


def test_items_that_fit_one_context_are_reduced_in_one_call() -> None:
    failed = Result(
        id="x", index=9, ok=False, output=None, error=None, usage=Usage(), turns=0, tool_calls=0, attempts=1,
        ttft=None, total=0.0,
    )  # fmt: skip
    items = ["the sky is blue", Summary(title="grass", points=["green"]), {"note": "water is wet"}, failed]
    with sim.start(time_scale=0, seed=1) as server:
        result = reduce(
            items, task="Summarise the facts.", output=Summary, backend=vllm(server), model="sim-model"
        )
        sent = server.stats()["requests"]["total"]
    assert result.ok, result.error
    assert isinstance(result.output, Summary)
    assert sent == 1 and result.turns == 1
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


def test_items_beyond_one_context_are_reduced_as_a_tree_within_the_window() -> None:
    items = [f"Finding {i}: " + "the measurements agree with the model within error " * 6 for i in range(120)]
    with sim.start(time_scale=0, seed=2, max_model_len=2048, output_tokens="fixed:30") as server:
        result = reduce(
            items, task="Summarise the findings.", output=Summary, backend=vllm(server), model="sim-model",
            fan_in=16, max_tokens=300,
        )  # fmt: skip
        stats = server.stats()
    assert result.ok, result.error
    assert isinstance(result.output, Summary)
    # 120 items of ~90 tokens cannot share one 2048-token context: several groups, then their
    # outputs; every prompt fitted (the simulator refuses one that does not, as vLLM does).
    calls = stats["requests"]["total"]
    assert calls == result.turns >= 120 * 90 // 2048 + 1
    assert stats["requests"]["by_status"] == {"200": calls}
    assert result.usage.prompt_tokens == stats["tokens"]["prompt"]
    assert result.usage.completion_tokens == stats["tokens"]["completion"]


def test_fan_in_bounds_the_groups_when_everything_fits() -> None:
    with sim.start(time_scale=0, seed=3) as server:
        result = reduce(
            [f"fact {i}" for i in range(20)], task="Combine.", backend=vllm(server), model="m", fan_in=4
        )
        calls = server.stats()["requests"]["total"]
    assert result.ok
    # 20 -> 5 -> 2 -> 1.
    assert calls == result.turns == 5 + 2 + 1


def test_a_plan_item_without_a_task_variable_is_named() -> None:
    assert _check_plan([{"path": "a", "lang": "en"}], ["path", "lang"]) == [{"path": "a", "lang": "en"}]
    with pytest.raises(InputError, match=r"plan item 1 has no 'lang'.*\{lang\}.*has: path"):
        _check_plan([{"path": "a", "lang": "en"}, {"path": "b"}], ["path", "lang"])


def test_bad_reduce_settings_fail_before_any_request() -> None:
    from batchagent_rs import SchemaError

    with pytest.raises(SchemaError, match="fan_in"):
        reduce(["a"], task="t", backend="sim://", fan_in=1)
    with pytest.raises(TypeError, match="task"):
        reduce(["a"], task="", backend="sim://")
    with pytest.raises(ValueError, match="no items"):
        reduce([], task="t", backend="sim://")


N = 300
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plan_map_reduce.py"


def requests(server: sim.Simulator) -> int:
    return int(server.stats()["requests"]["total"])


def journal_count(path: Path, sql: str) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("stage", ["map", "reduce"])
def test_a_workflow_killed_in_a_stage_resumes_without_sending_what_it_has(tmp_path: Path, stage: str) -> None:
    journal = tmp_path / "workflow.sqlite"
    map_done = "SELECT count(*) FROM results"
    reduce_done = "SELECT count(*) FROM workflow WHERE key LIKE 'reduce/%'"
    with (
        sim.start(time_scale=0, seed=6) as planner,
        sim.start(time_scale=0.5, seed=7, output_tokens="uniform:8:24") as work,
        sim.start(time_scale=0.5, seed=8, output_tokens="fixed:40") as reducer,
    ):
        args = [sys.executable, str(EXAMPLE), vllm(planner), vllm(work), vllm(reducer), str(journal), str(N)]
        first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        try:
            while True:
                if stage == "map" and journal_count(journal, map_done) >= N // 3:
                    break
                if stage == "reduce" and journal_count(journal, reduce_done) >= 2:
                    break
                assert first.poll() is None, f"the workflow ended before it could be killed: {first.stderr}"
                assert time.monotonic() < deadline, "the workflow made no progress"
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
            if first.stderr is not None:
                first.stderr.close()
        assert first.returncode == -signal.SIGKILL
        mapped, reduced = journal_count(journal, map_done), journal_count(journal, reduce_done)
        planned = requests(planner)
        work_before, reduce_before = requests(work), requests(reducer)

        second = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 0, second.stderr
        work_after, reduce_after = requests(work) - work_before, requests(reducer) - reduce_before
        plan_after = requests(planner) - planned
    summary = json.loads(second.stdout)
    assert summary["inputs"] == N and summary["ok"] == N and summary["reduced"]
    # Not planned again, no finished map job sent again (one call each), no finished reduce group.
    assert planned == 1 and plan_after == 0
    assert work_after == N - mapped, (work_after, mapped)
    assert reduce_after == summary["reduce_calls"] - reduced, (reduce_after, reduced, summary)
    if stage == "reduce":
        assert mapped == N and work_after == 0


def test_the_cli_writes_the_reduced_output_beside_the_results(tmp_path: Path) -> None:
    (tmp_path / "notes.py").write_text(
        "import pydantic\n\nclass Summary(pydantic.BaseModel):\n    title: str\n    points: list[str]\n"
    )
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Note {i}."}) + "\n" for i in range(40))
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / ".cache"))
    with sim.start(time_scale=0, seed=4) as server:
        command = [
            sys.executable, "-m", "batchagent_rs.cli", "run", "in.jsonl", "-o", "out.jsonl",
            "-m", "sim-model", "--backend", vllm(server), "--reduce-task", "Summarise the notes.",
            "--reduce-schema", "notes:Summary", "--reduce-fan-in", "8", "--quiet",
        ]  # fmt: skip
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        sent = server.stats()["requests"]["total"]
        # Run again with --resume: nothing is sent, the reduce groups come from the journal.
        again = subprocess.run(
            [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        assert server.stats()["requests"]["total"] == sent
    reduced = json.loads((tmp_path / "out.reduced.json").read_text())
    assert reduced["ok"] and set(reduced["output"]) == {"title", "points"}
    # 40 results, 8 a group: 5 groups, then one over their outputs.
    assert reduced["turns"] == 6 and sent == 40 + 6
    lone = subprocess.run(
        [*command[:11], "--reduce-schema", "notes:Summary"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert lone.returncode == 2 and "--reduce-schema needs --reduce-task" in lone.stderr
