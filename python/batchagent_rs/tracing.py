"""OpenTelemetry traces of a run (`pip install 'batchagent[otel]'`), following the GenAI semantic
conventions: a span per job (`invoke_agent`), and under it a span per model call (`chat {model}`) and
per tool call (`execute_tool {name}`). A `Population` adds a span per tick (`population.tick`) with
its agents' decisions (`invoke_agent`, one per agent step) under it.

The core records each job's calls (start and end times, tokens, time to first token, errors) only
when the run is traced; the spans are made here from those records as each job finishes, with the
recorded times and the job's span as their parent. The job spans are children of the span that was
current when the run started, so a run inside `with tracer.start_as_current_span("eval"):` is one
trace."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._core import __version__

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import Span, TracerProvider

    #: Given a finished job's record: the context its span goes under and attributes to add.
    Placement: TypeAlias = Callable[[dict[str, Any]], tuple[Context, dict[str, Any]]]

__all__ = ["SpanWriter", "otlp_tracer_provider", "resolve_tracer_provider"]

# `gen_ai.provider.name` by URL scheme: the conventions' names where they have one.
_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "vllm": "vllm",
    "sglang": "sglang",
    "dynamo": "nvidia.dynamo",
    "ollama": "ollama",
    "llamacpp": "llama.cpp",
    "sim": "batchagent.sim",
    "local": "batchagent.local",
}


def resolve_tracer_provider(trace: object) -> TracerProvider | None:
    """The tracer provider a run's spans go to, or None for an untraced run.

    `trace=None` traces when OpenTelemetry is installed and the application configured a tracer
    provider (`trace.set_tracer_provider`, or `opentelemetry-instrument`); `True` always traces
    (through the global provider); `False` never; a `TracerProvider` traces into that provider."""
    if trace is False:
        return None
    try:
        from opentelemetry import trace as otel
    except ImportError:
        if trace is None:
            return None
        raise ImportError("trace=: OpenTelemetry is not installed; pip install 'batchagent[otel]'") from None
    if trace is None or trace is True:
        provider = otel.get_tracer_provider()
        if trace is None and isinstance(provider, otel.ProxyTracerProvider | otel.NoOpTracerProvider):
            return None
        return provider
    if isinstance(trace, otel.TracerProvider):
        return trace
    raise TypeError(f"trace=: expected None, True, False or an OpenTelemetry TracerProvider, got {trace!r}")


def otlp_tracer_provider() -> SdkTracerProvider:
    """An SDK tracer provider exporting over OTLP (HTTP/protobuf) in batches, configured by the
    standard environment variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, ...). The caller
    shuts it down (which flushes what is left)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ImportError("--trace: OpenTelemetry is not installed; pip install 'batchagent[otel]'") from None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "batchagent"}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _provider_name(backends: list[str]) -> str:
    # `openai+http://` is the OpenAI protocol over plain HTTP.
    schemes = {b.split("://", 1)[0].split("+", 1)[0].strip().lower() for b in backends}
    names = {_PROVIDERS.get(scheme, "_OTHER") for scheme in schemes}
    # A fleet of mixed kinds has no one provider.
    return names.pop() if len(names) == 1 else "_OTHER"


def _server(backends: list[str], sim_url: str | None) -> tuple[str, int | None] | None:
    """`server.address` and `server.port` of a single backend whose URL names its host."""
    if len(backends) != 1:
        return None
    url = sim_url or backends[0]
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    return host, port


