"""OpenTelemetry traces (`Batch(trace=)`, `batchagent run --trace`): a span per job, per model call and
per tool call, with the GenAI semantic conventions' attributes, against the simulator."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from first_call_waits import FirstCallWaits
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from batchagent_rs import Batch, Population, tool, tracing


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def lookup() -> Any:
    @tool(cache=False)
    def lookup(query: str) -> str:
        """Look something up."""
        return f"about {query}"

    return lookup


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_each_job_is_a_tree_of_its_model_and_tool_calls_with_the_results_usage(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    batch = Batch(
        "Research {topic}.",
        tools=[lookup()],
        backend="sim://?time_scale=0&seed=3&tool_rounds=2&parallel_tool_calls=2",
        max_turns=6,
        max_tokens=300,
        trace=provider,
    )
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("evaluation") as root:
        results = batch.run([{"id": f"job-{i}", "topic": f"t{i}"} for i in range(5)])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    spans = list(exporter.get_finished_spans())
    jobs = [s for s in spans if s.name == "invoke_agent"]
    assert len(jobs) == len(results)
    by_id = {attrs(s)["batchagent.job.id"]: s for s in jobs}
    for result in results:
        job = by_id[result.id]
        # Under the span that was current when the run started: one trace.
        assert job.parent is not None and job.parent.span_id == root.get_span_context().span_id
        assert job.context.trace_id == root.get_span_context().trace_id
        a = attrs(job)
        assert a["gen_ai.operation.name"] == "invoke_agent"
        assert a["gen_ai.provider.name"] == "batchagent.sim"
        assert a["gen_ai.request.model"] == "sim-model"
        assert a["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
        assert a["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
        assert job.status.status_code == StatusCode.UNSET
        below = children(spans, job)
        calls = sorted((s for s in below if s.name == "chat sim-model"), key=lambda s: s.start_time or 0)
        tools = [s for s in below if s.name == "execute_tool lookup"]
        assert len(calls) == result.turns == 3
        assert len(tools) == result.tool_calls == 4
        assert len(below) == len(calls) + len(tools)
        # Token counts are the usage of the result, call by call.
        assert sum(attrs(c)["gen_ai.usage.input_tokens"] for c in calls) == result.usage.prompt_tokens
        assert sum(attrs(c)["gen_ai.usage.output_tokens"] for c in calls) == result.usage.completion_tokens
        assert (
            sum(attrs(c)["gen_ai.usage.cache_read.input_tokens"] for c in calls) == result.usage.cached_tokens
        )
        assert result.usage.cached_tokens > 0  # the shared prompt of the later turns
        for turn, call in enumerate(calls):
            c = attrs(call)
            assert call.kind == SpanKind.CLIENT
            assert c["gen_ai.operation.name"] == "chat"
            assert c["gen_ai.provider.name"] == "batchagent.sim"
            assert c["gen_ai.request.model"] == "sim-model"
            assert c["gen_ai.request.max_tokens"] == 300
            assert c["gen_ai.request.stream"] is True
            assert c["server.address"] == "127.0.0.1" and isinstance(c["server.port"], int)
            assert c["batchagent.turn"] == turn and c["batchagent.attempts"] == 1
            expected = ("stop",) if turn == 2 else ("tool_calls",)
            assert tuple(c["gen_ai.response.finish_reasons"]) == expected
            assert 0 <= c["gen_ai.response.time_to_first_chunk"] <= (call.end_time - call.start_time) / 1e9
        # The job's time to first token is its first call's.
        assert attrs(calls[0])["gen_ai.response.time_to_first_chunk"] == pytest.approx(result.ttft)
        for span in tools:
            t = attrs(span)
            assert t["gen_ai.operation.name"] == "execute_tool"
            assert t["gen_ai.tool.name"] == "lookup" and t["gen_ai.tool.type"] == "function"
            assert t["gen_ai.tool.call.id"]
            # A tool call starts once its model call has begun, and its turn's next call waits for it.
            turn = t["batchagent.turn"]
            assert calls[turn].start_time <= span.start_time <= span.end_time <= calls[turn + 1].start_time
        assert len({attrs(s)["gen_ai.tool.call.id"] for s in tools}) == len(tools)
        for span in below:
            assert job.start_time <= span.start_time <= span.end_time <= job.end_time


def test_a_call_that_keeps_failing_is_one_error_span_with_its_attempts(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    batch = Batch(
        "Say {n}.",
        backend="sim://?time_scale=0&seed=1&fault_500=1",
        max_attempts=2,
        trace=provider,
    )
    results = batch.run([{"n": 1}])
    assert not results[0].ok and results[0].error is not None
    kind = results[0].error.kind
    spans = list(exporter.get_finished_spans())
    (job,) = [s for s in spans if s.name == "invoke_agent"]
    (call,) = children(spans, job)
    assert job.status.status_code == StatusCode.ERROR and attrs(job)["error.type"] == kind
    assert call.status.status_code == StatusCode.ERROR
    assert attrs(call)["error.type"] == "server_error"
    assert attrs(call)["batchagent.attempts"] == 2
    assert "gen_ai.usage.input_tokens" not in attrs(call)


def test_untraced_unless_asked_or_a_provider_is_configured() -> None:
    # No global tracer provider in this process: `trace=None` records nothing.
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)
    assert tracing.resolve_tracer_provider(None) is None
    assert tracing.resolve_tracer_provider(False) is None
    assert tracing.resolve_tracer_provider(True) is otel_trace.get_tracer_provider()
    with pytest.raises(TypeError, match="trace="):
        Batch("x", backend="sim://", trace="yes")  # type: ignore[arg-type]


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_cli_exports_over_otlp_to_the_configured_endpoint(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    bodies: list[bytes] = []
    handler = type("Collector", (_Collector,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
        (tmp_path / "job.toml").write_text(
            'input = "prompts.txt"\nbackend = "sim://?time_scale=0&seed=2"\ntrace = true\nquiet = true\n'
        )
        env = dict(os.environ)
        env["XDG_CACHE_HOME"] = str(tmp_path / ".cache")
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}/v1/traces"
        env["OTEL_SERVICE_NAME"] = "nightly-eval"
        done = subprocess.run(
            [sys.executable, "-m", "batchagent_rs.cli", "run", "job.toml", "--no-cache"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    names: list[str] = []
    services: set[str] = set()
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                names.extend(span.name for span in scope_spans.spans)
    assert sorted(names) == sorted(["invoke_agent"] * 3 + ["chat sim-model"] * 3)
    assert services == {"nightly-eval"}


def test_a_population_traces_a_span_per_tick_with_a_decision_span_per_agent(
    traced: tuple[TracerProvider, InMemorySpanExporter], first_call_waits: FirstCallWaits
) -> None:
    provider, exporter = traced
    research, release = first_call_waits.tool, first_call_waits.release

    ids = ["p", "q", "r"]
    tracer = provider.get_tracer("simulation")
    with Population(
        ids,
        tools=[research],
        backend="sim://?time_scale=0&seed=7&tool_rounds=1&distinct_args=100",
        deadline=3.0,
        trace=provider,
    ) as pop:
        with tracer.start_as_current_span("simulation"):
            first = pop.step({a: f"news for {a}" for a in ids})
            late = [a for a, r in first.items() if not r.ok]
            assert len(late) == 1, first
            release.set()
            pop.drain()
            # The late agent's first tick left no turn in its history, so it would make its tool
            # round again: the second tick steps the agents that answered in time.
            on_time = [a for a in ids if a not in late]
            second = pop.step({a: "more news" for a in on_time})
            assert all(r.ok for r in second.values()), second
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "simulation"]
    ticks = sorted(
        (s for s in spans if s.name == "population.tick"), key=lambda s: attrs(s)["batchagent.tick"]
    )
    assert [attrs(t)["batchagent.tick"] for t in ticks] == [1, 2]
    assert all(t.parent is not None and t.parent.span_id == root.context.span_id for t in ticks)
    assert [attrs(t)["batchagent.tick.agents"] for t in ticks] == [3, 2]
    assert [attrs(t)["batchagent.tick.deadline_misses"] for t in ticks] == [1, 0]
    assert ticks[0].status.status_code == StatusCode.ERROR
    assert ticks[1].status.status_code == StatusCode.UNSET
    # Every decision is an invoke_agent span under its tick's span, the late one included.
    decisions = [children(spans, t) for t in ticks]
    assert sorted(attrs(s)["gen_ai.agent.id"] for s in decisions[0]) == ids
    assert sorted(attrs(s)["gen_ai.agent.id"] for s in decisions[1]) == on_time
    # The scripted agents make one tool round per conversation: in the first tick a model call,
    # the tool, the answering call; in the second one call.
    expected = [["chat sim-model", "chat sim-model", "execute_tool research"], ["chat sim-model"]]
    for tick, under, calls in zip(ticks, decisions, expected, strict=True):
        for decision in under:
            assert decision.name == "invoke_agent"
            assert attrs(decision)["batchagent.tick"] == attrs(tick)["batchagent.tick"]
            assert sorted(s.name for s in children(spans, decision)) == calls
    late_spans = [s for s in decisions[0] if attrs(s).get("batchagent.late_answer")]
    assert [attrs(s)["gen_ai.agent.id"] for s in late_spans] == late
    # The late decision ended after its tick returned.
    assert late_spans[0].end_time is not None and ticks[0].end_time is not None
    assert late_spans[0].end_time > ticks[0].end_time
