"""batchagent_rs.ray: agents inside Ray Data's map_batches, on a local Ray cluster, against the
simulator."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pydantic
import pytest
import ray

from batchagent_rs import Batch, sim, tool
from batchagent_rs.ray import COLUMNS, AgentUDF, _rows

pytestmark = [
    # Ray Data's context warns about its own deprecated settings each time it is created.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray\.data\.context"),
    # Starting the local cluster and its actors takes tens of seconds on a loaded 2-core machine.
    pytest.mark.timeout(300),
]


class Label(pydantic.BaseModel):
    label: str
    confidence: float


@tool(cache=False)
def lookup(topic: str) -> str:
    """Look up notes on a topic."""
    return json.dumps({"topic": topic, "notes": "some notes"})


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # The tool and the schema are defined here, in a module the actors cannot import: send them by
    # value (a user's own modules reach the actors through Ray's runtime_env instead).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_agents_run_in_map_batches_and_come_back_as_columns(cluster: None) -> None:
    inputs = [{"id": f"rec-{i:03d}", "n": i, "topic": f"topic {i % 5}"} for i in range(60)]
    with sim.start(time_scale=0, tool_rounds=1, seed=3) as server:
        batch = Batch(
            "Record {n}: label {topic}. Look it up first.",
            system="You label records.",
            tools=[lookup],
            output=Label,
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_turns=4,
        )
        ds = ray.data.from_items(inputs)
        out = ds.map_batches(
            AgentUDF,
            fn_constructor_kwargs={"batch": batch},
            concurrency=2,
            batch_size=16,
            num_cpus=0.5,
        )
        rows = out.take_all()
        requests = server.stats()["requests"]["total"]
    assert set(rows[0]) == set(COLUMNS)
    assert sorted(r["id"] for r in rows) == [item["id"] for item in inputs]
    assert all(r["ok"] and r["error_kind"] is None and r["error_message"] is None for r in rows), rows[:3]
    for r in rows:
        Label.model_validate_json(r["output"])
        assert r["turns"] == 2, "one tool round, then the answer"
        assert r["usage"]["prompt_tokens"] > 0 and r["usage"]["completion_tokens"] > 0
    # Every model call of every actor reached the engine: two per agent.
    assert requests >= 2 * len(inputs)


def test_failed_agents_are_rows_with_an_error_kind(cluster: None) -> None:
    inputs = [{"id": f"bad-{i}", "n": i} for i in range(6)]
    with sim.start(time_scale=0, fault_500=1.0) as server:
        batch = Batch(
            "Record {n}.",
            model="sim-model",
            backend="vllm://" + server.url.removeprefix("http://"),
            max_attempts=1,
            warm_prefix=False,
        )
        rows = (
            ray.data.from_items(inputs)
            .map_batches(
                AgentUDF, fn_constructor_kwargs={"batch": batch}, concurrency=1, batch_size=4, num_cpus=0.5
            )
            .take_all()
        )
    assert sorted(r["id"] for r in rows) == sorted(item["id"] for item in inputs)
    for r in rows:
        assert not r["ok"] and r["output"] is None
        assert r["error_kind"] and r["error_message"]


def test_a_batch_with_a_journal_is_refused(tmp_path: Path) -> None:
    batch = Batch(
        "Record {n}.", model="sim-model", backend="vllm://127.0.0.1:9", journal=tmp_path / "j.sqlite"
    )
    with pytest.raises(ValueError, match="without a journal"):
        AgentUDF(batch)


def test_blocks_in_every_batch_format_give_the_same_inputs() -> None:
    expected = [{"id": "a", "n": 1, "tags": ["x"]}, {"id": "b", "n": 2, "tags": []}]
    numpy_block = {
        "id": np.array(["a", "b"]),
        "n": np.array([1, 2]),
        "tags": np.array([["x"], []], dtype=object),
    }
    assert _rows(numpy_block) == expected
    assert all(type(row["n"]) is int for row in _rows(numpy_block))
    assert _rows(pd.DataFrame(expected)) == expected
    assert _rows(pa.Table.from_pylist(expected)) == expected
    with pytest.raises(ValueError, match="differ in length"):
        _rows({"id": np.array(["a"]), "n": np.array([1, 2])})