class SpanWriter:
    """Makes the spans of finished jobs from the core's records (`Run.take_traces`)."""

    def __init__(
        self,
        provider: TracerProvider,
        parent: Context,
        backends: list[str],
        spec: dict[str, Any],
        sim_url: str | None,
    ) -> None:
        from opentelemetry import trace as otel
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._otel = otel
        self._kinds = SpanKind
        self._status = Status
        self._code = StatusCode
        self._tracer = provider.get_tracer("batchagent", __version__)
        self._parent = parent
        common: dict[str, Any] = {"gen_ai.provider.name": _provider_name(backends)}
        self._common = common
        request: dict[str, Any] = {}
        if spec.get("max_tokens") is not None:
            request["gen_ai.request.max_tokens"] = spec["max_tokens"]
        if spec.get("temperature") is not None:
            request["gen_ai.request.temperature"] = float(spec["temperature"])
        if spec.get("output_schema") is not None:
            request["gen_ai.output.type"] = "json"
        server = _server(backends, sim_url)
        if server is not None:
            request["server.address"] = server[0]
            if server[1] is not None:
                request["server.port"] = server[1]
        self._request = request
        self._model = spec.get("model")

    @property
    def parent(self) -> Context:
        """The context the run started in: the parent of its job spans."""
        return self._parent

    def write(self, records: list[str], placed: Placement | None = None) -> None:
        """Spans of finished jobs. `placed`, given a job's record, says where its span goes: the
        parent context and attributes to add (a population's tick); the run's parent otherwise."""
        for text in records:
            job = json.loads(text)
            parent, extra = placed(job) if placed is not None else (self._parent, {})
            self._job(job, parent, extra)

    def start_tick(self, number: int, agents: int, start_ns: int) -> Span:
        """The span of a population's tick, a child of the context current when the tick began; the
        caller ends it (`end_tick`)."""
        from opentelemetry import context as otel_context

        return self._tracer.start_span(
            "population.tick",
            context=otel_context.get_current(),
            kind=self._kinds.INTERNAL,
            attributes={**self._common, "batchagent.tick": number, "batchagent.tick.agents": agents},
            start_time=start_ns,
        )

    def end_tick(self, span: Span, end_ns: int, misses: int, errors: int) -> None:
        span.set_attribute("batchagent.tick.deadline_misses", misses)
        span.set_attribute("batchagent.tick.errors", errors)
        if misses:
            span.set_status(self._status(self._code.ERROR, f"{misses} agents missed the deadline"))
        span.end(end_time=end_ns)

    def context_of(self, span: Span) -> Context:
        return self._otel.set_span_in_context(span, self._parent)

    def _job(self, job: dict[str, Any], parent: Context, extra: dict[str, Any]) -> None:
        usage = job["usage"]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            **self._common,
            "batchagent.job.id": job["id"],
            "batchagent.job.index": job["index"],
            "batchagent.turns": job["turns"],
            "batchagent.tool_calls": job["tool_calls"],
            **_usage(usage),
            **extra,
        }
        if self._model is not None:
            attributes["gen_ai.request.model"] = self._model
        span = self._tracer.start_span(
            "invoke_agent",
            context=parent,
            kind=self._kinds.INTERNAL,
            attributes=attributes,
            start_time=job["start_ns"],
        )
        if not job["ok"]:
            span.set_attribute("error.type", job["error"])
            span.set_status(self._status(self._code.ERROR, job["message"]))
        inside = self._otel.set_span_in_context(span, parent)
        for call in job["calls"]:
            self._call(call, inside)
        for tool in job["tools"]:
            self._tool(tool, inside)
        span.end(end_time=job["end_ns"])

    def _call(self, call: dict[str, Any], parent: Context) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            **self._common,
            "gen_ai.request.model": call["model"],
            **self._request,
            "batchagent.turn": call["turn"],
            "batchagent.attempts": call["attempts"],
        }
        if call["stream"]:
            attributes["gen_ai.request.stream"] = True
        if call["compaction"]:
            attributes["batchagent.compaction"] = True
        if call["error"] is None:
            attributes.update(_usage(call["usage"]))
            if call["finish_reason"] is not None:
                attributes["gen_ai.response.finish_reasons"] = [call["finish_reason"]]
            if call["ttft"] is not None:
                attributes["gen_ai.response.time_to_first_chunk"] = call["ttft"]
        else:
            attributes["error.type"] = call["error"]
        span = self._tracer.start_span(
            f"chat {call['model']}",
            context=parent,
            kind=self._kinds.CLIENT,
            attributes=attributes,
            start_time=call["start_ns"],
        )
        if call["error"] is not None:
            span.set_status(self._status(self._code.ERROR))
        span.end(end_time=call["end_ns"])

    def _tool(self, tool: dict[str, Any], parent: Context) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool["name"],
            "gen_ai.tool.call.id": tool["call_id"],
            "gen_ai.tool.type": "function",
            "batchagent.turn": tool["turn"],
        }
        if tool["error"]:
            attributes["error.type"] = "tool_error"
        span = self._tracer.start_span(
            f"execute_tool {tool['name']}",
            context=parent,
            kind=self._kinds.INTERNAL,
            attributes=attributes,
            start_time=tool["start_ns"],
        )
        if tool["error"]:
            span.set_status(self._status(self._code.ERROR))
        span.end(end_time=tool["end_ns"])


def _usage(usage: dict[str, int]) -> dict[str, int]:
    # Ours is the whole prompt, cached parts included, as the conventions' input_tokens.
    attributes = {
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.usage.cache_read.input_tokens": usage["cached_tokens"],
    }
    if usage.get("cache_creation_tokens"):
        attributes["gen_ai.usage.cache_write.input_tokens"] = usage["cache_creation_tokens"]
    return attributes
