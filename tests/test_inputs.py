"""Inputs and settings that must not break a run: ids that repeat or carry control characters,
out-of-range numbers, and JSON Schemas whose every keyword counts. Each is refused before any
request, naming the line, index or field, or (with dedupe) accounted for by a result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import FAST_SIM, one_line_error, read_results, run_cli, write_jsonl, write_prompts

from batchagent_rs import Batch, InputError, Result, SchemaError, _core, sim

FAST = "time_scale=0&seed=3"


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with sim.start(time_scale=0) as running:
        yield running


def requests(server: Any) -> int:
    return int(server.stats()["requests"]["total"])


def batch_on(server: Any, **options: Any) -> Batch:
    return Batch(
        "Say hi to {name}.",
        model="sim-model",
        backend="vllm://" + server.url.removeprefix("http://"),
        **options,
    )


def rows(*ids: Any) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{n}"} for n, i in enumerate(ids)]


def lazily(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from items


# -- ids ------------------------------------------------------------------------------------------


def test_repeated_ids_in_a_list_fail_before_any_request_naming_both_indexes(server: Any) -> None:
    before = requests(server)
    with pytest.raises(InputError, match=r"input 3: id \"a\" is also the id of input 0"):
        batch_on(server).run(rows("a", "b", "c", "a"))
    # An input without an id is known by its index, so an id "1" collides with input 1.
    with pytest.raises(InputError, match=r"input 2: id \"1\" is also the id of input 1"):
        batch_on(server).run([{"name": "x"}, {"name": "y"}, {"id": 1, "name": "z"}])
    assert requests(server) == before


def test_dedupe_keeps_the_first_and_reports_the_rest_as_skipped(server: Any) -> None:
    seen: list[Result] = []
    batch = batch_on(server, dedupe=True, on_result=seen.append)
    results = batch.run(rows("a", "b", "a", "c", "b"))
    assert [r.index for r in results] == [0, 1, 2, 3, 4], "every input is accounted for"
    assert [r.ok for r in results] == [True, True, False, True, False]
    for r, first in ((results[2], 0), (results[4], 1)):
        assert r.error is not None and r.error.kind == "duplicate", r
        assert f"id of input {first}" in r.error.message and r.attempts == 0
    assert sorted(r.index for r in seen) == [0, 1, 2, 3, 4]
    assert batch.report().raw["run"]["duplicates_skipped"] == 2
    assert batch.report().raw["run"]["jobs_ok"] == 3


def test_repeated_ids_fed_lazily_are_caught_as_they_come(server: Any) -> None:
    results = batch_on(server).run(lazily(rows("a", "b", "a")))
    assert [r.ok for r in results] == [True, True, False]
    error = results[2].error
    assert error is not None and error.kind == "bad_input" and "id of input 0" in error.message, error
    results = batch_on(server, dedupe=True).run(lazily(rows("a", "b", "a", "a")))
    assert [r.error.kind if r.error else "ok" for r in results] == ["ok", "ok", "duplicate", "duplicate"]


@pytest.mark.parametrize(
    "bad_id", ["a\r\nX-Injected: 1", "a\nb", "nul\x00", "tab\there", "del\x7f", "c1\x85"]
)
def test_an_id_with_a_control_character_is_refused_naming_the_index(server: Any, bad_id: str) -> None:
    before = requests(server)
    with pytest.raises(InputError, match=r"input 1: id .* contains the control character U\+00"):
        batch_on(server).run(rows("ok", bad_id))
    assert requests(server) == before
    results = batch_on(server).run(lazily(rows("ok", bad_id)))
    assert [r.ok for r in results] == [True, False]
    assert results[1].error is not None and results[1].error.kind == "bad_input"


# -- the CLI, with its journal --------------------------------------------------------------------


def test_cli_repeated_ids_fail_naming_both_lines_or_are_skipped_with_dedupe(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}],
    )
    line = one_line_error(run_cli("in.jsonl", "-o", "o.jsonl", "--backend", FAST_SIM, cwd=tmp_path))
    assert "in.jsonl" in line and "line 3" in line and "line 1" in line, line
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""

    # The journal is on (the CLI's default): every input gets exactly one line, the first "a" is
    # the one that ran, and a resume writes the same lines again, not more.
    proc = run_cli("in.jsonl", "-o", "d.jsonl", "--dedupe", "--backend", FAST_SIM, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "duplicate ids" in proc.stdout and "1 (skipped" in proc.stdout, proc.stdout
    results = sorted(read_results(tmp_path / "d.jsonl"), key=lambda r: r["index"])
    assert [(r["index"], r["id"], r["ok"]) for r in results] == [
        (0, "a", True),
        (1, "b", True),
        (2, "a", False),
    ]
    assert results[2]["error"]["kind"] == "duplicate" and "line 1" in results[2]["error"]["message"]
    proc = run_cli("in.jsonl", "-o", "d.jsonl", "--dedupe", "--resume", "--backend", FAST_SIM, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = sorted(read_results(tmp_path / "d.jsonl"), key=lambda r: r["index"])
    assert [(r["index"], r["ok"]) for r in again] == [(0, True), (1, True), (2, False)]

    (tmp_path / "run.toml").write_text('input = "in.jsonl"\noutput = "t.jsonl"\ndedupe = true\n')
    proc = run_cli("run.toml", "--backend", FAST_SIM, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(tmp_path / "t.jsonl")) == 3


def test_cli_id_with_a_line_break_names_the_line(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b\r\nX-Injected: 1", "prompt": "y"}]
    )
    line = one_line_error(
        run_cli("in.jsonl", "-o", "o.jsonl", "--dedupe", "--backend", FAST_SIM, cwd=tmp_path)
    )
    assert "line 2" in line and "U+000D" in line, line


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        (
            "max_inflight",
            -5,
            "invalid setting 'max_inflight': invalid value: integer `-5`, expected an integer from 0",
        ),
        ("max_turns", 2**40, "invalid setting 'max_turns': invalid value: integer `1099511627776`"),
        ("max_attempts", -1, "invalid setting 'max_attempts'"),
        ("validation_retries", -1, "invalid setting 'validation_retries'"),
        ("window", -1, "invalid setting 'window'"),
        ("max_tokens", -1, "invalid setting 'max_tokens'"),
        ("call_timeout", -1.0, "invalid setting 'call_timeout'"),
        ("agent_timeout", 0, "invalid setting 'agent_timeout'"),
        ("max_inflight", 0, "invalid setting 'max_inflight': must be at least 1"),
        ("tool_threads", 0, "invalid setting 'tool_threads'"),
        ("seed", -1, "invalid setting 'seed'"),
    ],
)
def test_out_of_range_settings_name_their_field(setting: str, value: Any, words: str) -> None:
    with pytest.raises(SchemaError) as caught:
        Batch("t {x}", backend=f"sim://?{FAST}", **{setting: value})
    assert words in str(caught.value)
    assert "line 1 column" not in str(caught.value)


# -- JSON Schema ----------------------------------------------------------------------------------


def test_an_invalid_pattern_is_a_schema_error_before_any_request(tmp_path: Path, server: Any) -> None:
    bad = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9+$"}}}
    with pytest.raises(SchemaError, match=r"/properties/code/pattern"):
        _core.check_schema(json.dumps(bad))
    before = requests(server)
    with pytest.raises(SchemaError):
        batch_on(server, output=bad).run(rows("a"))
    assert requests(server) == before
    (tmp_path / "schema.json").write_text(json.dumps(bad))
    write_prompts(tmp_path / "p.txt", 2)
    line = one_line_error(
        run_cli("p.txt", "-o", "o.jsonl", "--schema", "schema.json", "--backend", FAST_SIM, cwd=tmp_path)
    )
    assert "pattern" in line, line


def test_cli_schema_file_enforces_pattern(tmp_path: Path) -> None:
    # The simulator does not honour `pattern`: its words never match, so every job fails its
    # validation (after the retries that feed the violation back), naming the path.
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[0-9]+$"}},
        "required": ["code"],
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    write_prompts(tmp_path / "p.txt", 3)
    proc = run_cli("p.txt", "-o", "o.jsonl", "--schema", "schema.json", "--backend", FAST_SIM, cwd=tmp_path)
    # Every job failed: the command says so with exit status 1.
    assert proc.returncode == 1, proc.stderr
    results = read_results(tmp_path / "o.jsonl")
    assert len(results) == 3 and not any(r["ok"] for r in results), results
    assert all("/code" in r["error"]["message"] and "^[0-9]+$" in r["error"]["message"] for r in results), (
        results
    )
