"""Tables in and out: inputs read from a pandas DataFrame, a pyarrow Table, a Hugging Face
`datasets.Dataset` or a numpy record array, a chunk at a time; results as a pandas DataFrame, an
Arrow table or a Parquet file.

None of these libraries is a dependency: an input is recognised by its type's module and name, and
the library is imported only when a result table is asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import Result, RunReport

__all__ = ["read_jsonl_to_parquet", "results_to_arrow", "results_to_pandas", "rows", "write_parquet"]

# Rows converted per chunk: large enough that the per-chunk conversion is cheap per row, small
# enough that a million-row table is never copied into Python objects whole.
CHUNK = 4096

# The columns of a result table, in order. `output` is the JSON text of the validated output (or
# the answer text as a JSON string) in Arrow and Parquet, whose columns have one type each; a
# DataFrame holds the Python value itself.
RESULT_COLUMNS = (
    "id",
    "index",
    "ok",
    "output",
    "text",
    "error_kind",
    "error_message",
    "error_retryable",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cache_creation_tokens",
    "turns",
    "tool_calls",
    "attempts",
    "repaired",
    "finish_reason",
    "truncated",
    "ttft",
    "total",
)


# -- inputs -------------------------------------------------------------------------------------


def _kind(inputs: object) -> str | None:
    cls = type(inputs)
    module, name = cls.__module__, cls.__name__
    if all(hasattr(inputs, n) for n in ("columns", "iloc", "to_dict", "itertuples")):
        return "pandas"
    if module.startswith("pyarrow") and name in ("Table", "RecordBatch"):
        return "arrow"
    if module.startswith("pyarrow") and name == "RecordBatchReader":
        return "arrow_reader"
    if module.startswith("datasets") and name == "Dataset":
        return "dataset"
    names = getattr(getattr(inputs, "dtype", None), "names", None)
    if module.startswith("numpy") and names:
        return "numpy"
    return None


def rows(inputs: Any) -> Any:
    """The inputs as an iterable of dicts: tables become generators that convert a chunk of rows
    at a time (so they are read lazily, as any other iterator); anything else is returned as is."""
    kind = _kind(inputs)
    if kind == "pandas":
        return _frame_rows(inputs)
    if kind == "arrow":
        return _arrow_rows(inputs.to_batches(max_chunksize=CHUNK))
    if kind == "arrow_reader":
        return _arrow_rows(inputs)
    if kind == "dataset":
        return _dataset_rows(inputs)
    if kind == "numpy":
        return _numpy_rows(inputs)
    return inputs


def _frame_rows(frame: Any) -> Iterator[dict[str, Any]]:
    for start in range(0, len(frame), CHUNK):
        for row in frame.iloc[start : start + CHUNK].to_dict("records"):
            yield {str(k): _cell(v) for k, v in row.items()}


def _cell(value: Any) -> Any:
    """A DataFrame's missing values (NaN, NaT, pd.NA) become None (JSON null)."""
    if isinstance(value, float) and value != value:
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def _arrow_rows(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        # A reader's batches can be of any size; converting a slice at a time bounds the copies.
        for start in range(0, batch.num_rows, CHUNK):
            yield from batch.slice(start, CHUNK).to_pylist()


def _dataset_rows(dataset: Any) -> Iterator[dict[str, Any]]:
    # `iter` reads the Arrow files a batch at a time and decodes features (ClassLabel, ...) as
    # iterating row by row does, at a fraction of the per-row cost.
    for columns in dataset.iter(batch_size=CHUNK):
        names = list(columns)
        for values in zip(*(columns[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _numpy_rows(array: Any) -> Iterator[dict[str, Any]]:
    names = array.dtype.names
    flat = array.reshape(-1)
    for start in range(0, len(flat), CHUNK):
        # `tolist` turns each record into a tuple of Python scalars (numpy ints are no JSON).
        for record in flat[start : start + CHUNK].tolist():
            yield {name: _numpy_value(v) for name, v in zip(names, record, strict=True)}


def _numpy_value(value: Any) -> Any:
    # Fixed-width byte strings (dtype "S") are how record arrays commonly hold text.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def count(inputs: Any) -> int | None:
    """How many inputs, when the source knows without being read."""
    if _kind(inputs) == "arrow_reader":
        return None
    try:
        return len(inputs)
    except TypeError:
        return None


# -- results ------------------------------------------------------------------------------------


def _record(result: Result) -> dict[str, Any]:
    error, usage = result.error, result.usage
    return {
        "id": result.id,
        "index": result.index,
        "ok": result.ok,
        "output": result.output,
        "text": result.text,
        "error_kind": None if error is None else error.kind,
        "error_message": None if error is None else error.message,
        "error_retryable": None if error is None else error.retryable,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.cached_tokens,
        "completion_tokens": usage.completion_tokens,
        "cache_creation_tokens": usage.cache_creation_tokens,
        "turns": result.turns,
        "tool_calls": result.tool_calls,
        "attempts": result.attempts,
        "repaired": result.repaired,
        "finish_reason": result.finish_reason,
        "truncated": result.truncated,
        "ttft": result.ttft,
        "total": result.total,
    }


def results_to_pandas(results: Iterable[Result]) -> Any:
    """One row per result, columns as `RESULT_COLUMNS` (usage and error flattened); `output` holds
    the Python value (a pydantic model, a dict, or the answer text)."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("results_to_pandas needs pandas (pip install pandas)") from exc
    return pd.DataFrame([_record(r) for r in results], columns=list(RESULT_COLUMNS))


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("index", pa.int64()),
            ("ok", pa.bool_()),
            ("output", pa.string()),
            ("text", pa.string()),
            ("error_kind", pa.string()),
            ("error_message", pa.string()),
            ("error_retryable", pa.bool_()),
            ("prompt_tokens", pa.int64()),
            ("cached_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("cache_creation_tokens", pa.int64()),
            ("turns", pa.int64()),
            ("tool_calls", pa.int64()),
            ("attempts", pa.int64()),
            ("repaired", pa.bool_()),
            ("finish_reason", pa.string()),
            ("truncated", pa.bool_()),
            ("ttft", pa.float64()),
            ("total", pa.float64()),
        ]
    )


def _output_json(value: Any) -> str | None:
    if value is None:
        return None
    dump = getattr(value, "model_dump_json", None)
    if dump is not None:
        return dump()  # type: ignore[no-any-return]
    return json.dumps(value, ensure_ascii=False)


def require_pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            "Arrow and Parquet results need pyarrow (pip install 'batchagent[parquet]')"
        ) from exc
    return pa, pq


def _arrow_chunk(records: list[dict[str, Any]]) -> Any:
    pa, _ = require_pyarrow()
    for record in records:
        record["output"] = _output_json(record["output"])
    return pa.Table.from_pylist(records, schema=_schema())


def results_to_arrow(results: Iterable[Result]) -> Any:
    """A `pyarrow.Table` of the results (see `RESULT_COLUMNS`; `output` as JSON text)."""
    require_pyarrow()
    return _arrow_chunk([_record(r) for r in results])


def write_parquet(results: Iterable[Result], path: str | os.PathLike[str]) -> None:
    """Writes the results to a Parquet file (the columns of `results_to_arrow`), a row group per
    4,096 results, so an iterator of results is never held whole."""
    _, pq = require_pyarrow()
    with pq.ParquetWriter(os.fspath(path), _schema()) as writer:
        chunk: list[dict[str, Any]] = []
        for result in results:
            chunk.append(_record(result))
            if len(chunk) == CHUNK:
                writer.write_table(_arrow_chunk(chunk))
                chunk = []
        if chunk:
            writer.write_table(_arrow_chunk(chunk))


def _line_record(line: dict[str, Any]) -> dict[str, Any]:
    """A result line of the JSONL output (see `Result.to_dict`) as a row of the result table."""
    error = line.get("error") or {}
    usage = line.get("usage") or {}
    output = line.get("output")
    return {
        "id": line.get("id"),
        "index": line.get("index"),
        "ok": line.get("ok"),
        "output": None if output is None else json.dumps(output, ensure_ascii=False),
        "text": line.get("text"),
        "error_kind": error.get("kind"),
        "error_message": error.get("message"),
        "error_retryable": error.get("retryable"),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_tokens": usage.get("cached_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cache_creation_tokens": usage.get("cache_creation_tokens", 0),
        "turns": line.get("turns", 0),
        "tool_calls": line.get("tool_calls", 0),
        "attempts": line.get("attempts", 0),
        "repaired": line.get("repaired", False),
        "finish_reason": line.get("finish_reason"),
        "truncated": line.get("truncated", False),
        "ttft": line.get("ttft"),
        "total": line.get("total", 0.0),
    }


def read_jsonl_to_parquet(source: str, path: str) -> int:
    """Converts a JSONL result file to Parquet a row group at a time; returns the rows written.
    The Parquet file is written beside `path` and renamed over it once complete."""
    pa, pq = require_pyarrow()
    schema = _schema()
    partial = path + ".tmp"
    written = 0
    with open(source, encoding="utf-8") as fh, pq.ParquetWriter(partial, schema) as writer:
        chunk: list[dict[str, Any]] = []
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                chunk.append(_line_record(json.loads(line)))
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"{source}: line {number}: not a result record: {exc}") from exc
            if len(chunk) == CHUNK:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                written += len(chunk)
                chunk = []
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            written += len(chunk)
    os.replace(partial, path)
    return written


def report_to_pandas(report: RunReport) -> Any:
    """The report as a one-row DataFrame; nested figures are flattened (`ttft_p50`,
    `errors_by_kind_timeout`), so the reports of several runs concatenate into one table."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("RunReport.to_pandas needs pandas (pip install pandas)") from exc
    return pd.json_normalize(report.to_dict(), sep="_")
