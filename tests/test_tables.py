"""Tables in and out: inputs from pyarrow, Hugging Face datasets and numpy record arrays, read a
chunk at a time; results as pandas, Arrow and Parquet, from Python and from `batchagent run -o`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from batchagent_rs import Batch, Result, results_to_arrow, results_to_pandas, write_parquet
from batchagent_rs.tables import RESULT_COLUMNS

FAST = "sim://?time_scale=0&seed=11"


def test_a_pyarrow_table_is_read_as_rows() -> None:
    table = pa.table({"id": [f"r{i}" for i in range(30)], "path": [f"f{i}.py" for i in range(29)] + [None]})
    results = Batch("Review {path}.", backend=FAST, max_turns=1).run(table)
    assert [r.id for r in results] == [f"r{i}" for i in range(30)]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


def test_a_record_batch_reader_is_pulled_as_the_window_frees_up() -> None:
    pulled: list[int] = []

    def batches() -> Iterator[pa.RecordBatch]:
        for b in range(20):
            pulled.append(b)
            yield pa.record_batch({"n": list(range(b * 100, (b + 1) * 100))})

    schema = pa.schema([("n", pa.int64())])
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    pulled_at_first_result: list[int] = []

    def first(result: Result) -> None:
        if not pulled_at_first_result:
            pulled_at_first_result.append(len(pulled))

    results = Batch("Say {n}.", backend=FAST, max_turns=1, window=8, lookahead=8, on_result=first).run(reader)
    assert sorted(r.index for r in results) == list(range(2000))
    # Lazily: when the first result came back, at most the first batch or two had been read.
    assert pulled_at_first_result[0] <= 2 and len(pulled) == 20


def test_a_hugging_face_dataset_is_read_as_rows() -> None:
    ds = datasets.Dataset.from_dict(
        {"text": [f"doc {i}" for i in range(25)], "label": [i % 2 for i in range(25)]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
        ),
    )
    seen: list[dict[str, Any]] = []
    results = Batch(
        "Classify {text} ({label}).", backend=FAST, max_turns=1, on_result=lambda r: seen.append(r.to_dict())
    ).run(ds)
    assert len(results) == 25 and all(r.ok for r in results)
    assert [r.index for r in results] == list(range(25))
    from batchagent_rs.batch import _rows

    rows = list(_rows(ds))
    assert rows[3] == {"text": "doc 3", "label": 1}


def test_a_numpy_record_array_is_read_as_rows() -> None:
    array = np.rec.fromarrays(
        [np.arange(12, dtype=np.int32), np.array([f"p{i}" for i in range(12)], dtype="S8")], names="n,name"
    )
    from batchagent_rs.batch import _rows

    rows = list(_rows(array))
    # Python scalars and text, not numpy ints and bytes.
    assert rows[5] == {"n": 5, "name": "p5"} and type(rows[5]["n"]) is int
    structured = np.zeros(3, dtype=[("x", "f8"), ("y", "i8")])
    assert list(_rows(structured)) == [{"x": 0.0, "y": 0}] * 3
    results = Batch("Item {name}: {n}.", backend=FAST, max_turns=1).run(array)
    assert len(results) == 12 and all(r.ok for r in results)


class Label(pydantic.BaseModel):
    label: str


def _results() -> list[Result]:
    schema_batch = Batch("Label {x}.", backend=FAST, max_turns=1, output=Label)
    return schema_batch.run([{"x": i} for i in range(6)])


def test_results_to_pandas_arrow_and_parquet(tmp_path: Path) -> None:
    results = _results()
    frame = results_to_pandas(results)
    assert list(frame.columns) == list(RESULT_COLUMNS) and len(frame) == 6
    assert frame["ok"].all() and isinstance(frame["output"][0], Label)
    assert (frame["prompt_tokens"] > 0).all()

    table = results_to_arrow(results)
    assert table.num_rows == 6 and table.schema.field("output").type == pa.string()
    assert json.loads(table.column("output")[0].as_py()) == results[0].output.model_dump()

    write_parquet(iter(results), tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.equals(table)


def test_report_to_pandas_is_one_flat_row() -> None:
    batch = Batch("Say {x}.", backend=FAST, max_turns=1)
    batch.run([{"x": i} for i in range(4)])
    frame = batch.report().to_pandas()
    assert len(frame) == 1
    assert frame.loc[0, "jobs"] == 4 and frame.loc[0, "ok"] == 4
    assert "latency_p50" in frame.columns and frame.loc[0, "latency_p50"] > 0
    assert len(pd.concat([frame, frame])) == 2


def test_run_file_writes_parquet(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"x": i}) + "\n" for i in range(40)))
    report = Batch("Label {x}.", backend=FAST, max_turns=1, output=Label).run_file(
        tmp_path / "in.jsonl", tmp_path / "out.parquet"
    )
    assert report.ok == 40
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.names == list(RESULT_COLUMNS)
    assert sorted(table.column("index").to_pylist()) == list(range(40))
    assert all("label" in json.loads(v) for v in table.column("output").to_pylist())
    # The JSONL the core streamed while running is gone once the Parquet file is complete.
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.parquet"]


def test_cli_output_parquet(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(15)))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / ".cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", "p.txt", "-o", "r.parquet", "--backend", FAST],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_parquet(tmp_path / "r.parquet")
    assert len(frame) == 15 and frame["ok"].all()
    assert not (tmp_path / "r.parquet.partial.jsonl").exists()
