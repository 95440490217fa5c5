"""Agents inside a Ray Data pipeline: `AgentUDF` runs a `Batch` over each block of a dataset.

    import ray
    from batchagent_rs import Batch
    from batchagent_rs.ray import AgentUDF

    ds = ray.data.read_parquet("s3://bucket/files/")
    results = ds.map_batches(
        AgentUDF,
        fn_constructor_kwargs={"batch": Batch("Review {path}", backend="vllm://gpu-1:8000", ...)},
        concurrency=4,
        batch_size=256,
    )

Each actor holds one event loop and runs every block it is given through the Rust scheduler on it
(the batch's `max_inflight` is per actor: four actors send up to four times as many requests).
A block's rows are the inputs (dicts of its columns, the task's `{fields}` filled from them); the
block returned has one row per input, in the same order, with the columns of `COLUMNS`. Ray itself
need not be imported here: Ray Data calls the class.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from .batch import Batch, Result

__all__ = ["COLUMNS", "AgentUDF"]

#: The columns of a result block: the input's id, whether it succeeded, the output as JSON text
#: (the validated object, or the final text without a schema; null when not ok), the error's kind
#: and message (null when ok), the tokens used, and the model turns taken.
COLUMNS = ("id", "ok", "output", "error_kind", "error_message", "usage", "turns")


class AgentUDF:
    """A Ray Data callable class running `batch` over each block (see the module docstring)."""

    def __init__(self, batch: Batch) -> None:
        if batch._options["journal"] is not None:
            raise ValueError(
                "AgentUDF runs a Batch without a journal: Ray Data re-runs a failed block itself, and "
                "actors on several machines cannot share one journal file (the Redis fleet resumes "
                "agents from their last turn instead: see deploy/README.md)"
            )
        self._batch = batch
        # One loop for the actor's life: the blocks it is given run one after the other on it.
        self._loop = asyncio.new_event_loop()

    def __call__(self, block: Any) -> dict[str, list[Any]]:
        rows = _rows(block)
        results = self._loop.run_until_complete(self._batch.arun(rows))
        return _columns(results)

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.close()


def _rows(block: Any) -> list[dict[str, Any]]:
    """The rows of a block in any of Ray Data's batch formats: a dict of columns (NumPy arrays or
    lists), a pandas DataFrame or a pyarrow Table. NumPy scalars become Python values."""
    if hasattr(block, "to_pylist"):  # pyarrow.Table
        return list(block.to_pylist())
    if hasattr(block, "to_dict") and hasattr(block, "columns"):  # pandas.DataFrame
        block = {name: block[name].to_numpy() for name in block.columns}
    if not isinstance(block, Mapping):
        raise TypeError(f"AgentUDF takes a block of columns, got {type(block).__name__}")
    columns = {name: _native(values) for name, values in block.items()}
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"the block's columns differ in length: {sorted(lengths)}")
    count = lengths.pop() if lengths else 0
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


def _native(values: Any) -> list[Any]:
    # ndarray.tolist() gives Python scalars (and nested lists for array cells) in one call.
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    return [item.tolist() if hasattr(item, "tolist") else item for item in items]


def _columns(results: list[Result]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for r in results:
        row = r.to_dict()
        out["id"].append(r.id)
        out["ok"].append(r.ok)
        out["output"].append(_output_json(r, row))
        out["error_kind"].append(None if r.error is None else r.error.kind)
        out["error_message"].append(None if r.error is None else r.error.message)
        out["usage"].append(row["usage"])
        out["turns"].append(r.turns)
    return out


def _output_json(result: Result, row: Mapping[str, Any]) -> str | None:
    if not result.ok:
        return None
    value = row["output"] if row["output"] is not None else row["text"]
    return json.dumps(value, ensure_ascii=False)
