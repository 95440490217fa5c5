"""Cached and retried answers are the right answers: a server error that the request itself causes
is not retried as if it were transient, and answers from the response cache are not counted as model
calls."""

from __future__ import annotations

from pathlib import Path

import pydantic

from batchagent_rs import Batch, sim


class Label(pydantic.BaseModel):
    label: str
    confidence: float


def backend_of(server: sim.Simulator) -> str:
    return "vllm://" + server.url.removeprefix("http://")


def test_a_failed_grammar_parse_is_retried_once_then_the_schema_goes_into_the_prompt() -> None:
    n = 12
    # Every grammar-constrained request fails its own output parser (llama.cpp's HTTP 500), every
    # time it is sent; the same job without `response_format` succeeds.
    with sim.start(time_scale=0, seed=5, fault_grammar=1.0) as server:
        batch = Batch(
            "Label record {i}.", output=Label, backend=backend_of(server), model="sim-model", max_attempts=6
        )
        results = batch.run([{"i": i} for i in range(n)])
        stats = server.stats()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:2]
    assert all(isinstance(r.output, Label) for r in results)
    # One retry of the constrained request, then one request with the schema in the prompt.
    assert stats["faults"]["grammar"] == 2 * n
    assert stats["requests"]["total"] == 3 * n
    report = batch.report()
    assert report.schema_fallbacks == n
    assert report.model_calls == 3 * n
    assert report.retries == n


def test_a_request_fault_without_a_fallback_fails_after_one_retry() -> None:
    n = 4
    with sim.start(time_scale=0, seed=5, fault_grammar=1.0) as server:
        # The schema is already in the prompt: nothing to fall back to.
        batch = Batch(
            "Label record {i}.",
            output=Label,
            backend=backend_of(server),
            model="sim-model",
            max_attempts=6,
            schema_mode="prompt",
        )
        results = batch.run([{"i": i} for i in range(n)])
        assert all(r.ok for r in results)
        assert server.stats()["requests"]["total"] == n
    with sim.start(time_scale=0, seed=5, fault_grammar=1.0) as server:
        batch = Batch(
            "Label record {i}.", output=Label, backend=backend_of(server), model="sim-model", max_attempts=1
        )
        results = batch.run([{"i": i} for i in range(n)])
    # max_attempts=1: no retry and no fallback; the error says it is not transient.
    assert not any(r.ok for r in results)
    error = results[0].error
    assert error is not None and not error.retryable
    assert "does not match the expected" in error.message


def test_answers_from_the_response_cache_are_not_model_calls(tmp_path: Path) -> None:
    n = 10
    cache = tmp_path / "responses.sqlite"
    with sim.start(time_scale=0, seed=2) as server:
        first = Batch("Say hi to {i}.", backend=backend_of(server), model="sim-model", response_cache=cache)
        first.run([{"i": i} for i in range(n)])
        assert first.report().model_calls == n
        second = Batch("Say hi to {i}.", backend=backend_of(server), model="sim-model", response_cache=cache)
        second.run([{"i": i} for i in range(n)])
        report = second.report()
        assert server.stats()["requests"]["total"] == n
    assert report.model_calls == 0
    assert report.response_cache_hits == n
    assert "response cache" in report.table()


def test_another_model_behind_the_same_name_and_url_is_a_cache_miss(tmp_path: Path) -> None:
    n = 6
    cache = tmp_path / "responses.sqlite"

    def run(server: sim.Simulator) -> Batch:
        batch = Batch("Say hi to {i}.", backend=backend_of(server), model="sim-model", response_cache=cache)
        batch.run([{"i": i} for i in range(n)])
        return batch

    with sim.start(time_scale=0, seed=2, model_root="checkpoint-a") as server:
        port = int(server.url.rsplit(":", 1)[1])
        run(server)
        assert run(server).report().response_cache_hits == n, "same endpoint, same model: hits"
    # The same URL and model name, another checkpoint behind them (`root` in /v1/models).
    with sim.start(time_scale=0, seed=2, model_root="checkpoint-b", port=port) as server:
        report = run(server).report()
        assert server.stats()["requests"]["total"] == n
    assert report.response_cache_hits == 0
    assert report.model_calls == n
